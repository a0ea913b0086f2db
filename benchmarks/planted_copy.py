"""The planted redundant copy: a linear fusion model whose redundancy is known in closed form.

Camera channel 0 and LiDAR channel 0 both carry the shared latent z_s (a redundant copy: the fuser
gives each half of z_s's weight); camera channel 1 carries a camera-only latent whose weight makes its
SNIP score equal channel 0's in expectation. Masking the LiDAR leaves camera channel 0 alone with z_s,
so reactivation moves it far more than its non-redundant twin: an estimator that finds cross-modal
redundancy must rank the copy last among the camera's channels, where SNIP cannot tell it from the twin.

Protocol v2's mechanism gate (reports/protocol-v2/PROTOCOL.md) runs each candidate estimator here, as
configured, on seeds 0, 1, 2:

    python -m benchmarks.planted_copy --methods altereva,altereva-paper,altereva-signed
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from common.task import Task

SHARED = 2.0  # weight of z_s in the target: each modality's copy carries half
TWIN = math.sqrt(2.0)  # camera-only channel 1: |E[h dL/dh]| equals the copy's (SNIP cannot tell them apart)
CAMERA_ONLY = (TWIN, 0.5, 0.3)
LIDAR_ONLY = (1.2, 0.6, 0.4)
SHRINK = 0.8  # the fuser sits at 0.8 x its optimum (as weight decay leaves it), so gradients are not zero
COPY = 0  # the camera channel that duplicates a LiDAR one
GATE_SEEDS = (0, 1, 2)
GATE_BATCHES, GATE_BATCH_SIZE = 4, 8192  # large batches: the D vs D_B noise is small next to the signal


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.camera = nn.Linear(4, 4)
        self.lidar = nn.Linear(4, 4)
        self.fuser = nn.Linear(8, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.fuser(torch.cat([self.camera(camera), self.lidar(lidar)], dim=-1))


def toy() -> tuple[Toy, Task]:
    model = Toy()
    with torch.no_grad():
        for encoder in (model.camera, model.lidar):
            encoder.weight.copy_(torch.eye(4))
            encoder.bias.zero_()
        weights = [SHARED / 2, *CAMERA_ONLY, SHARED / 2, *LIDAR_ONLY]
        model.fuser.weight.copy_(SHRINK * torch.tensor([weights]))
        model.fuser.bias.zero_()
    task = Task(
        partition={"camera": "camera", "lidar": "lidar", "fusion": "fuser"},
        loss=lambda out, batch: ((out.squeeze(-1) - batch["y"]) ** 2).mean(),
        inputs=lambda batch: (batch["camera"], batch["lidar"]),
    )
    return model, task


def toy_batches(count: int = 4, size: int = 512, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """z = (z_s, camera-only x3, LiDAR-only x3) ~ N(0, 1); the camera sees (z_s, c), the LiDAR (z_s, l)."""
    generator = torch.Generator().manual_seed(seed)
    coefficients = torch.tensor([SHARED, *CAMERA_ONLY, *LIDAR_ONLY])
    batches = []
    for _ in range(count):
        z = torch.randn(size, 7, generator=generator)
        batches.append({"camera": z[:, :4], "lidar": torch.cat([z[:, :1], z[:, 4:]], 1), "y": z @ coefficients})
    return batches


def camera_scores(request, batches) -> torch.Tensor:
    """The camera's four channel scores under `request` (a PruneRequest naming its method and options)."""
    from compress.oneshot import channel_scores
    from compress.structured import ChannelGraph

    model, task = toy()
    graph = ChannelGraph(model, task, batches[0])
    scores = channel_scores(request.method, model, task, graph, batches, batches[0], request, progress=False)
    camera = [s for s, g in zip(scores, graph.groups) if g.part == "camera"]
    assert len(camera) == 1 and camera[0].numel() == 4
    return camera[0]


def gate(method: str) -> dict:
    """Does `method` (an `altermoma compare` name) rank the planted copy last on every gate seed?"""
    import dataclasses

    from altermoma.compare import RunSpec, Settings, prune_request

    request = prune_request(RunSpec(method, "structured", 0.5, 0), Settings(checkpoint=""))
    request = dataclasses.replace(request, target_gflops=None, channel_ratio=0.25, round_to=1)
    seeds = {}
    for seed in GATE_SEEDS:
        request = dataclasses.replace(request, seed=seed)
        scores = camera_scores(request, toy_batches(GATE_BATCHES, GATE_BATCH_SIZE, seed))
        seeds[str(seed)] = {"last": int(scores.argmin()), "scores": [float(s) for s in scores / scores.max()]}
    return {"method": method, "copy_last": all(s["last"] == COPY for s in seeds.values()), "seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planted_copy", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="comma-separated `altermoma compare` method names")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from altermoma.compare import ALTEREVA_VARIANTS, METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in (*METHODS, *ALTEREVA_VARIANTS)]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results = [gate(m) for m in methods]
    for r in results:
        lasts = ", ".join(f"seed {k}: {v['last']}" for k, v in r["seeds"].items())
        print(
            f"{r['method']}: copy last {'on every seed' if r['copy_last'] else 'NOT on every seed'} (last channel: {lasts})"
        )
    if args.out:
        from common.io import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"threads": 1, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
