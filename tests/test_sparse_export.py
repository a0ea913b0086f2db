"""Exported sparse voxel encoders have static shapes: rulebooks padded to fixed rows per level, and parity and
metrics through ONNX Runtime on models whose inputs nest (a dict of rulebooks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from export.onnx import export_onnx, parity_report
from fusion.config import ConfigError, get_config
from fusion.data.sparse_inputs import graph_rows, level_rows, pad_inputs, strided_keys


def _batch(rows: dict[str, int], batch: int = 1) -> dict:
    """Rulebook-shaped inputs with `rows` real output sites per level (-1 rows beyond none here)."""
    config = get_config("bevfusion-tiny")
    books = {}
    for key, n in rows.items():
        books[f"{key}.coords"] = torch.zeros(batch, n, 3, dtype=torch.long)
        books[f"{key}.gather"] = torch.zeros(batch, n, 27, dtype=torch.long)
    return {"voxels": torch.zeros(batch, 5, 4), "rulebooks": books}, config


def test_graph_rows_come_from_the_config_or_from_the_example_cloud_with_headroom():
    from fusion.data.sparse_inputs import collate_rulebooks, synthetic_cloud, voxel_inputs
    from fusion.models.bevfusion import example_inputs

    config = get_config("bevfusion-tiny")
    assert strided_keys(config) == ["spconv1", "spconv2", "spconv_down2"]
    rows, origin = graph_rows(config)
    assert rows == dict(zip(strided_keys(config), config.lidar.sparse_rows)) and origin == "lidar.sparse_rows"
    # every graph exported from example_inputs has these rows
    assert level_rows(example_inputs(config, 1)["rulebooks"], config) != rows
    assert {k: example_inputs(config, 1)["rulebooks"][f"{k}.coords"].shape[1] for k in rows} == rows
    derived = dataclasses.replace(config, lidar=dataclasses.replace(config.lidar, sparse_rows=()))
    sites = level_rows(collate_rulebooks([voxel_inputs(synthetic_cloud(config, 0), config)]), config)
    rows, origin = graph_rows(derived)
    assert rows == {k: -(-int(n * 1.25) // 64) * 64 for k, n in sites.items()} and "+25%" in origin
    assert all(r >= 1.25 * sites[k] and r % 64 == 0 for k, r in rows.items())


def test_padding_grows_every_array_of_a_level_and_a_denser_cloud_is_refused():
    inputs, config = _batch({"spconv1": 10, "spconv2": 7, "spconv_down2": 3}, batch=2)
    inputs["rulebooks"]["spconv1.coords"][1, 6:] = -1  # the second sample has 6 sites: batch padding
    rows = {"spconv1": 16, "spconv2": 8, "spconv_down2": 4}
    padded = pad_inputs(inputs, rows, config)
    books = padded["rulebooks"]
    assert books["spconv1.coords"].shape == (2, 16, 3) and books["spconv1.gather"].shape == (2, 16, 27)
    assert books["spconv2.coords"].shape == (2, 8, 3) and books["spconv_down2.gather"].shape == (2, 4, 27)
    assert (books["spconv1.coords"][:, 10:] == -1).all() and torch.equal(
        books["spconv1.coords"][:, :10], inputs["rulebooks"]["spconv1.coords"]
    )
    assert level_rows(books, config) == {"spconv1": 10, "spconv2": 7, "spconv_down2": 3}
    assert padded["voxels"] is inputs["voxels"]
    with pytest.raises(ValueError, match=r"spconv2: 7 > 6\): raise lidar.sparse_rows"):
        pad_inputs(inputs, {**rows, "spconv2": 6}, config)
    assert pad_inputs({"images": inputs["voxels"]}, rows, config) == {"images": inputs["voxels"]}


def test_sparse_rows_need_one_positive_count_per_strided_conv():
    with pytest.raises(
        ConfigError, match=r"lidar.sparse_rows needs one positive row count per strided sparse conv \(3\)"
    ):
        get_config("bevfusion-tiny", {"lidar.sparse_rows": [64, 64]})


class NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, points: torch.Tensor, extra: dict) -> dict:
        return {"out": self.proj(points) + extra["shift"].unsqueeze(-1) * extra["scale"]}


def test_parity_metrics_runners_take_the_nested_inputs_the_model_takes(tmp_path):
    """A metrics function calls its runner with the model's own (nested) inputs: PyTorch and the ORT graph
    answer the same, because the runner flattens them by the export's naming scheme."""
    torch.manual_seed(0)
    model = NestedNet().eval()
    samples = [
        {"points": torch.randn(1, 5, 4), "extra": {"shift": torch.randn(1, 5), "scale": torch.rand(1, 5, 1)}}
        for _ in range(3)
    ]
    export_onnx(model, samples[0], tmp_path / "n.onnx", simplify=False)
    seen = []

    def metrics(run):
        out = [run(s)["out"] for s in samples]  # nested, as a data loader gives them
        seen.append(out)
        return {"sum": float(sum(o.sum() for o in out))}

    report = parity_report(model, tmp_path / "n.onnx", samples, metrics_fn=metrics)
    assert report["ok"] and report["single"]["outputs"]["out"]["max_abs"] <= 1e-5
    assert report["metrics"]["torch"]["sum"] == pytest.approx(report["metrics"]["single"]["sum"], abs=1e-4)
    with torch.no_grad():
        want = model(**samples[2])["out"].numpy()
    assert np.abs(seen[0][2].numpy() - want).max() == 0 and np.abs(seen[1][2].numpy() - want).max() <= 1e-5


def test_bench_feeds_nested_stage_tensors_by_their_graph_names():
    """`altermoma bench` times ONNX Runtime on a forward pass's stage tensors, rulebooks nested among them."""
    from altermoma.bench import _numpy

    voxels, gather = torch.rand(1, 5, 4), torch.arange(6).view(1, 2, 3)
    arrays = _numpy({"voxels": voxels, "rulebooks": {"subm1.gather": gather}, "lidar_bev": voxels * 2})
    assert sorted(arrays) == ["lidar_bev", "rulebooks.subm1_gather", "voxels"]
    assert np.array_equal(arrays["rulebooks.subm1_gather"], gather.numpy()) and arrays["voxels"].dtype == np.float32
