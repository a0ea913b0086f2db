"""`altermoma --help` walks a user's flow: every verb listed in the documented order, each verb's help ends
with an example, and every example works as printed (it parses with the real parser, its inputs are shipped
or written by an earlier example, and docs/cli.md shows the same commands)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from altermoma.cli import build_parser
from altermoma.cli_help import EXAMPLES, FLOW, SHIPPED_PREFIX, example_inputs, flow_verbs, option_values

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_ORDER = [
    "data",
    "train",
    "prune",
    "finetune",
    "evaluate",
    "quantize",
    "export",
    "bench",
    "latency-table",
    "compare",
    "robustness",
    "pipeline",
]


def verbs_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def every_verb() -> list[tuple[str, argparse.ArgumentParser]]:
    """(`verb` or `verb sub-verb`, its parser) for every command the CLI has."""
    out = []
    for verb, parser in verbs_of(build_parser()).items():
        out.append((verb, parser))
        out.extend((f"{verb} {name}", child) for name, child in verbs_of(parser).items())
    return out


def test_flow_covers_every_verb_in_the_documented_order():
    assert flow_verbs() == DOCUMENTED_ORDER
    assert list(verbs_of(build_parser())) == DOCUMENTED_ORDER  # a verb added later must join FLOW


def test_top_level_help_lists_verbs_grouped_in_flow_order_with_an_example_each():
    text = build_parser().format_help()
    listed = [m.group(1) for m in re.finditer(r"^  (\S+) +\S.*$", text, flags=re.M) if m.group(1) in DOCUMENTED_ORDER]
    assert listed == DOCUMENTED_ORDER
    positions = [text.index(f"\n{group}:\n") for group, _ in FLOW]
    assert positions == sorted(positions)
    for verb in DOCUMENTED_ORDER:
        line_after = text.split(f"\n  {verb} ", 1)[1].splitlines()[1].strip()
        assert line_after.startswith(f"altermoma {verb}"), (verb, line_after)


@pytest.mark.parametrize("command", [name for name, _ in every_verb()])
def test_every_verb_help_ends_with_its_example(command):
    parser = dict(every_verb())[command]
    last = parser.format_help().rstrip().splitlines()[-1].strip()
    assert last.startswith(f"altermoma {command}"), last
    assert last in EXAMPLES.values()


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_every_example_parses_with_the_real_parser(key):
    words = shlex.split(EXAMPLES[key])
    assert words[0] == "altermoma"
    args = build_parser().parse_args(words[1:])
    assert args.command == key.split()[0]
    assert callable(args.run)


def test_every_example_input_is_shipped_or_written_by_an_earlier_example():
    written = set()
    for key, text in EXAMPLES.items():
        for path in example_inputs(text):
            if path.startswith(SHIPPED_PREFIX):
                assert (ROOT / path).is_dir(), f"{key}: {path} is not a shipped checkpoint"
            else:
                assert path in written, f"{key}: {path} is written by no earlier example"
        written.update(option_values(text, "--out"))


def test_examples_write_under_runs_only():
    """Examples run from the repository root: they must not overwrite committed reports."""
    for key, text in EXAMPLES.items():
        for out in option_values(text, "--out"):
            assert out.startswith("runs/"), (key, out)


def test_help_names_where_a_chained_input_comes_from():
    parser = dict(every_verb())["finetune"]
    assert "runs/pruned is written by the `altermoma prune` example" in parser.format_help()


def test_docs_cli_page_shows_the_same_examples_in_the_same_order():
    page = (ROOT / "docs" / "cli.md").read_text()
    shown = [line for line in page.splitlines() if line in EXAMPLES.values()]
    assert shown == list(EXAMPLES.values())


def test_unknown_verb_is_one_error_line(capsys):
    from altermoma.cli import main

    assert main(["no-such-verb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "'data', 'train', 'prune'" in err[0]
