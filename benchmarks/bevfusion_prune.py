"""Structured 50% GFLOPs prune of random-weight `bevfusion-tiny` by each method: kept channels per partition,
what is left whole, zero-then-prune error, CPU seconds (the table in docs/bevfusion_presets.md).

Random weights with the TransFusion heatmap fixed (its last conv zeroed: every cell ties, so the pruned model
and its zeroed reference propose the same cells; see that page), scoring set `fusion.task.scoring_set(config, 2,
2)`, one thread. Trained weights are measured by `altermoma prune --checkpoint fusion/weights/bevfusion-tiny-fusion`.

    python -m benchmarks.bevfusion_prune --out reports/bevfusion-prune-methods
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import altermoma
from common.io import atomic_write_text
from fusion.config import get_config
from fusion.models.bevfusion import build_model
from fusion.task import reference_task, scoring_set

METHODS = ("magnitude", "snip", "altereva")


def run(methods: tuple[str, ...], seed: int) -> list[dict]:
    torch.set_num_threads(1)
    config = get_config("bevfusion-tiny")
    torch.manual_seed(seed)
    base = build_model(config).eval()
    with torch.no_grad():
        base.heads.det.heatmap_head[-1].weight.zero_()
    batches = scoring_set(config, 2, 2)
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        start = time.process_time()
        report = altermoma.prune(
            model, reference_task(model), batches, method=method, target_gflops=0.5, round_to=4, progress=False
        )
        cpu = time.process_time() - start
        parts = report["partitions"]
        rows.append(
            {
                "method": method,
                "gflops_reduction": report["gflops_reduction"],
                "kept_ratio": {part: parts[part]["kept_ratio"] for part in ("camera", "lidar", "fusion")},
                "zero_then_prune_error": report["zero_then_prune_error"],
                "unpruned_groups": report["unpruned_groups"],
                "left_whole": [entry["module"] for entry in report["left_whole"]["modules"]],
                "cpu_seconds": cpu,
            }
        )
        print(f"{method}: {report['gflops_reduction']:.1%} removed, {cpu:.0f} s of CPU", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | GFLOPs removed | camera | lidar | fusion | zero-then-prune error | groups left whole | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        kept = row["kept_ratio"]
        lines.append(
            f"| {row['method']} | {row['gflops_reduction']:.1%} | {kept['camera']:.3f} | {kept['lidar']:.3f} | "
            f"{kept['fusion']:.3f} | {row['zero_then_prune_error']:.1e} | {len(row['unpruned_groups'])} | "
            f"{row['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def report_page(table: str, seed: int) -> str:
    return (
        "# Structured 50% GFLOPs prune of random-weight bevfusion-tiny, by method\n\n"
        f"`python -m benchmarks.bevfusion_prune --out <dir> --seed {seed}` (weights seed {seed}, TransFusion heatmap "
        "fixed, scoring set `fusion.task.scoring_set(config, 2, 2)`, 1 thread). Columns camera / lidar / fusion: "
        "kept channel ratio per partition; CPU s: process time of the whole prune.\n\n" + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    args = parser.parse_args()
    rows = run(tuple(args.methods), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps({"seed": args.seed, "threads": 1, "rows": rows}, indent=2))
    table = markdown(rows)
    atomic_write_text(args.out / "README.md", report_page(table, args.seed))
    print(table, end="")


if __name__ == "__main__":
    main()
