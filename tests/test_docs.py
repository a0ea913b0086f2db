"""The README and docs/ stay walkable: every relative link resolves (files, folders, and #anchors into a
Markdown page as GitHub slugs its headings), every `reports/...` path named in code or in a link exists,
and the README stays short. Pure text checks: milliseconds."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
REPORT_PATH = re.compile(r"(?<![\w/.-])reports/[\w.*/-]*[\w*/]")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with code spans blanked, code: fenced blocks and inline spans). Links inside code are
    not links; report paths inside code are what commands read and write."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
            continue
        code.extend(m.group(2) for m in CODE_SPAN.finditer(line))
        prose.append(CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
    return prose, code


def links(text: str) -> list[str]:
    prose, _ = split_code(text)
    found = []
    for line in prose:
        found.extend(m.group(1) for m in INLINE_LINK.finditer(line))
        definition = REFERENCE_DEF.match(line)
        if definition:
            found.append(definition.group(1))
    return found


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's slug, with GitHub's -1, -2 suffixes for repeats; headings in code blocks are not."""
    seen: dict[str, int] = {}
    found = set()
    prose, _ = split_code(path.read_text())
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path.read_text()):
        if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("//"):
            continue  # a URL (https:, mailto:): not checked here, nothing may reach the network in tests
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{path.relative_to(ROOT)}: link {target!r}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{path.relative_to(ROOT)}: link {target!r}: no heading #{anchor} in {file_part or 'it'}")
    return problems


def missing_reports(path: Path) -> list[str]:
    """`reports/...` paths in code (spans and blocks) and in link targets that name nothing in the repository."""
    text = path.read_text()
    _, code = split_code(text)
    mentions = [m.group(0) for chunk in code for m in REPORT_PATH.finditer(chunk)]
    mentions += [m.group(0) for target in links(text) for m in REPORT_PATH.finditer(target)]
    problems = []
    for mention in sorted(set(mentions)):
        exists = any(ROOT.glob(mention.rstrip("/"))) if "*" in mention else (ROOT / mention).exists()
        if not exists:
            problems.append(f"{path.relative_to(ROOT)}: {mention} does not exist")
    return problems


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_report_paths_exist(path):
    assert missing_reports(path) == []


def test_docs_index_links_every_topic_page_of_the_readme():
    """The README's doc links all lead somewhere the index also lists, so docs/README.md is a real index."""
    index = {Path(t.partition("#")[0]).name for t in links((ROOT / "docs" / "README.md").read_text())}
    from_readme = {
        Path(t.partition("#")[0]).name for t in links((ROOT / "README.md").read_text()) if t.startswith("docs/")
    }
    assert from_readme - {"README.md"} <= index


def test_slugs_follow_github():
    assert github_slug("Main job: AlterEva at 50% GFLOPs") == "main-job-altereva-at-50-gflops"
    assert github_slug("What AlterEva costs (`python -m altermoma.scoring_cost --preset tiny`)") == (
        "what-altereva-costs-python--m-altermomascoring_cost---preset-tiny"
    )
    assert github_slug("Exporting for one car's calibration") == "exporting-for-one-cars-calibration"
    assert github_slug("See [the card](x.md) first") == "see-the-card-first"


def test_checker_finds_what_is_broken(tmp_path, monkeypatch):
    """A page with a missing file, a missing anchor and a missing report is reported three times; links and
    paths inside code, URLs, and anchors that exist (repeats suffixed) are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "reports" / "real").mkdir(parents=True)
    (tmp_path / "other.md").write_text("# Title\n\n## Part\n\n## Part\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#part-1) [ok](other.md#title) [ok](reports/real) [self](#page)\n"
        "[web](https://example.com/x) `[not a link](nowhere.md)` `reports/real/`\n"
        "[gone](missing.md) [no anchor](other.md#not-a-heading) `reports/re*` (a glob: one match is enough)\n"
        "```bash\npython -m x --out reports/absent\n```\n"
    )
    assert broken_links(page) == [
        "page.md: link 'missing.md': missing.md does not exist",
        "page.md: link 'other.md#not-a-heading': no heading #not-a-heading in other.md",
    ]
    assert missing_reports(page) == ["page.md: reports/absent does not exist"]
