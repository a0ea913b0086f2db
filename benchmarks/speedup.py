"""Speed-up efficiency of structured pruning on a preset without trained weights (issue target: >= 0.8).

Latency depends on layer widths, not on weight values, so a seeded random-init model of the preset
is pruned with the real pipeline (same scoring set, GFLOPs bisection, round_to) and both models go
through `altermoma.bench.bench`: efficiency = measured speed-up / GFLOPs ratio, per backend and stage.

    python -m benchmarks.speedup --preset small --target-gflops 0.5 --threads 1 --out reports/speedup-small
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from altermoma.bench import bench
from compress.prune import prune
from compress.request import PruneRequest
from fusion.checkpoint import save_checkpoint
from fusion.config import get_config
from fusion.models.bevfusion import build_model
from fusion.task import first_sample, reference_task, scoring_set


def prepare(preset: str, target: float, method: str, round_to: int, out: Path) -> tuple[Path, Path]:
    """Save the random-init unpruned model and its pruned copy as checkpoints under `out`."""
    config = get_config(preset)
    torch.manual_seed(0)
    model = build_model(config).eval()
    unpruned = save_checkpoint(out / f"{preset}-unpruned", model, {"note": "random weights (seed 0), for latency only"})
    batches = scoring_set(config, 1, 2)
    request = PruneRequest(method=method, target_gflops=target, round_to=round_to)
    report = prune(model, reference_task(model), batches, request, example_batch=first_sample(batches[0]))
    pruned = save_checkpoint(out / f"{preset}-{method}-{round(target * 100)}", model, {"pruning": report})
    print(
        f"pruned {report['gflops_before']:.2f} -> {report['gflops_after']:.2f} GFLOPs ({report['gflops_reduction']:.1%})"
    )
    return unpruned, pruned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--target-gflops", type=float, default=0.5)
    parser.add_argument("--method", default="altereva")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default="reports/speedup-small")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    unpruned, pruned = prepare(args.preset, args.target_gflops, args.method, args.round_to, out / "checkpoints")
    bench([unpruned, pruned], preset=args.preset, threads=args.threads, out_dir=out, runs=args.runs)
    print(f"report: {out / 'bench.md'}")


if __name__ == "__main__":
    main()
