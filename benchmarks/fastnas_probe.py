"""NVIDIA ModelOpt's structured pruning (FastNAS) as a peer: where it runs on our fusion models, and why not.

For each checkpoint and channel divisor, the model is converted to FastNAS's search space (ModelOpt traces
it with torch.fx), the search space is profiled (configurable hparams, smallest and largest subnet's
FLOPs by ModelOpt's own count), and `altermoma prune --method fastnas`'s own call
(`compress.fastnas.prune_fastnas`: `mtp.prune(mode="fastnas", constraints={"flops": "50%"})`, refused
before the search when the space cannot reach it) is run with the task loss on the first scene of seed 0's
first scoring batch as its score. Everything ModelOpt prints is kept in the report's log; the
report says, measured, what FastNAS can and cannot reach on these models.

    python -m benchmarks.fastnas_probe --out reports/protocol-v2/fastnas

Needs `nvidia-modelopt` (the `quant` extra) and `torchprofile==0.0.4` (ModelOpt 0.47 reads
`torchprofile.profile.handlers`, which 0.1.0 removed).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

CHECKPOINTS = ("fusion/weights/tiny-fusion", "fusion/weights/bevfusion-tiny-fusion")
DIVISORS = (32, 8)  # ModelOpt's default channel divisor, and our round_to
TARGET = "50%"  # of the FLOPs kept, as ModelOpt's constraint reads
TARGET_REDUCTION = 0.5


def probe(checkpoint: str, divisor: int) -> dict:
    from compress.fastnas import modelopt_input, prune_fastnas, search_space
    from compress.structured import PruningError
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    base, _ = load_checkpoint(checkpoint)
    base.eval()
    sample = first_sample(scoring_set(base.config, 1, 2, 0)[0])
    task = reference_task(base)
    row = {"checkpoint": checkpoint, "channel_divisor": divisor, "target_flops": TARGET}
    start = time.perf_counter()
    space = search_space(base, modelopt_input(base, task, sample), divisor)
    row["configurable_hparams"] = len(space.hparams)
    row["hparams"] = space.hparams
    row["flops"] = space.flops
    if space.error:
        row["convert_error"] = space.error
    refusal = space.refusal(TARGET_REDUCTION)  # what prune_fastnas raises, before its search, when out of reach
    row["satisfiable"] = refusal is None
    row["pruned"] = False
    if refusal:
        row["prune_error"] = refusal
    else:  # the product's own call (it converts the model again: only rows within reach pay for that)
        model = copy.deepcopy(base)
        try:
            report = prune_fastnas(model, task, [sample], TARGET_REDUCTION, divisor)
            row["pruned"] = True
            row["gflops_reduction"] = report["gflops_reduction"]
            row["params_after"] = sum(p.numel() for p in model.parameters())
        except PruningError as error:
            row["prune_error"] = str(error)
    row["params_before"] = sum(p.numel() for p in base.parameters())
    row["seconds"] = time.perf_counter() - start
    row["untraceable"] = space.untraceable
    row["log_tail"] = space.log.splitlines()[-40:]
    return row


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        "# NVIDIA ModelOpt FastNAS on the fusion models (issue 25's peer)",
        "",
        f"`python -m benchmarks.fastnas_probe` ({threads} thread(s)); nvidia-modelopt "
        f"{_version('nvidia-modelopt')}, torchprofile {_version('torchprofile')}, torch {torch.__version__}. "
        f"Target: FLOPs at most {TARGET} of the model (ModelOpt's count).",
        "",
        "| checkpoint | channel divisor | configurable hparams | FLOPs max -> min subnet (G) | 50% reachable | `prune --method fastnas` |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        flops = r.get("flops", {})
        span = r.get("convert_error", "-")
        if "max" in flops:
            reach = 1.0 - flops["min"] / flops["max"]
            span = f"{flops['max'] / 1e9:.3f} -> {flops['min'] / 1e9:.3f} (at most {reach:.1%} less)"
        result = r.get("prune_error", "-")
        if r.get("pruned"):
            result = (
                f"pruned: parameters {r['params_before'] / 1e6:.3f} M -> {r['params_after'] / 1e6:.3f} M, "
                f"GFLOPs {r['gflops_reduction']:.1%} less by our count ({r['seconds']:.0f} s)"
            )
        lines.append(
            f"| {r['checkpoint']} | {r['channel_divisor']} | {r.get('configurable_hparams', '-')} | {span} "
            f"| {r.get('satisfiable', '-')} | {result} |"
        )
    lines += [
        "",
        "Modules ModelOpt's tracer could not trace (it skips them and searches only their traced children):",
        "",
    ]
    for r in rows:
        if r["channel_divisor"] == DIVISORS[0]:
            shown = ", ".join(f"`{n}`" for n in r["untraceable"][:12])
            more = f" and {len(r['untraceable']) - 12} more" if len(r["untraceable"]) > 12 else ""
            lines.append(f"- {r['checkpoint']}: {shown}{more}")
    lines += [
        "",
        "FastNAS searches only the widths of modules its torch.fx tracer follows (the list above is what it skips:",
    ]
    lines += ["control flow on tensor shapes, spconv, optional inputs). In its finest steps:", ""]
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in rows):
        finest = min((r for r in rows if r["checkpoint"] == checkpoint), key=lambda r: r["channel_divisor"])
        if "max" in finest.get("flops", {}):
            keeps = finest["flops"]["min"] / finest["flops"]["max"]
            verdict = "reachable" if finest.get("satisfiable") else "refused before the search"
            lines.append(
                f"- {checkpoint}, steps of {finest['channel_divisor']}: the smallest subnet keeps {keeps:.1%} of the "
                f"FLOPs; a {TARGET} FLOPs limit is {verdict}."
            )
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastnas_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/protocol-v2/fastnas"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from common.io import atomic_write_text

    torch.set_num_threads(args.threads)
    rows = []
    for checkpoint in CHECKPOINTS:
        for divisor in DIVISORS:
            rows.append(probe(checkpoint, divisor))
            r = rows[-1]
            print(
                f"{checkpoint} divisor {divisor}: hparams {r.get('configurable_hparams')}, satisfiable "
                f"{r.get('satisfiable')}, pruned {r.get('pruned')} {r.get('prune_error', '')}",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "fastnas.json", json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    atomic_write_text(args.out / "fastnas.md", markdown(rows, args.threads))
    print(markdown(rows, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
