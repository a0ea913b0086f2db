import numpy as np
import pytest
import torch

from fusion.config import get_config
from fusion.data.dataset import collate, model_inputs
from fusion.losses import task_loss
from fusion.models.bevfusion import build_model, example_inputs
from fusion.models.lss import BEVPool, frustum_cells


@pytest.mark.parametrize("modality", ["camera", "lidar", "fusion"])
def test_forward_shapes(tiny_config, modality):
    model = build_model(tiny_config, modality).eval()
    out = model(**example_inputs(tiny_config, 2, modality))
    y, x = tiny_config.grid.size_y, tiny_config.grid.size_x
    assert out["heatmap"].shape == (2, len(tiny_config.data.classes), y, x)
    assert out["size"].shape == (2, 3, y, x) and out["rotation"].shape == (2, 2, y, x)
    assert out["bev_map"].shape == (2, len(tiny_config.data.map_classes), y, x)


def test_se_fuser_and_small_preset_run():
    for config in (get_config("tiny", {"model.fuser": "se"}), get_config("small")):
        model = build_model(config).eval()
        with torch.no_grad():
            out = model(**example_inputs(config))
        assert torch.isfinite(out["heatmap"]).all()


def test_bev_pool_methods_agree_with_a_naive_sum():
    rng = np.random.default_rng(0)
    cells = rng.integers(-1, 20, size=300)
    features = torch.from_numpy(rng.normal(size=(2, 5, 300))).float()
    expected = torch.zeros(2, 5, 20)
    for point, cell in enumerate(cells):
        if cell >= 0:
            expected[:, :, cell] += features[:, :, point]
    for method in ("scatter", "cumsum"):
        pooled = BEVPool(cells, 20, method)(features)
        assert torch.allclose(pooled, expected, atol=1e-5), method


def test_frustum_lands_in_front_of_each_camera(tiny_config):
    cells = frustum_cells(tiny_config).reshape(tiny_config.rig.num_cameras, tiny_config.model.num_depth_bins, -1)
    size = tiny_config.grid.size_x
    cx = cells[0][cells[0] >= 0] % size  # camera 0 looks along +x: its points lie ahead of the ego
    assert (cx >= size // 2 - 1).all()
    assert (cells >= 0).mean() > 0.3  # most of the frustum is inside the grid


def test_whole_model_pool_methods_agree(tiny_config):
    model = build_model(tiny_config).eval()
    inputs = example_inputs(tiny_config)
    with torch.no_grad():
        a = model(**inputs)
        model.camera.vtransform.pool.method = "cumsum"
        b = model(**inputs)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_pruning_stand_in_keeps_output_shapes_and_exposes_depth(tiny_config):
    model = build_model(tiny_config).eval()
    inputs = example_inputs(tiny_config)
    with torch.no_grad(), model.pruning_trace():
        traced = model(**inputs)
    assert traced["traced_depth"].shape[1] == tiny_config.model.num_depth_bins
    assert not model.camera.vtransform.pruning_trace
    assert "traced_depth" not in model(**inputs)


def test_partition_and_protected_layers(tiny_config):
    fusion = build_model(tiny_config, "fusion")
    assert fusion.partition() == {
        "camera": ("camera.",),
        "lidar": ("lidar.",),
        "fusion": ("fuser.", "decoder.", "heads."),
    }
    assert build_model(tiny_config, "lidar").partition()["camera"] == ()
    protected = fusion.protected_modules()
    assert fusion.camera.vtransform.depth_conv in protected
    assert fusion.heads.det.branches["heatmap"][-1] in protected


def test_loss_is_finite_and_backpropagates(tiny_config, tiny_samples):
    model = build_model(tiny_config).train()
    batch = collate(tiny_samples[:2])
    loss, parts = task_loss(model(**model_inputs(batch)), batch)
    loss.backward()
    assert set(parts) == {"heatmap", "box", "map"} and torch.isfinite(loss)
    assert model.camera.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.lidar.pfn.conv.weight.grad.abs().sum() > 0
