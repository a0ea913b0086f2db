"""Issue 13's pre-registered protocol (reports/protocol/PROTOCOL.md), applied to stored comparison runs.

    python -m benchmarks.protocol choose --dev reports/protocol/balanced-dev
    python -m benchmarks.protocol judge --confirm reports/protocol/balanced-confirm

`choose` ranks the 8 AlterEva candidates by mean mAP over their development runs and applies the written
rule (ties within 0.005 go to the fewest departures from the paper); `judge` checks the goal on the
confirmation runs. Both read `compare.json` only: the rule is code, so nobody applies it by eye.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from altermoma.compare import ALTEREVA_VARIANTS

TIE = 0.005  # mAP: what three seeds resolve
DEV_CELLS = (("structured", 0.5), ("unstructured", 0.9))
BASELINES = ("snip", "magnitude", "random", "synflow", "prospr", "imp")
GOAL_GAP_TO_UNPRUNED = 0.010  # within 1.0 mAP point at structured 50%
GOAL_MARGIN = 0.015  # 1.5 points above the best baseline at structured 50% and unstructured 90%


@dataclass(frozen=True)
class Candidate:
    method: str  # the `altermoma compare` name
    score: float  # mean mAP over the development runs
    runs: int
    departures: int  # options that differ from altereva-paper

    @property
    def options(self) -> dict[str, str]:
        return ALTEREVA_VARIANTS[self.method]


def departures(method: str) -> int:
    """How many of the variant's options differ from the paper as printed (`altereva-paper`)."""
    paper = ALTEREVA_VARIANTS["altereva-paper"]
    return sum(value != paper[key] for key, value in ALTEREVA_VARIANTS[method].items())


def map_by_cell(runs: list[dict]) -> dict[tuple[str, float, str], list[float]]:
    """mAP per (kind, target, method), over seeds."""
    cells: dict[tuple[str, float, str], list[float]] = {}
    for run in runs:
        s = run["spec"]
        if s.get("beta", 1.0) == 1.0:
            cells.setdefault((s["kind"], s["target"], s["method"]), []).append(run["metrics"]["mAP"])
    return cells


def candidates(runs: list[dict]) -> list[Candidate]:
    cells = map_by_cell(runs)
    found = []
    for method in ALTEREVA_VARIANTS:
        values = [v for cell in DEV_CELLS for v in cells.get((*cell, method), [])]
        if values:
            found.append(Candidate(method, float(np.mean(values)), len(values), departures(method)))
    return sorted(found, key=lambda c: -c.score)


def choose(found: list[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The rule: the best score; everything within TIE of it is tied; fewest departures, then the higher score."""
    if not found:
        raise ValueError("no AlterEva candidate runs in the development folder")
    counts = {c.runs for c in found}
    if len(counts) != 1:
        raise ValueError(f"candidates have unequal numbers of runs ({sorted(counts)}): finish the development grid")
    best = max(c.score for c in found)
    tied = [c for c in found if c.score >= best - TIE]
    return min(tied, key=lambda c: (c.departures, -c.score)), tied


def judge(runs: list[dict], unpruned_map: float, method: str = "altereva") -> dict:
    """The goal on the confirmation runs: gap to unpruned at structured 50%, margin over the best baseline."""
    cells = map_by_cell(runs)
    mean = {key: float(np.mean(v)) for key, v in cells.items()}
    verdict = {"unpruned": unpruned_map}
    for kind, target in (("structured", 0.5), ("unstructured", 0.9)):
        ours = mean.get((kind, target, method), math.nan)
        baselines = {b: mean[(kind, target, b)] for b in BASELINES if (kind, target, b) in mean}
        best = max(baselines, key=baselines.get) if baselines else None
        margin = ours - baselines[best] if best else math.nan
        verdict[f"{kind}-{target:g}"] = {
            "altereva": ours,
            "best_baseline": best,
            "best_baseline_map": baselines.get(best, math.nan) if best else math.nan,
            "margin": margin,
            "margin_met": bool(margin >= GOAL_MARGIN),
        }
    gap = unpruned_map - verdict["structured-0.5"]["altereva"]
    verdict["gap_to_unpruned"] = gap
    verdict["gap_met"] = bool(gap <= GOAL_GAP_TO_UNPRUNED)
    verdict["goal_met"] = verdict["gap_met"] and all(
        verdict[k]["margin_met"] for k in ("structured-0.5", "unstructured-0.9")
    )
    return verdict


def _load(folder: Path) -> dict:
    path = folder / "compare.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run the comparison first)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("choose").add_argument("--dev", type=Path, default=Path("reports/protocol/balanced-dev"))
    p = sub.add_parser("judge")
    p.add_argument("--confirm", type=Path, default=Path("reports/protocol/balanced-confirm"))
    p.add_argument("--method", default="altereva", help="the row judged (default: the toolkit default, altereva)")
    args = parser.parse_args(argv)
    try:
        summary = _load(args.dev if args.step == "choose" else args.confirm)
        if args.step == "choose":
            found = candidates(summary["runs"])
            chosen, tied = choose(found)
            print(f"| candidate | mean mAP over {found[0].runs} runs | departures | tied with the best |")
            print("| --- | --- | --- | --- |")
            for c in found:
                print(f"| {c.method} | {c.score:.4f} | {c.departures} | {'yes' if c in tied else ''} |")
            print(f"chosen: {chosen.method} {json.dumps(chosen.options)}")
        else:
            verdict = judge(summary["runs"], summary["unpruned"]["metrics"]["mAP"], args.method)
            print(json.dumps(verdict, indent=2))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
