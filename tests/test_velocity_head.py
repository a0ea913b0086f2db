"""CenterPoint's velocity branch (ModelConfig.velocity_head): on for the nuScenes presets only, decoded at the
heatmap peaks, supervised by an L1 term that skips objects of unknown velocity, rotated to global in results."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fusion.config import BEVGrid, get_config
from fusion.data.dataset import collate, model_inputs
from fusion.data.nuscenes import NuScenesDataset
from fusion.data.targets import REGRESSION_CHANNELS, build_targets
from fusion.losses import REGRESSION_WEIGHT, VELOCITY_CODE_WEIGHT, task_loss, velocity_loss
from fusion.models.bevfusion import build_model, example_inputs
from fusion.models.heads import decode_boxes


@pytest.fixture(scope="module")
def config():
    return get_config("nuscenes-tiny")


@pytest.fixture(scope="module")
def root(tmp_path_factory, config):
    from fusion.data.nuscenes_write import write_nuscenes_root

    out = tmp_path_factory.mktemp("velocity") / "root"
    write_nuscenes_root(out, scenes=2, config=config, samples_per_scene=3, progress=False)
    return out


@pytest.fixture(scope="module")
def train_set(config, root):
    return NuScenesDataset(config, root, "v1.0-mini", "mini_train")


def test_flag_is_on_only_for_the_nuscenes_presets():
    for preset in ("tiny", "tiny-balanced", "small", "r50"):
        assert get_config(preset).model.velocity_head is False
    for preset in ("nuscenes", "nuscenes-tiny"):
        assert get_config(preset).model.velocity_head is True


def test_branch_exists_only_with_the_flag(config):
    torch.manual_seed(0)
    with_branch = build_model(config, "lidar")
    torch.manual_seed(0)
    without = build_model(get_config("nuscenes-tiny", {"model.velocity_head": False}), "lidar")
    assert "velocity" in with_branch.heads.det.branches and "velocity" not in without.heads.det.branches
    # The branch is built last: every other tensor initialises exactly as without it.
    own, other = with_branch.state_dict(), without.state_dict()
    assert set(own) - set(other) == {k for k in own if k.startswith("heads.det.branches.velocity.")}
    assert all(torch.equal(own[k], other[k]) for k in other)
    # Its output conv is protected from pruning like every other head output.
    assert with_branch.heads.det.branches["velocity"][-1] in with_branch.protected_modules()

    inputs = example_inputs(config, 1, "lidar")
    with torch.no_grad():
        out = with_branch.eval()(**inputs)
        assert out["velocity"].shape == (1, 2, config.grid.size_y, config.grid.size_x)
        assert "velocity" not in without.eval()(**inputs)
    assert "velocity" not in build_model(get_config("tiny"), "lidar").heads.det.branches


def _planted_outputs(grid: BEVGrid, peaks: list[tuple[int, int, int]], velocities: list[tuple[float, float]]):
    """Head outputs with a confident peak at each (class, y, x) and the velocity map holding `velocities` there."""
    heat = torch.full((1, 3, grid.size_y, grid.size_x), -10.0)
    velocity = torch.randn(1, 2, grid.size_y, grid.size_x)  # noise elsewhere: decoding must read the peak cell
    for (label, y, x), v in zip(peaks, velocities):
        heat[0, label, y, x] = 5.0
        velocity[0, :, y, x] = torch.tensor(v)
    y, x = grid.size_y, grid.size_x
    return {
        "heatmap": heat,
        "offset": torch.full((1, 2, y, x), 0.5),
        "height": torch.zeros(1, 1, y, x),
        "size": torch.zeros(1, 3, y, x),
        "rotation": torch.cat([torch.zeros(1, 1, y, x), torch.ones(1, 1, y, x)], dim=1),  # sin 0, cos 1
        "velocity": velocity,
    }


def test_decode_returns_the_planted_velocities():
    grid = BEVGrid(x_range=(-8.0, 8.0), y_range=(-8.0, 8.0), z_range=(-3.0, 3.0), cell=1.0)
    peaks = [(0, 2, 3), (2, 10, 12), (1, 7, 7)]
    planted = [(1.5, -2.0), (-7.25, 0.5), (0.0, 3.0)]
    outputs = _planted_outputs(grid, peaks, planted)
    (decoded,) = decode_boxes(outputs, grid)
    assert decoded["velocities"].shape == (3, 2) and decoded["velocities"].dtype == np.float32
    for (label, y, x), v in zip(peaks, planted):
        # The box at that cell (centre = cell + offset 0.5) carries that cell's velocity.
        i = int(np.flatnonzero(np.isclose(decoded["boxes"][:, 0], -8.0 + x + 0.5) & (decoded["labels"] == label))[0])
        assert decoded["boxes"][i, 1] == pytest.approx(-8.0 + y + 0.5)
        np.testing.assert_array_equal(decoded["velocities"][i], np.float32(v))
    without = {k: v for k, v in outputs.items() if k != "velocity"}
    (plain,) = decode_boxes(without, grid)
    assert "velocities" not in plain
    np.testing.assert_array_equal(plain["boxes"], decoded["boxes"])


def test_targets_mask_unknown_velocities():
    grid = BEVGrid(x_range=(-8.0, 8.0), y_range=(-8.0, 8.0), z_range=(-3.0, 3.0), cell=1.0)
    boxes = np.array(
        [[0.2, 0.3, 0.0, 4.0, 2.0, 1.5, 0.0], [3.0, -4.0, 0.0, 4.0, 2.0, 1.5, 0.0], [20.0, 0.0, 0.0, 4, 2, 1.5, 0]],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 2])
    velocities = np.array([[1.0, -2.0], [np.nan, np.nan], [3.0, 3.0]], dtype=np.float32)
    targets = build_targets(boxes, labels, grid, 3, 5, velocities)
    np.testing.assert_array_equal(targets["target_velocity"][:3], [[1.0, -2.0], [0.0, 0.0], [3.0, 3.0]])
    # Unknown (NaN) and off-grid objects, and padding, are not supervised.
    np.testing.assert_array_equal(targets["target_velocity_mask"], [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(targets["target_mask"], [1.0, 1.0, 0.0, 0.0, 0.0])
    assert "target_velocity" not in build_targets(boxes, labels, grid, 3, 5)


def test_velocity_loss_zero_at_the_targets_positive_elsewhere_and_masked_objects_ignored():
    g = torch.Generator().manual_seed(0)
    height, width, k = 6, 7, 4
    index = torch.tensor([[3, 10, 25, 40], [0, 5, 6, 41]])
    target = torch.randn(2, k, 2, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    velocity = torch.randn(2, 2, height * width, generator=g)
    for b in range(2):
        velocity[b][:, index[b]] = target[b].T
    velocity = velocity.view(2, 2, height, width)
    assert velocity_loss(velocity, index, target, mask).item() == 0.0

    # A masked object's prediction and target do not count.
    moved = velocity.clone().view(2, 2, -1)
    moved[0, :, 25] += 5.0
    moved[1, :, 5] -= 3.0
    other_target = target.clone()
    other_target[1, 2] = 100.0
    assert velocity_loss(moved.view_as(velocity), index, other_target, mask).item() == 0.0

    # An error of 1 m/s on vx of one supervised object out of 4: L1 sum / 4 objects.
    wrong = velocity.clone().view(2, 2, -1)
    wrong[0, 0, 40] += 1.0
    assert velocity_loss(wrong.view_as(velocity), index, target, mask).item() == pytest.approx(1.0 / 4, rel=1e-6)


def test_task_loss_adds_the_weighted_term_only_with_branch_and_targets(config, train_set):
    batch = collate([train_set[0], train_set[1]])
    assert batch["target_velocity"].shape == (2, config.data.max_objects, 2)
    # The reader's velocity targets are the item's velocities where known, at the supervised objects.
    supervised = batch["target_velocity_mask"] > 0
    assert supervised.any()
    assert torch.equal(batch["target_velocity"][supervised], batch["velocities"][supervised])
    assert (batch["target_velocity_mask"] <= batch["target_mask"]).all()

    torch.manual_seed(0)
    model = build_model(config, "fusion").eval()
    with torch.no_grad():
        outputs = model(**model_inputs(batch))
        _, parts = task_loss(outputs, batch)
        expected = velocity_loss(
            outputs["velocity"], batch["target_index"], batch["target_velocity"], batch["target_velocity_mask"]
        )
        assert parts["velocity"] == pytest.approx(
            float(REGRESSION_WEIGHT * VELOCITY_CODE_WEIGHT / REGRESSION_CHANNELS * expected), rel=1e-6
        )
        assert parts["velocity"] > 0
        no_branch = {k: v for k, v in outputs.items() if k != "velocity"}
        assert "velocity" not in task_loss(no_branch, batch)[1]
        no_targets = {k: v for k, v in batch.items() if not k.startswith("target_velocity")}
        total, parts_without = task_loss(outputs, no_targets)
        assert "velocity" not in parts_without
        assert float(total) == pytest.approx(sum(parts_without.values()), rel=1e-6)


def test_reader_leaves_unknown_velocities_unsupervised(config, train_set):
    """Planted NaN (the devkit's rule for a lone annotation) in a sample plan: masked, and 0 in `velocities`."""
    dataset = copy.copy(train_set)
    dataset.plans = list(train_set.plans)
    assert len(dataset.plans[0].boxes) >= 2 and np.isfinite(dataset.plans[0].velocities).all()
    velocities = dataset.plans[0].velocities.copy()
    velocities[1] = np.nan
    plan = dataset.plans[0] = dataclasses.replace(dataset.plans[0], velocities=velocities)
    item, original = dataset[0], train_set[0]
    assert item["target_velocity_mask"][1] == 0.0 and original["target_velocity_mask"][1] == 1.0
    np.testing.assert_array_equal(item["target_velocity"][1], [0.0, 0.0])
    np.testing.assert_array_equal(item["velocities"][1], [0.0, 0.0])
    np.testing.assert_array_equal(item["target_velocity_mask"][[0, *range(2, len(plan.boxes))]], 1.0)


@pytest.mark.slow  # training steps; default set: the velocity loss term and pruning
def test_a_few_training_steps_reduce_the_velocity_loss(config, train_set):
    from fusion.train import fit

    torch.manual_seed(0)
    model = build_model(config, "fusion")
    batch = collate([train_set[i] for i in range(len(train_set))])

    def loss_now() -> float:
        model.train()  # batch statistics: a few steps leave BatchNorm's running statistics far behind
        with torch.no_grad():
            out = model(**model_inputs(batch))
        return float(
            velocity_loss(
                out["velocity"], batch["target_index"], batch["target_velocity"], batch["target_velocity_mask"]
            )
        )

    before = loss_now()
    train = get_config("nuscenes-tiny", {"train.steps": 12, "train.warmup_steps": 0, "train.threads": 1}).train
    train.batch_size = len(train_set)
    fit(model, train_set, train, progress=False)
    after = loss_now()
    assert after < 0.8 * before, (before, after)


def test_results_velocities_are_the_predictions_rotated_to_global(config, root):
    from fusion.evaluate import nuscenes_detections
    from fusion.nuscenes_eval import default_meta, results_json

    val = NuScenesDataset(config, root, "v1.0-mini", "mini_val")
    torch.manual_seed(1)
    model = build_model(config, "fusion")
    with torch.no_grad():
        model.heads.det.branches["velocity"][-1].bias.copy_(torch.tensor([2.0, -1.0]))  # clearly non-zero
    detections = nuscenes_detections(model, val, batch_size=2, progress=False)
    results = results_json(detections, default_meta(), config.data.classes)
    checked = 0
    for detection in detections:
        velocities = detection["velocities"]
        assert velocities.shape == (len(detection["boxes"]), 2) and np.abs(velocities).max() > 0.1
        order = np.argsort(-detection["scores"].astype(np.float64), kind="stable")[:500]
        rotation = detection["lidar_to_global"][:3, :3]
        boxes = results["results"][detection["sample_token"]]
        assert len(boxes) == len(order)
        for box, i in zip(boxes, order):
            vx, vy = velocities[i]
            expected = (rotation @ np.array([vx, vy, 0.0]))[:2]
            np.testing.assert_allclose(box["velocity"], expected, rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked > 0


@pytest.mark.slow  # a prune of the velocity model; default set: the velocity loss term
def test_pruning_keeps_the_velocity_output_and_its_loss(config, train_set):
    """The branch's last conv is an output layer the graph protects: a pruned model still predicts (vx, vy)."""
    from compress.prune import prune
    from compress.request import PruneRequest
    from fusion.task import first_sample, reference_task

    torch.manual_seed(0)
    model = build_model(config, "fusion").eval()
    batch = collate([train_set[0], train_set[1]])
    before = sum(p.numel() for p in model.parameters())
    request = PruneRequest(method="snip", channel_ratio=0.3)
    prune(model, reference_task(model), [batch], request, example_batch=first_sample(batch), progress=False)
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    branch = model.heads.det.branches["velocity"]
    assert branch[-1].out_channels == 2
    with torch.no_grad():
        outputs = model(**model_inputs(batch))
    assert outputs["velocity"].shape == (2, 2, config.grid.size_y, config.grid.size_x)
    assert task_loss(outputs, batch)[1]["velocity"] > 0
