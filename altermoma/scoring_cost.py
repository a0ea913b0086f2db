"""What AlterEva costs: scoring wall time and peak memory against one forward/backward pass.

Each measurement runs in a fresh subprocess so peak RSS (`ru_maxrss`) belongs to that measurement
alone; we report the peak minus the RSS after setup (model, scoring set and imports loaded).

    python -m altermoma.scoring_cost --preset tiny --threads 1 --out reports/scoring_cost
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common.io import atomic_write_text

KINDS = ("forward_backward", "snip", "altereva")


def cost_of(kind: str, work) -> dict:
    """Run `work()` once: wall time and peak RSS beyond what the process held before it."""
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "seconds": seconds, "extra_peak_mib": (peak - setup_rss) / 1024, "peak_rss_mib": peak / 1024}


def child_rows(module: str, kinds: tuple[str, ...], args: list[str], echo: bool = False) -> list[dict]:
    """Per kind, `python -m module args[0] kind args[1:]` in a fresh process; the JSON on its last stdout line."""
    rows = []
    for kind in kinds:
        command = [sys.executable, "-m", module, args[0], kind, *args[1:]]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if echo:
            print(rows[-1], flush=True)
    return rows


def _child(kind: str, preset: str, threads: int, batches: int, steps: int) -> dict:
    import torch

    from compress.altereva import AlterEvaConfig, altereva_saliency, signed_saliency
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model
    from fusion.task import reference_task, scoring_set

    torch.set_num_threads(threads)
    config = get_config(preset)
    torch.manual_seed(0)
    model = build_model(config).eval()
    data = scoring_set(config, batches, 2)
    task = reference_task(model)

    def work() -> None:
        if kind == "forward_backward":
            task.loss_of(task.forward(model, data[0]), data[0]).backward()
        elif kind == "snip":
            signed_saliency(model, task, data)
        else:
            settings = AlterEvaConfig(reactivation_steps=steps)
            altereva_saliency(model, task, data, settings, progress=False)

    return cost_of(kind, work)


def write_report(out: Path, lines: list[str], rows: list[dict]) -> None:
    """`scoring_cost.md` (the table) and `scoring_cost.json` (the rows) in `out`, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scoring_cost.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "scoring_cost.json", json.dumps(rows, indent=2))
    print("\n".join(lines))


def run(preset: str, threads: int, batches: int, steps: int, out: Path) -> list[dict]:
    args = ["--child", "--preset", preset, "--threads", str(threads), "--batches", str(batches), "--steps", str(steps)]
    rows = child_rows("altermoma.scoring_cost", KINDS, args)
    base = rows[0]["seconds"]
    lines = [
        f"# AlterEva scoring cost ({preset} preset, {threads} thread(s), scoring set {batches} x 2 scenes, B = {steps})",
        "",
        "| what | seconds | x one fwd/bwd (batch 2) | extra peak RSS (MiB) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['seconds']:.2f} | {r['seconds'] / base:.1f} | {r['extra_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    command = (
        f"python -m altermoma.scoring_cost --preset {preset} --threads {threads} --batches {batches} --steps {steps}"
    )
    lines += ["", f"Measured with `{command}`."]
    write_report(out, lines, rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4, help="scoring-set batches of 2 scenes")
    parser.add_argument("--steps", type=int, default=8, help="AlterEva reactivation steps B")
    parser.add_argument("--out", default="reports/scoring_cost")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.preset, args.threads, args.batches, args.steps)))
    else:
        run(args.preset, args.threads, args.batches, args.steps, Path(args.out))


if __name__ == "__main__":
    main()
