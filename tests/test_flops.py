"""GFLOPs per stage: the FlopCounterMode convention (2 x MACs), stage sums, and the r50 preset's size."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from altermoma.flops import main, split_stage_flops, stage_flops
from fusion.config import get_config
from fusion.models.bevfusion import build_model, example_inputs

torch.set_num_threads(1)


def _conv_macs(c_in: int, c_out: int, k: int, h_out: int, w_out: int, groups: int = 1) -> int:
    return c_out * h_out * w_out * (c_in // groups) * k * k


def test_flop_counter_counts_two_flops_per_mac():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # bias adds are not counted
    x = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    macs = 2 * _conv_macs(3, 8, 3, 16, 16)  # batch 2
    assert counter.get_total_flops() == 2 * macs
    result = stage_flops(conv, {"input": x})  # a module with no known stage: everything is "other"
    assert result["total"]["flops"] == 2 * macs == result["other"]["flops"]
    assert result["total"]["gflops"] == pytest.approx(2 * macs / 1e9)
    assert result["total"]["params"] == 3 * 8 * 9 + 8


def test_strided_and_grouped_conv_hand_count():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False)
    x = torch.randn(1, 16, 20, 20)
    assert stage_flops(conv, {"input": x})["total"]["flops"] == 2 * _conv_macs(16, 32, 3, 10, 10, groups=4)


@pytest.mark.parametrize("modality", ["fusion", "camera", "lidar"])
def test_stages_sum_to_total(tiny_config, modality):
    model = build_model(tiny_config, modality).eval()
    inputs = example_inputs(tiny_config, 1, modality)
    result = stage_flops(model, inputs)
    stages = {k: v for k, v in result.items() if k != "total"}
    assert "other" not in stages  # every FLOP and parameter belongs to a named stage
    assert sum(v["flops"] for v in stages.values()) == result["total"]["flops"]
    assert sum(v["params"] for v in stages.values()) == result["total"]["params"]
    assert result["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert all(v["flops"] > 0 and v["params"] > 0 for v in stages.values())
    expected = {
        "fusion": ["camera", "view_transform", "lidar", "fuser", "decoder", "heads"],
        "camera": ["camera", "view_transform", "decoder", "heads"],
        "lidar": ["lidar", "decoder", "heads"],
    }[modality]
    assert list(stages) == expected
    split = split_stage_flops(model, inputs)
    assert split["total"]["flops"] == result["total"]["flops"]
    assert sum(v["flops"] for k, v in split.items() if k != "total") == split["total"]["flops"]
    assert sum(v["params"] for k, v in split.items() if k != "total") == split["total"]["params"]


def test_tiny_hand_count_and_meta_device(tiny_config):
    model = build_model(tiny_config, "fusion").eval()
    inputs = example_inputs(tiny_config, 1, "fusion")
    real = stage_flops(model, inputs)
    # LiDAR stem: conv-BN-ReLU 32 -> 32, 3x3, on the 64 x 64 BEV canvas.
    stem = 2 * _conv_macs(32, 32, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        model.lidar.stem(torch.zeros(1, 32, 64, 64))
    assert counter.get_total_flops() == stem
    assert real["total"]["gflops"] > 1.0
    assert stage_flops(model, inputs, device="meta") == real  # shapes alone give the same count
    assert next(model.parameters()).device.type == "cpu"  # the meta count used a copy


def test_r50_size():
    """r50 counted on the meta device (shapes only, about a second).

    Expected sizes, by hand: ResNet-50 is 4.09 GMACs at 224x224; six 256x704 images are
    6 x 256*704/224^2 = 21.6 of those, about 88 GMACs = 177 GFLOPs before the FPN, so the camera stage
    lies in [177, 240]. The LiDAR stage is exact: the pillar MLP (9 -> 64 over 30000 x 20 points), the
    stem (64 -> 256, 3x3) and 3 residual blocks (6 convs 256 -> 256, 3x3) on the 180 x 180 canvas.
    The whole model must then be several hundred GFLOPs: [500, 900].
    """
    config = get_config("r50")
    model = build_model(config, "fusion")
    result = stage_flops(model, example_inputs(config, 1, "fusion"), device="meta")
    lidar = 2 * (30000 * 20 * 9 * 64 + _conv_macs(64, 256, 3, 180, 180) + 6 * _conv_macs(256, 256, 3, 180, 180))
    assert result["lidar"]["flops"] == lidar
    assert 177 <= result["camera"]["gflops"] <= 240
    assert 500 <= result["total"]["gflops"] <= 900
    assert 30e6 <= result["total"]["params"] <= 40e6  # ResNet-50 without its classifier is 23.5 M


@pytest.mark.slow
def test_r50_real_forward_matches_meta():
    """A real r50 forward on one CPU thread: about 12 s and 2 GB peak RSS."""
    config = get_config("r50")
    model = build_model(config, "fusion").eval()
    inputs = example_inputs(config, 1, "fusion")
    assert stage_flops(model, inputs) == stage_flops(model, inputs, device="meta")


def test_main_writes_reports(tmp_path, capsys):
    assert main(["--preset", "tiny", "--meta", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "flops-tiny.json").read_text())
    assert record["stages"]["total"]["gflops"] > 0 and record["preset"] == "tiny"
    assert "| total |" in (tmp_path / "flops-tiny.md").read_text()
    assert "GFLOPs" in capsys.readouterr().out
