"""How much redundancy pretraining left in each partition of the shipped fusion model.

AlterMOMA's premise is that a fusion model built from single-modal pretrained backbones carries
redundant parameters, and that AlterEva finds them. This report measures, per partition (camera,
LiDAR, fusion + decoder + heads), what the fused model loses when only that partition is thinned,
with no fine-tuning: the lowest-scoring fraction of the partition's channels (first-order loss
change |sum theta*g|, i.e. SNIP, and channel L2 norm) is zeroed, every other partition is left
intact, and mAP is measured on the val split. Zeroing a channel's coupled weights is equivalent to
removing it (tested in tests/test_compress.py). It also counts dead channels (score exactly 0).

    python -m benchmarks.redundancy --out reports/redundancy --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights" / "tiny-fusion"
PARTS = ("camera", "lidar", "fusion")
RATIOS = (0.25, 0.5, 0.75)
CRITERIA = ("snip", "magnitude")


def partition_masks(graph, scores, tiebreak, part: str, ratio: float) -> list:
    """Bool masks (per group) of the lowest-ranked `ratio` of `part`'s channels, other parts untouched."""
    import math

    import torch

    from compress.structured import global_ranks

    inside = [torch.full_like(s, math.inf) if g.part != part else s for g, s in zip(graph.groups, scores)]
    count = sum(g.channels for g in graph.groups if g.part == part)
    ranks = global_ranks(inside, tiebreak)
    return graph.select(ranks, round(ratio * count), round_to=1, max_group_ratio=0.9)


def measure(checkpoint: Path, val_scenes: int, threads: int, progress: bool = True) -> dict:
    import torch

    from compress.baselines import magnitude_channel_scores
    from compress.oneshot import channel_scores
    from compress.request import PruneRequest
    from compress.structured import ChannelGraph
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes
    from fusion.evaluate import evaluate
    from fusion.models.bevfusion import example_inputs
    from fusion.task import reference_task, scoring_set

    torch.set_num_threads(threads)
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    task = reference_task(model)
    example = example_inputs(model.config)
    graph = ChannelGraph(model, task, example)
    batches = scoring_set(model.config, 4, 2, seed=0)
    magnitude = magnitude_channel_scores(model, graph)
    request = PruneRequest(target_gflops=0.5)
    scores = {
        "snip": channel_scores("snip", model, task, graph, batches, example, request, progress=False),
        "magnitude": magnitude,
    }
    val = SyntheticScenes(model.config, "val", num_scenes=val_scenes, progress=progress)
    reference = evaluate(model, val, progress=False)["mAP"]

    total_flops = graph.total_flops()
    flops = graph.flops()
    rows = []
    for part in PARTS:
        groups = [(g, s) for g, s in zip(graph.groups, scores["snip"]) if g.part == part]
        channels = sum(g.channels for g, _ in groups)
        dead = sum(int((s == 0).sum()) for _, s in groups)
        row = {
            "partition": part,
            "channels": channels,
            "dead_channels": dead,
            "gflops_share": sum(v for k, v in flops.items() if (graph.partition.part_of(k) or "fusion") == part)
            / total_flops,
            "map_after_zeroing": {},
        }
        for criterion in CRITERIA:
            for ratio in RATIOS:
                masks = partition_masks(graph, scores[criterion], magnitude, part, ratio)
                # zeroed on a copy: zero_channels also changes how a LayerNorm normalises, which no state dict restores
                zeroed = copy.copy(graph)
                zeroed.model = copy.deepcopy(model)
                zeroed.zero_channels(masks)
                row["map_after_zeroing"][f"{criterion}@{ratio:g}"] = evaluate(zeroed.model, val, progress=False)["mAP"]
        rows.append(row)
    return {"checkpoint": str(checkpoint), "val_scenes": val_scenes, "unpruned_mAP": reference, "partitions": rows}


def markdown(result: dict, seconds: float, command: str) -> str:
    head = " | ".join(f"{c} {r:.0%}" for c in CRITERIA for r in RATIOS)
    lines = [
        "# Redundancy left per partition (no fine-tuning)",
        "",
        f"`{command}`: {result['val_scenes']} val scenes, {seconds:.0f} s. Unpruned mAP "
        f"{result['unpruned_mAP']:.4f}. Each cell: mAP of the fused model after zeroing the given fraction "
        "of ONE partition's channels (lowest first by the criterion; at most 90% of any group), the other "
        "partitions intact.",
        "",
        f"| partition | channels | dead | GFLOPs share | {head} |",
        "| --- " * (4 + len(CRITERIA) * len(RATIOS)) + "|",
    ]
    for row in result["partitions"]:
        cells = " | ".join(f"{row['map_after_zeroing'][f'{c}@{r:g}']:.4f}" for c in CRITERIA for r in RATIOS)
        lines.append(
            f"| {row['partition']} | {row['channels']} | {row['dead_channels']} | {row['gflops_share']:.2f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from common.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED), help="fusion checkpoint (default: shipped tiny)")
    parser.add_argument("--out", default="reports/redundancy")
    parser.add_argument("--val-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise SystemExit(f"error: checkpoint {checkpoint} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = measure(checkpoint, args.val_scenes, args.threads)
    seconds = time.perf_counter() - start
    command = "python -m benchmarks.redundancy " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(out / "redundancy.json", json.dumps({**result, "seconds": seconds}, indent=2))
    text = markdown(result, seconds, command.strip())
    atomic_write_text(out / "redundancy.md", text)
    print(text)


if __name__ == "__main__":
    main()
