"""Sparse convolutions of the plain-PyTorch backend (`common.sparse`) through `prune`: it has a backward
pass on CPU, so gradient methods run here too. Counted from the rulebooks' active pairs (not the padded
gather the backend multiplies), pruned through the `.dense().view(N, C * D, H, W)` fold, reloaded exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altermoma
from fusion.models.sparse_encoder import SparseEncoder

torch.set_num_threads(1)
SHAPE = (9, 32, 32)


class PlainSparseFusion(nn.Module):
    def __init__(self, camera: int = 16):
        super().__init__()
        self.camera = nn.Sequential(
            nn.Conv2d(3, camera, 3, 2, 1), nn.BatchNorm2d(camera), nn.ReLU(), nn.Conv2d(camera, camera, 3, 1, 1)
        )
        self.lidar = SparseEncoder(
            4,
            SHAPE,
            base_channels=8,
            output_channels=16,
            encoder_channels=((8, 16), (16, 16)),
            encoder_paddings=((1, 1), (1, 1)),
            backend="plain",
        )
        self.fuser = nn.Sequential(
            nn.Conv2d(camera + self.lidar.out_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        bev = self.lidar(batch["voxels"], batch["coors"], batch["images"].shape[0], batch["rulebooks"])
        camera = F.adaptive_avg_pool2d(self.camera(batch["images"]), bev.shape[-1])
        return self.head(self.fuser(torch.cat([camera, bev], 1)))


def make_batch(seed: int, encoder: SparseEncoder) -> dict:
    g = torch.Generator().manual_seed(seed)
    sites = torch.cat(
        [
            torch.randint(0, 2, (400, 1), generator=g),
            torch.randint(0, 9, (400, 1), generator=g),
            torch.randint(0, 32, (400, 2), generator=g),
        ],
        1,
    )
    coors = torch.unique(sites, dim=0).int()
    return {
        "images": torch.randn(2, 3, 32, 32, generator=g),
        "voxels": torch.randn(len(coors), 4, generator=g),
        "coors": coors,
        "rulebooks": encoder.build_rulebooks(coors, 2),
        "target": torch.randn(2, 3, 16, 16, generator=g),
    }


TASK = altermoma.Task(
    partition={"camera": ["camera"], "lidar": ["lidar"], "fusion": ["fuser", "head"]},
    loss=lambda out, batch: (out - batch["target"]).pow(2).mean(),
    inputs=lambda batch: ({k: batch[k] for k in ("images", "voxels", "coors", "rulebooks")},),
)


SLOW_CASES = {"test_plain_sparse_encoder_prunes_exactly[snip]"}  # default set: magnitude and AlterEva's gradients


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PlainSparseFusion().eval()
    return model, [make_batch(i, model.lidar) for i in range(2)]


@pytest.mark.parametrize("method", ["magnitude", "snip", "altereva"])
def test_plain_sparse_encoder_prunes_exactly(setup, method, tmp_path):
    base, batches = setup
    model = copy.deepcopy(base)
    report = altermoma.prune(model, TASK, batches, method=method, target_gflops=0.5, round_to=4, progress=False)
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    assert report["zero_then_prune_error"] <= 1e-4
    assert report["partitions"]["lidar"]["kept_ratio"] < 1.0
    assert report["unpruned_groups"] == [] and report["left_whole"]["modules"] == []
    # sparse FLOPs are the rulebooks' real pairs, not the padded gather the backend multiplies
    layers = {n: m for n, m in base.named_modules() if type(m).__name__ in ("SubMConv3d", "SparseConv3d")}
    rulebooks = batches[0]["rulebooks"]
    expected = sum(
        2.0 * rulebooks[m.indice_key].active_pairs() * m.in_channels * m.out_channels for m in layers.values()
    )
    assert report["flop_counting"]["sparse_gflops"] == pytest.approx(expected / 1e9)
    with torch.no_grad():
        pruned = TASK.forward(model.eval(), batches[1])
    altermoma.save_pruned(model, tmp_path / "p", report)
    reloaded = altermoma.load_pruned(PlainSparseFusion(), tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(TASK.forward(reloaded, batches[1]), pruned)


def test_the_depth_fold_beside_a_camera_of_another_width_prunes_exactly():
    """The fold hands the concat C x D channels: the concat's real sizes, recorded while tracing, keep camera
    channels off the LiDAR ones (torch-pruning alone inferred C and left `conv_out` whole, or cut the camera)."""
    torch.manual_seed(0)
    model = PlainSparseFusion(camera=24).eval()
    batches = [make_batch(i, model.lidar) for i in range(2)]
    report = altermoma.prune(model, TASK, batches, method="magnitude", target_gflops=0.5, round_to=4, progress=False)
    assert report["unpruned_groups"] == [], report["unpruned_groups"]
    assert report["zero_then_prune_error"] <= 1e-4
    assert "lidar.conv_out.0" in report["widths"]
