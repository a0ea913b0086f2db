"""Write the model card of the shipped tiny checkpoints from the checkpoints themselves.

Everything in the card is read from `checkpoint.json` (the exact training command, seed, steps,
data size) or measured here on the synthetic val split, so the card cannot drift from the weights.

    python -m benchmarks.model_card --threads 2
    python -m benchmarks.model_card --prefix tiny-balanced --threads 2   # -> MODEL_CARD_BALANCED.md

`--prefix` picks the checkpoint family `<prefix>-{camera,lidar,fusion}`; a family other than `tiny` gets its
own card (`MODEL_CARD_<REST>.md`) with its modality ratios, and leaves the demo's card and metrics.json alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.io import atomic_write_text
from compress.oneshot import measured_gflops
from fusion.checkpoint import load_checkpoint
from fusion.data.dataset import SyntheticScenes
from fusion.evaluate import evaluate
from fusion.models.bevfusion import example_inputs
from fusion.task import reference_task

WEIGHTS = Path(__file__).resolve().parent.parent / "fusion" / "weights"
MODALITIES = ("camera", "lidar", "fusion")
DEFAULT_PREFIX = "tiny"
# BEVFusion on nuScenes (camera-only 35.6, LiDAR-only 64.7, fusion 68.5 mAP), the nuScenes-balanced target (issue 13).
TARGET_RATIOS = {"lidar": (0.90, 0.96), "camera": (0.45, 0.60)}


def card_path(weights: Path, prefix: str) -> Path:
    """`MODEL_CARD.md` for the demo's `tiny` family; `MODEL_CARD_BALANCED.md` for `tiny-balanced`, and so on."""
    if prefix == DEFAULT_PREFIX:
        return weights / "MODEL_CARD.md"
    rest = prefix.removeprefix(f"{DEFAULT_PREFIX}-")
    return weights / f"MODEL_CARD_{rest.upper().replace('-', '_')}.md"


def measure(weights: Path, val_scenes: int, prefix: str = DEFAULT_PREFIX) -> dict[str, dict]:
    results = {}
    # each model on the val split of its own data config, rendered once per config
    vals: dict[str, SyntheticScenes] = {}
    for modality in MODALITIES:
        model, meta = load_checkpoint(weights / f"{prefix}-{modality}")
        key = json.dumps({k: v for k, v in model.config.to_dict().items() if k != "train"}, sort_keys=True)
        if key not in vals:
            vals[key] = SyntheticScenes(model.config, "val", num_scenes=val_scenes)
        metrics = evaluate(model, vals[key])
        results[modality] = {
            "metrics": metrics,
            "command": meta.get("command", "unknown"),
            "step": meta.get("step"),
            "seed": model.config.train.seed,
            "train_scenes": model.config.data.train_scenes,
            "batch_size": model.config.train.batch_size,
            "gflops": measured_gflops(model, reference_task(model), example_inputs(model.config, modality=modality)),
            "params": sum(p.numel() for p in model.parameters()),
            "size_mib": (weights / f"{prefix}-{modality}" / "model.safetensors").stat().st_size / 2**20,
        }
    return results


def modality_ratios(results: dict[str, dict]) -> dict[str, float]:
    """Single-modal mAP over fusion mAP: how much of the fused model each sensor reaches alone."""
    fusion = results["fusion"]["metrics"]["mAP"]
    return {m: results[m]["metrics"]["mAP"] / fusion for m in ("camera", "lidar")}


def card(results: dict[str, dict], val_scenes: int, seconds: float, threads: int, prefix: str = DEFAULT_PREFIX) -> str:
    fusion = results["fusion"]["metrics"]
    classes = list(fusion["class_ap"])
    command = "python -m benchmarks.model_card" + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}")
    lines = [
        f"# Model card: shipped {prefix} checkpoints",
        "",
        "Trained on this project's synthetic multi-sensor scenes (no external data or weights). Metrics on the",
        f"synthetic val split ({val_scenes} scenes, seed stream 1), measured by `{command}`",
        f"({seconds:.0f} s, {threads} threads). NDS here uses mATE/mASE/mAOE only (no velocity or attributes): it is",
        "not comparable with nuScenes NDS.",
        "",
        "| model | mAP | NDS | mATE | mASE | mAOE | mIoU | "
        + " | ".join(f"AP {c}" for c in classes)
        + " | GFLOPs | params | file |",
        "| --- " * (10 + len(classes)) + "|",
    ]
    for modality in MODALITIES:
        r, m = results[modality], results[modality]["metrics"]
        lines.append(
            f"| {modality} | {m['mAP']:.4f} | {m['NDS']:.4f} | {m['mATE']:.3f} | {m['mASE']:.3f} | {m['mAOE']:.3f} | "
            + (f"{m['mIoU']:.4f} | " if "mIoU" in m else "- | ")  # no BEV map head: no mIoU
            + " | ".join(f"{m['class_ap'][c]:.3f}" for c in classes)
            + f" | {r['gflops']:.3f} | {r['params'] / 1e6:.3f} M | {r['size_mib']:.1f} MiB |"
        )
    if prefix != DEFAULT_PREFIX:
        ratios = modality_ratios(results)
        lines += ["", "Modality balance (single-modal mAP / fusion mAP; target: BEVFusion on nuScenes, issue 13):", ""]
        for modality, (low, high) in TARGET_RATIOS.items():
            verdict = "in range" if low <= ratios[modality] <= high else "OUT of range"
            lines.append(f"- {modality}/fusion {ratios[modality]:.3f} (target {low:.2f}-{high:.2f}: {verdict})")
    lines += ["", "## How each was trained", ""]
    for modality in MODALITIES:
        r = results[modality]
        lines.append(
            f"- **{modality}**: `{r['command']}` (seed {r['seed']}, {r['step']} steps of batch {r['batch_size']}, "
            f"{r['train_scenes']} training scenes, seed stream 0)"
        )
    lines += [
        "",
        "The fusion model starts from both single-modal checkpoints (LiDAR decoder and heads, camera branch),",
    ]
    if prefix == DEFAULT_PREFIX:
        lines += [
            "the setting the AlterMOMA paper studies. `make demo` uses these files; `altermoma pipeline --from-scratch`",
            "retrains all three with the same recipe (bit-identical only with the same thread counts: 1 for the single-modal runs here).",
        ]
    else:
        lines += [
            "the setting the AlterMOMA paper studies. Each command is the one recorded in the checkpoint's",
            "`checkpoint.json`, with its paths and `--set` values as they were at training time; it retrains the",
            "checkpoint bit for bit only with the same thread counts.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="checkpoint family <prefix>-{camera,lidar,fusion} (e.g. tiny-balanced)"
    )
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    missing = [
        f"{args.prefix}-{m}" for m in MODALITIES if not (weights / f"{args.prefix}-{m}" / "checkpoint.json").is_file()
    ]
    if args.val_scenes < 1 or args.threads < 1 or missing:
        problem = (
            f"no checkpoint {', '.join(missing)} in {weights}" if missing else "--val-scenes and --threads must be >= 1"
        )
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    start = time.time()
    results = measure(weights, args.val_scenes, args.prefix)
    text = card(results, args.val_scenes, time.time() - start, args.threads, args.prefix)
    atomic_write_text(card_path(weights, args.prefix), text)
    if args.prefix == DEFAULT_PREFIX:  # the demo's metrics file; other families keep theirs in the card
        atomic_write_text(weights / "metrics.json", json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
