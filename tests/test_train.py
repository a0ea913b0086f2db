import dataclasses

import pytest
import torch

from fusion.checkpoint import load_checkpoint, save_checkpoint
from fusion.models.bevfusion import build_model
from fusion.train import batch_indices, fit, learning_rate, load_pretrained


class Scenes(list):
    """A list of rendered samples that looks like SyntheticScenes to `fit`."""


def _train_config(config, steps):
    return dataclasses.replace(config.train, steps=steps, batch_size=2, warmup_steps=1, threads=1, checkpoint_every=2)


def _fresh_model(config, modality="lidar"):
    torch.manual_seed(0)
    return build_model(config, modality)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    assert batch_indices(10, 3, 0, 4) == batch_indices(10, 3, 0, 4)
    first_epoch = sum((batch_indices(10, 3, 0, s) for s in range(3)), [])
    assert len(set(first_epoch)) == 9  # a permutation, last partial batch dropped
    assert batch_indices(10, 3, 1, 0) != batch_indices(10, 3, 0, 0)


def test_learning_rate_warms_up_then_decays(tiny_config):
    train = dataclasses.replace(tiny_config.train, steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(0, train) == 0.1 and learning_rate(9, train) == 1.0
    assert learning_rate(50, train) < 1.0 and abs(learning_rate(100, train) - 0.01) < 1e-9


@pytest.mark.slow  # default set: test_cli's train-twice identity
def test_same_seed_same_training_result(tiny_config, tiny_samples):
    train = _train_config(tiny_config, 3)
    a = fit(_fresh_model(tiny_config), Scenes(tiny_samples), train, progress=False)
    b = fit(_fresh_model(tiny_config), Scenes(tiny_samples), train, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_resume_continues_exactly(tiny_config, tiny_samples, tmp_path):
    full = fit(_fresh_model(tiny_config), Scenes(tiny_samples), _train_config(tiny_config, 4), progress=False)
    # Stop after 2 steps (a checkpoint is written at step 2), then resume to 4.
    fit(
        _fresh_model(tiny_config), Scenes(tiny_samples), _train_config(tiny_config, 2), out_dir=tmp_path, progress=False
    )
    resumed = fit(
        _fresh_model(tiny_config),
        Scenes(tiny_samples),
        _train_config(tiny_config, 4),
        out_dir=tmp_path,
        resume=True,
        progress=False,
    )
    for (name, pa), pb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 4


@pytest.mark.slow  # 100 training steps; default set: exact resume here, train-twice identity in test_cli
def test_training_lowers_the_loss(tiny_config, tiny_samples):
    from fusion.data.dataset import collate, model_inputs
    from fusion.losses import task_loss

    batch = collate(tiny_samples[:4])
    model = _fresh_model(tiny_config)

    def loss_now():
        with torch.no_grad():
            return float(task_loss(model.eval()(**model_inputs(batch)), batch)[0])

    before = loss_now()
    fit(model, Scenes(tiny_samples[:4]), dataclasses.replace(_train_config(tiny_config, 12), lr=3e-3), progress=False)
    assert loss_now() < 0.9 * before


def test_fusion_initialised_from_single_modal_checkpoints(tiny_config, tmp_path):
    camera, lidar = _fresh_model(tiny_config, "camera"), _fresh_model(tiny_config, "lidar")
    torch.nn.init.constant_(lidar.heads.det.shared[0].weight, 0.5)
    save_checkpoint(tmp_path / "cam", camera)
    save_checkpoint(tmp_path / "lid", lidar)
    fusion = build_model(tiny_config, "fusion")
    counts = load_pretrained(fusion, {"lidar": lidar.state_dict(), "camera": camera.state_dict()})
    assert counts["camera"] == sum(k.startswith("camera.") for k in camera.state_dict())
    assert torch.equal(fusion.lidar.pfn.conv.weight, lidar.lidar.pfn.conv.weight)
    assert torch.equal(fusion.camera.backbone.conv1.weight, camera.camera.backbone.conv1.weight)
    assert torch.equal(fusion.heads.det.shared[0].weight, lidar.heads.det.shared[0].weight)  # LiDAR's head wins
