import json

import pytest
import torch

from fusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fusion.models.bevfusion import build_model, example_inputs


def test_save_load_reproduces_outputs_exactly(tiny_config, tmp_path):
    model = build_model(tiny_config).eval()
    save_checkpoint(tmp_path / "ckpt", model, {"step": 3})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["step"] == 3 and meta["modality"] == "fusion"
    inputs = example_inputs(tiny_config)
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    for key in a:
        assert torch.equal(a[key], b[key])
    # No pickle anywhere: the weights are safetensors (8-byte header length, then JSON).
    raw = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:16]


def test_narrower_checkpoint_is_rebuilt_from_stored_shapes(tiny_config, tmp_path):
    model = build_model(tiny_config).eval()
    # Halve one conv's output channels and its BatchNorm by hand, and the next conv's inputs.
    block = model.lidar.blocks[0]
    keep = torch.arange(0, block.conv1.out_channels, 2)
    block.conv1.weight = torch.nn.Parameter(block.conv1.weight[keep].clone())
    block.conv1.out_channels = len(keep)
    for name in ("weight", "bias"):
        setattr(block.bn1, name, torch.nn.Parameter(getattr(block.bn1, name)[keep].clone()))
    block.bn1.running_mean = block.bn1.running_mean[keep].clone()
    block.bn1.running_var = block.bn1.running_var[keep].clone()
    block.bn1.num_features = len(keep)
    block.conv2.weight = torch.nn.Parameter(block.conv2.weight[:, keep].clone())
    block.conv2.in_channels = len(keep)
    inputs = example_inputs(tiny_config)
    with torch.no_grad():
        expected = model(**inputs)["heatmap"]
    save_checkpoint(tmp_path / "slim", model, {"pruning": {"kind": "structured"}})
    loaded, _ = load_checkpoint(tmp_path / "slim")
    assert loaded.lidar.blocks[0].conv1.out_channels == len(keep)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)["heatmap"], expected)
    # The same narrower weights without a pruning record do not match their config: refused.
    save_checkpoint(tmp_path / "unrecorded", model)
    with pytest.raises(CheckpointError, match="the config needs"):
        load_checkpoint(tmp_path / "unrecorded")


def test_a_head_with_another_class_count_is_refused_even_when_pruned(tiny_config, tmp_path):
    model = build_model(tiny_config).eval()
    head = model.heads.det.branches["heatmap"][-1]
    head.weight = torch.nn.Parameter(head.weight[:2].clone())
    head.bias = torch.nn.Parameter(head.bias[:2].clone())
    head.out_channels = 2
    save_checkpoint(tmp_path / "two-class", model, {"pruning": {"kind": "structured"}})
    with pytest.raises(CheckpointError, match="a protected layer needs"):
        load_checkpoint(tmp_path / "two-class")


def test_files_from_another_save_are_refused(tiny_config, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a", build_model(tiny_config), {"step": 1})
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "b", build_model(tiny_config), {"step": 2})
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_checkpoint(tmp_path / "a")


def test_clear_errors(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ok", build_model(tiny_config, "lidar"))
    with pytest.raises(CheckpointError, match="preset 'tiny', expected 'small'"):
        load_checkpoint(tmp_path / "ok", expect_preset="small")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").unlink()  # as written before manifests: the file itself is checked
    with pytest.raises(CheckpointError, match="corrupt checkpoint weights"):
        load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "checkpoint.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_checkpoint(tmp_path / "ok")


def test_weights_of_another_modality_do_not_fit(tiny_config, tmp_path):
    save_checkpoint(tmp_path / "cam", build_model(tiny_config, "camera"))
    meta = json.loads((tmp_path / "cam" / "checkpoint.json").read_text())
    meta["modality"] = "lidar"
    (tmp_path / "cam" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint.json does not match the manifest"):
        load_checkpoint(tmp_path / "cam")
    (tmp_path / "cam" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "cam")


def test_failed_save_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
    model = build_model(tiny_config, "lidar")
    save_checkpoint(tmp_path / "c", model, {"step": 1})
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fusion.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", model, {"step": 2})
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")] == []


def test_checkpoint_files_are_readable_by_others(tiny_config, tmp_path):
    import os
    import stat

    save_checkpoint(tmp_path / "c", build_model(tiny_config, "lidar"))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "checkpoint.json"):
        mode = stat.S_IMODE((tmp_path / "c" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_a_pruned_attention_embedding_is_rebuilt_from_its_stored_shapes():
    """`nn.MultiheadAttention` keeps its projections in `in_proj_weight` (3E, E), not `weight`: a checkpoint whose
    attention embedding was pruned (heads kept, head_dim smaller) rebuilds at the stored width and computes the
    same outputs; an embedding the heads cannot split is refused."""
    from torch import nn

    from common.resize import ResizeError, resize_to_state_dict

    class Attend(nn.Module):
        def __init__(self, embed: int) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(8, embed), nn.Linear(embed, 2)
            self.att = nn.MultiheadAttention(embed, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(self.att(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    pruned, fresh = Attend(24).eval(), Attend(32).eval()
    assert resize_to_state_dict(fresh, pruned.state_dict()) == 4  # inp, att, att.out_proj, out
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.att.embed_dim == 24 and fresh.att.head_dim == 6
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    odd = {k: v for k, v in Attend(32).state_dict().items()}
    odd["att.in_proj_weight"] = torch.zeros(3 * 30, 30)
    with pytest.raises(ResizeError, match="attention with 4 heads cannot take in_proj_weight"):
        resize_to_state_dict(Attend(32), odd)
