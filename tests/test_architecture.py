"""Layering rules from DESIGN.md, checked on the source: `compress` and `export` never import `fusion`
(also in a fresh interpreter), `export` never imports `compress`, and no import cycle exists between
packages or between modules (imports inside functions count too), and nothing in the product imports
`benchmarks` (scripts that write reports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("altermoma", "benchmarks", "common", "compress", "export", "fusion")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(f for f in found if f in modules and f != name)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_import_cycle():
    assert _cycle(import_graph()) is None


def test_no_package_import_cycle_and_layers_hold():
    packages: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    for module, targets in import_graph().items():
        for target in targets:
            if target.split(".")[0] != module.split(".")[0]:
                packages[module.split(".")[0]].add(target.split(".")[0])
    assert _cycle(packages) is None, packages
    assert "fusion" not in packages["compress"] and "fusion" not in packages["export"]
    assert "compress" not in packages["export"]
    assert packages["common"] == set()
    # benchmarks/ holds scripts that write reports: product code never imports them (the product lives
    # in altermoma/, compress/, export/, fusion/ and common/)
    for package in PACKAGES:
        if package != "benchmarks":
            assert "benchmarks" not in packages[package], (package, packages[package])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_compress_and_export_load_no_fusion_in_a_fresh_interpreter():
    code = (
        "import sys, altermoma, compress.prune, compress.checkpoint, compress.finetune, export.onnx, "
        "export.engines, altermoma.api\n"
        "altermoma.prune, altermoma.export_onnx, altermoma.load_pruned\n"
        "bad = sorted(m for m in sys.modules if m == 'fusion' or m.startswith('fusion.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
