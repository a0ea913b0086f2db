"""The pre-registered protocols, applied to stored comparison runs: the rule is code, so nobody applies it by eye.

Protocol v1 (issue 13, reports/protocol/PROTOCOL.md):
    python -m benchmarks.protocol choose --dev reports/protocol/balanced-dev
    python -m benchmarks.protocol judge --confirm reports/protocol/balanced-confirm
Protocol v2 (issue 25, reports/protocol-v2/PROTOCOL.md): the mechanism gate, then the rule, then the goal.
    python -m benchmarks.protocol gate --methods altereva-paper,altereva-v2 --threads-check altereva-v2
    python -m benchmarks.protocol choose-v2 --dev reports/protocol-v2/bevfusion-tiny-dev
    python -m benchmarks.protocol judge-v2 --confirm reports/protocol-v2/bevfusion-tiny-confirm

`choose` ranks the AlterEva candidates by mean mAP over their development runs and applies the written
rule (ties within 0.005 go to the fewest departures from the paper); v2 admits only candidates that pass
the gate. `judge` checks the goal on the confirmation runs. Both read `compare.json` only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from altermoma.compare import ALTEREVA_VARIANTS, PAPER_OPTIONS, PEERS

TIE = 0.005  # mAP: what three seeds resolve
DEV_CELLS = (("structured", 0.5), ("unstructured", 0.9))
BASELINES = ("snip", "magnitude", "random", "synflow", "prospr", "imp")

# "altereva-adamw" is the candidate PROTOCOL.md calls `altereva` (protocol v1's default, AdamW): the rule moved
# the default to altereva-denoised, so plain "altereva" no longer names those options
V2_CANDIDATES = (
    "altereva-adamw",
    "altereva-paper",
    "altereva-same",
    "altereva-residual",
    "altereva-signed",
    "altereva-budget",
    "altereva-restarts",
    "altereva-denoised",
    "altereva-v2",
)
V2_GATE = Path("reports/protocol-v2/gate.json")
V2_CHECKPOINT = "fusion/weights/bevfusion-tiny-fusion"
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
        return options_of(self.method)


def options_of(method: str) -> dict:
    """A candidate's estimator options; plain "altereva" is the toolkit default (`AlterEvaConfig()`)."""
    if method in ALTEREVA_VARIANTS:
        return ALTEREVA_VARIANTS[method]
    from compress.altereva import AlterEvaConfig

    defaults = AlterEvaConfig()
    return {key: getattr(defaults, key) for key in PAPER_OPTIONS}


def departures(method: str) -> int:
    """How many of the candidate's options differ from the paper as printed (`altereva-paper`)."""
    return sum(key not in PAPER_OPTIONS or value != PAPER_OPTIONS[key] for key, value in options_of(method).items())


def map_by_cell(runs: list[dict]) -> dict[tuple[str, float, str], list[float]]:
    """mAP per (kind, target, method), over seeds."""
    cells: dict[tuple[str, float, str], list[float]] = {}
    for run in runs:
        s = run["spec"]
        if s.get("beta", 1.0) == 1.0:
            cells.setdefault((s["kind"], s["target"], s["method"]), []).append(run["metrics"]["mAP"])
    return cells


def candidates(runs: list[dict], names: tuple[str, ...] | None = None) -> list[Candidate]:
    """Protocol v1's candidates (the 8 variants) or the `names` given, scored on their development runs."""
    cells = map_by_cell(runs)
    found = []
    for method in names or tuple(m for m in ALTEREVA_VARIANTS if m.count("-") and _is_v1(m)):
        values = [v for cell in DEV_CELLS for v in cells.get((*cell, method), [])]
        if values:
            found.append(Candidate(method, float(np.mean(values)), len(values), departures(method)))
    return sorted(found, key=lambda c: -c.score)


def _is_v1(method: str) -> bool:
    """Protocol v1's 8 variants: paper, same, adamw, model and their combinations."""
    return set(method.split("-")[1:]) <= {"paper", "same", "adamw", "model"}


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


# ---- protocol v2: the mechanism gate -------------------------------------------------------------
def threads_check(method: str, checkpoint: str = V2_CHECKPOINT) -> dict:
    """`altermoma prune --target-gflops 0.5 --seed 0` with the candidate's options at 1 and at 2 threads, each in
    a fresh process: the same selection digest, or not."""
    import tempfile

    from benchmarks.threads_repro import run_prune

    args = ["--checkpoint", checkpoint, *cli_options(method)]
    digests = {}
    with tempfile.TemporaryDirectory() as work:
        for threads in ("1", "2"):
            row = run_prune(method, args, threads, Path(work))
            digests[threads] = row.get("selection_digest")
    same = digests["1"] is not None and digests["1"] == digests["2"]
    return {"checkpoint": checkpoint, "selection_digest": digests, "same": same}


def cli_options(method: str) -> list[str]:
    """The `altermoma prune` options that give a candidate's estimator (every option spelled out)."""
    o = options_of(method)
    flags = ["--reri-data", o["reri_data"], "--reactivation-optimizer", o["reactivation_optimizer"]]
    flags += ["--normalise", o["normalise"], "--penalty", o["penalty"], "--reactivation-restarts", str(o["restarts"])]
    return flags + (["--subtract-noise"] if o["subtract_noise"] else ["--no-subtract-noise"])


def eligible(method: str, gate: dict) -> bool | None:
    """Passed both parts of the gate (True), failed one (False), or a part not measured yet (None)."""
    copy = gate.get("planted_copy", {}).get(method)
    threads = gate.get("threads", {}).get(method)
    if copy is not None and not copy["copy_last"]:
        return False
    if threads is not None and not threads["same"]:
        return False
    return None if copy is None or threads is None else True


def choose_v2(found: list[Candidate], gate: dict) -> tuple[Candidate, list[Candidate], bool]:
    """Protocol v2's rule: among candidates that pass the gate, the best score; ties within TIE go to the
    fewest departures, then the higher score. No candidate passes: the rule over all (third value False)."""
    if not found:
        raise ValueError("no candidate runs in the development folder")
    counts = {c.runs for c in found}
    if len(counts) != 1:
        raise ValueError(f"candidates have unequal numbers of runs ({sorted(counts)}): finish stage A")
    status = {c.method: eligible(c.method, gate) for c in found}
    passing = [c for c in found if status[c.method]]
    best_passing = max((c.score for c in passing), default=-math.inf)
    pending = [c.method for c in found if status[c.method] is None and c.score >= best_passing - TIE]
    if pending:
        raise ValueError(
            f"the gate is not measured for {', '.join(pending)}, which could be chosen: run "
            f"`python -m benchmarks.protocol gate --methods {','.join(pending)} --threads-check {','.join(pending)}`"
        )
    pool = passing or found
    best = max(c.score for c in pool)
    tied = [c for c in pool if c.score >= best - TIE]
    return min(tied, key=lambda c: (c.departures, -c.score)), tied, bool(passing)


def against_baselines(runs: list[dict], kind: str, target: float, method: str, baselines: tuple[str, ...]) -> dict:
    """One cell's means: the judged method, the best of `baselines`, and the margin between them."""
    mean = {key: float(np.mean(v)) for key, v in map_by_cell(runs).items()}
    ours = mean.get((kind, target, method), math.nan)
    found = {b: mean[(kind, target, b)] for b in baselines if (kind, target, b) in mean}
    best = max(found, key=found.get) if found else None
    return {
        "altereva": ours,
        "best_baseline": best,
        "best_baseline_map": found[best] if best else math.nan,
        "margin": ours - found[best] if best else math.nan,
    }


def judge(runs: list[dict], unpruned_map: float, method: str = "altereva") -> dict:
    """The goal on the confirmation runs: gap to unpruned at structured 50%, margin over the best baseline."""
    verdict = {"unpruned": unpruned_map}
    for kind, target in (("structured", 0.5), ("unstructured", 0.9)):
        cell = against_baselines(runs, kind, target, method, BASELINES)
        verdict[f"{kind}-{target:g}"] = cell | {"margin_met": bool(cell["margin"] >= GOAL_MARGIN)}
    gap = unpruned_map - verdict["structured-0.5"]["altereva"]
    verdict["gap_to_unpruned"] = gap
    verdict["gap_met"] = bool(gap <= GOAL_GAP_TO_UNPRUNED)
    verdict["goal_met"] = verdict["gap_met"] and all(
        verdict[k]["margin_met"] for k in ("structured-0.5", "unstructured-0.9")
    )
    return verdict


def judge_v2(runs: list[dict], method: str = "altereva") -> dict:
    """Issue 25's goal: structured 50% at least 0.015 above the best baseline (peers included), unstructured 90%
    at least equal to it."""
    verdict = {}
    for kind, target, needed in (("structured", 0.5, GOAL_MARGIN), ("unstructured", 0.9, 0.0)):
        cell = against_baselines(runs, kind, target, method, (*BASELINES, *PEERS))
        verdict[f"{kind}-{target:g}"] = cell | {"needed": needed, "met": bool(cell["margin"] >= needed)}
    verdict["goal_met"] = all(v["met"] for v in verdict.values())
    return verdict


def _load(folder: Path) -> dict:
    path = folder / "compare.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run the comparison first)")
    return json.loads(path.read_text())


def stored_runs(folder: Path) -> list[dict]:
    """The finished runs of a comparison folder, read one by one (compare.json is written only at the end)."""
    runs = []
    for path in sorted((folder / "runs").glob("*.json")):
        if path.name != "unpruned.json":
            runs.append(json.loads(path.read_text()))
    return runs


def status_table(runs: list[dict], unpruned: float | None) -> str:
    """Mean mAP (and the seeds done) per method and development cell: where a grid stands, before the rule."""
    cells = map_by_cell(runs)
    seeds: dict[tuple, list[int]] = {}
    kept: dict[tuple, list[list[float]]] = {}
    for run in runs:
        s = run["spec"]
        seeds.setdefault((s["kind"], s["target"], s["method"]), []).append(s["seed"])
        ratios = [run.get("kept_ratio", {}).get(part, math.nan) for part in ("camera", "lidar", "fusion")]
        kept.setdefault((s["kind"], s["target"], s["method"]), []).append(ratios)
    columns = sorted({(k, t) for k, t, _ in cells}, key=lambda c: (c[0] != "structured", c[1]))
    methods = list(dict.fromkeys(m for _, _, m in sorted(cells, key=lambda c: c[2])))
    methods = [m for m in (*V2_CANDIDATES, *BASELINES, *PEERS) if m in methods] + [
        m for m in methods if m not in (*V2_CANDIDATES, *BASELINES, *PEERS)
    ]
    head = " | ".join(f"{kind} {target:g}" for kind, target in columns)
    lines = [f"| method | {head} |", "| --- |" + " --- |" * len(columns)]
    for method in methods:
        row = []
        for kind, target in columns:
            values = cells.get((kind, target, method), [])
            done = ",".join(map(str, sorted(seeds.get((kind, target, method), []))))
            shares = ""
            if kind == "structured" and values:
                means = np.mean(kept[(kind, target, method)], axis=0)
                shares = "/".join(f"{m:.2f}".lstrip("0") for m in means) + "; "
            row.append(f"{np.mean(values):.4f} ({shares}seeds {done})" if values else "-")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append("\nStructured cells: mean mAP (channels kept in camera/LiDAR/fusion+heads; seeds done).")
    if unpruned is not None:
        lines.append(f"unpruned: {unpruned:.4f}")
    return "\n".join(lines)


def gate_command(methods: list[str], threads_methods: list[str], out: Path, checkpoint: str) -> dict:
    """Run the gate's parts for the named candidates and merge them into `out` (earlier entries are kept)."""
    from benchmarks.planted_copy import gate as planted_copy_gate
    from common.io import atomic_write_text

    gate = json.loads(out.read_text()) if out.is_file() else {"planted_copy": {}, "threads": {}}
    for method in methods:
        gate["planted_copy"][method] = planted_copy_gate(method)
        print(f"{method}: planted copy last on every seed: {gate['planted_copy'][method]['copy_last']}", flush=True)
    for method in threads_methods:
        gate["threads"][method] = threads_check(method, checkpoint)
        print(f"{method}: same selection at 1 and 2 threads: {gate['threads'][method]['same']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(gate, indent=2))
    return gate


def _names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in V2_CANDIDATES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a protocol v2 candidate (choose from {', '.join(V2_CANDIDATES)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("choose").add_argument("--dev", type=Path, default=Path("reports/protocol/balanced-dev"))
    p = sub.add_parser("judge")
    p.add_argument("--confirm", type=Path, default=Path("reports/protocol/balanced-confirm"))
    p.add_argument("--method", default="altereva", help="the row judged (default: the toolkit default, altereva)")
    p = sub.add_parser("gate", help="protocol v2's mechanism gate for the named candidates")
    p.add_argument("--methods", default=",".join(V2_CANDIDATES), help="planted-copy check (default: every candidate)")
    p.add_argument("--threads-check", default="", help="candidates to prune at 1 and 2 threads (minutes each)")
    p.add_argument("--checkpoint", default=V2_CHECKPOINT)
    p.add_argument("--out", type=Path, default=V2_GATE)
    p = sub.add_parser("choose-v2")
    p.add_argument("--dev", type=Path, default=Path("reports/protocol-v2/bevfusion-tiny-dev"))
    p.add_argument("--gate", type=Path, default=V2_GATE)
    p = sub.add_parser("status", help="mean mAP per method and cell of a (possibly unfinished) comparison folder")
    p.add_argument("--dev", type=Path, default=Path("reports/protocol-v2/bevfusion-tiny-dev"))
    p.add_argument(
        "--stage-c", action="store_true", help="only stage C's cells (structured 30/70%%, unstructured 80/85%%)"
    )
    p = sub.add_parser("judge-v2")
    p.add_argument("--confirm", type=Path, default=Path("reports/protocol-v2/bevfusion-tiny-confirm"))
    p.add_argument("--method", default="altereva")
    args = parser.parse_args(argv)
    try:
        if args.step == "gate":
            import torch

            torch.set_num_threads(1)
            gate_command(_names(args.methods), _names(args.threads_check), args.out, args.checkpoint)
        elif args.step == "choose-v2":
            if not args.gate.is_file():
                raise FileNotFoundError(f"{args.gate} does not exist (run `python -m benchmarks.protocol gate` first)")
            gate = json.loads(args.gate.read_text())
            found = candidates(_load(args.dev)["runs"], V2_CANDIDATES)
            chosen, tied, any_passed = choose_v2(found, gate)
            print(f"| candidate | mean mAP over {found[0].runs} runs | departures | gate | tied with the best |")
            print("| --- | --- | --- | --- | --- |")
            for c in found:
                passed = {True: "passed", False: "failed", None: "not measured"}[eligible(c.method, gate)]
                print(f"| {c.method} | {c.score:.4f} | {c.departures} | {passed} | {'yes' if c in tied else ''} |")
            if not any_passed:
                print("no candidate passes the mechanism gate: the rule picked among all of them")
            print(f"chosen: {chosen.method} {json.dumps(chosen.options)}")
        elif args.step == "status":
            runs = stored_runs(args.dev)
            if args.stage_c:
                runs = [r for r in runs if (r["spec"]["kind"], r["spec"]["target"]) not in DEV_CELLS]
            if not runs:
                which = "stage-C run" if args.stage_c else "run"
                raise FileNotFoundError(f"no finished {which} in {args.dev / 'runs'}")
            reference = args.dev / "runs" / "unpruned.json"
            unpruned = json.loads(reference.read_text())["metrics"]["mAP"] if reference.is_file() else None
            print(status_table(runs, unpruned))
        elif args.step == "judge-v2":
            print(json.dumps(judge_v2(_load(args.confirm)["runs"], args.method), indent=2))
        elif args.step == "choose":
            found = candidates(_load(args.dev)["runs"])
            chosen, tied = choose(found)
            print(f"| candidate | mean mAP over {found[0].runs} runs | departures | tied with the best |")
            print("| --- | --- | --- | --- |")
            for c in found:
                print(f"| {c.method} | {c.score:.4f} | {c.departures} | {'yes' if c in tied else ''} |")
            print(f"chosen: {chosen.method} {json.dumps(chosen.options)}")
        else:
            summary = _load(args.confirm)
            verdict = judge(summary["runs"], summary["unpruned"]["metrics"]["mAP"], args.method)
            print(json.dumps(verdict, indent=2))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
