"""The nuScenes data path through the CLI flags: a generated root trains, prunes, fine-tunes and evaluates,
and the results file the evaluation writes is one the devkit accepts, scored the same by both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from altermoma.cli import main
from fusion.data.nuscenes_tables import load_tables
from fusion.nuscenes_eval import devkit_status

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights" / "tiny-fusion"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("nus") / "root"
    args = ["data", "export-nuscenes", "--out", str(out), "--version", "v1.0-mini", "--preset", "nuscenes-tiny"]
    assert main(args + ["--scenes", "2", "--samples-per-scene", "4"]) == 0
    return out


# BEVFusion's parts on the nuScenes layout: Swin camera, sparse voxel encoder (0.375 m = the 1.5 m cell / 4), TransFusion
BEVFUSION_PARTS = [
    f"--set={item}"
    for item in (
        "model.camera_backbone=swin",
        "model.swin_embed_dim=16",
        "model.swin_depths=[2,2,2,2]",
        "model.swin_heads=[1,2,4,8]",
        "model.swin_window=4",
        "model.lidar_encoder=sparse",
        "lidar.voxel_size=[0.375,0.375,0.4]",
        "lidar.max_voxels=6000",
        "model.sparse_base_channels=16",
        "model.sparse_channels=[[16,16,32],[32,32,64],[64,64]]",
        "model.sparse_down_padding=[[1,1,1],[0,1,1]]",
        "model.sparse_out_channels=32",
        "model.head=transfusion",
        "model.transfusion_channels=32",
        "model.transfusion_proposals=64",
        "model.transfusion_ffn=64",
    )
]


@pytest.mark.slow  # every verb on a written nuScenes root; default set: the reader, writer and metric tests
@pytest.mark.parametrize("parts", ["reference", "bevfusion"])
def test_train_prune_finetune_evaluate_on_a_nuscenes_root(root, tmp_path, capsys, parts):
    data = ["--data", "nuscenes", "--dataroot", str(root), "--version", "v1.0-mini"]
    train = ["train", "--modality", "fusion", "--preset", "nuscenes-tiny", "--out", str(tmp_path / "t")]
    train += BEVFUSION_PARTS if parts == "bevfusion" else []
    assert (
        main(train + data + ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.threads=1"]) == 0
    )
    method = "altereva" if parts == "bevfusion" else "snip"  # gradients through the plain sparse backend
    prune = ["prune", "--checkpoint", str(tmp_path / "t"), "--out", str(tmp_path / "p"), "--target-gflops", "0.3"]
    assert main(prune + data + ["--scoring-batches", "1", "--method", method, "--threads", "1"]) == 0
    tune = ["finetune", "--checkpoint", str(tmp_path / "p"), "--out", str(tmp_path / "f"), "--steps", "1"]
    assert main(tune + data + ["--threads", "1"]) == 0
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "f"), "--out", str(tmp_path / "e"), "--threads", "1"]
    assert main(evaluate + data) == 0
    out = capsys.readouterr().out
    assert "mini_val" in out and "results:" in out

    results = json.loads((tmp_path / "e" / "results_nusc.json").read_text())
    tables = load_tables(root, "v1.0-mini")
    assert set(results["results"]) == set(tables.split_sample_tokens("mini_val"))  # exactly the split's samples
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert 0.0 <= metrics["ours"]["mAP"] <= 1.0 and 0.0 <= metrics["ours"]["NDS"] <= 1.0
    if not any(results["results"].values()):  # a model two steps old may detect nothing: the devkit cannot read it
        assert "no boxes" in metrics["devkit"]["skipped"] and metrics["ours"]["mAP"] == 0.0
    elif devkit_status() is None:  # the devkit read the same file and agrees
        for key in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
            assert metrics["devkit"][key] == pytest.approx(metrics["ours"][key], abs=1e-6), key
    else:
        assert "skipped" in metrics["devkit"]


def test_a_synthetic_checkpoint_is_refused_on_nuscenes_data(root, capsys):
    args = ["evaluate", "--checkpoint", str(SHIPPED), "--data", "nuscenes", "--dataroot", str(root)]
    assert main(args) == 2
    assert "not the nuScenes detection classes" in capsys.readouterr().err


def test_the_reference_task_scores_with_each_samples_camera_geometry():
    """Pruning scores on nuScenes must lift with every sample's own calibration, not the preset's ring."""
    import torch

    from fusion.config import get_config
    from fusion.models.bevfusion import build_model
    from fusion.task import reference_task

    model = build_model(get_config("nuscenes-tiny"), "fusion")
    batch = {"images": 0, "pillars": 1, "pillar_map": 2, "frustum_cells": torch.zeros(1, 3)}
    args, kwargs = reference_task(model).arguments(batch)
    assert set(kwargs) == {"images", "pillars", "pillar_map", "frustum_cells"}
    lidar_only = build_model(get_config("nuscenes-tiny"), "lidar")
    assert "frustum_cells" not in reference_task(lidar_only).arguments(batch)[1]
