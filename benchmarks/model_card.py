"""Write the model card of the shipped tiny checkpoints from the checkpoints themselves.

Everything in the card is read from `checkpoint.json` (the exact training command, seed, steps,
data size) or measured here on the synthetic val split, so the card cannot drift from the weights.

    python -m benchmarks.model_card --threads 2
"""

from __future__ import annotations

import argparse
import json
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


def measure(weights: Path, val_scenes: int) -> dict[str, dict]:
    results = {}
    val = None
    for modality in MODALITIES:
        model, meta = load_checkpoint(weights / f"tiny-{modality}")
        val = val or SyntheticScenes(model.config, "val", num_scenes=val_scenes)
        metrics = evaluate(model, val)
        results[modality] = {
            "metrics": metrics,
            "command": meta.get("command", "unknown"),
            "step": meta.get("step"),
            "seed": model.config.train.seed,
            "train_scenes": model.config.data.train_scenes,
            "batch_size": model.config.train.batch_size,
            "gflops": measured_gflops(model, reference_task(model), example_inputs(model.config, modality=modality)),
            "params": sum(p.numel() for p in model.parameters()),
            "size_mib": (weights / f"tiny-{modality}" / "model.safetensors").stat().st_size / 2**20,
        }
    return results


def card(results: dict[str, dict], val_scenes: int, seconds: float, threads: int) -> str:
    fusion = results["fusion"]["metrics"]
    classes = list(fusion["class_ap"])
    lines = [
        "# Model card: shipped tiny checkpoints",
        "",
        "Trained on this project's synthetic multi-sensor scenes (no external data or weights). Metrics on the",
        f"synthetic val split ({val_scenes} scenes, seed stream 1), measured by `python -m benchmarks.model_card`",
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
            f"{m.get('mIoU', float('nan')):.4f} | "
            + " | ".join(f"{m['class_ap'][c]:.3f}" for c in classes)
            + f" | {r['gflops']:.3f} | {r['params'] / 1e6:.3f} M | {r['size_mib']:.1f} MiB |"
        )
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
        "the setting the AlterMOMA paper studies. `make demo` uses these files; `altermoma pipeline --from-scratch`",
        "retrains all three with the same recipe (bit-identical only with the same thread counts: 1 for the single-modal runs here).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    results = measure(Path(args.weights), args.val_scenes)
    text = card(results, args.val_scenes, time.time() - start, args.threads)
    atomic_write_text(Path(args.weights) / "MODEL_CARD.md", text)
    atomic_write_text(Path(args.weights) / "metrics.json", json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
