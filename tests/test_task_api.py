"""The model-agnostic API on small models written here: Task checks, partitions with parameterless
modules, output layers found from the graph, unprunable groups, IMP with the generic fine-tune, the
pruned-checkpoint format's integrity checks, and `--task` errors on the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import altermoma
from altermoma.cli import main
from common.task import Task, TaskError
from compress.checkpoint import PrunedCheckpointError
from compress.partition import Partition, PartitionError

torch.set_num_threads(1)


class Lift(nn.Module):
    """A view transform with buffers only (a fixed channel-preserving resampling)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.arange(63, -1, -1))

    def forward(self, x):
        return x.flatten(2).index_select(2, self.index).view_as(x)


class TwoSensor(nn.Module):
    """Camera and LiDAR convs, a concat fuser, a grouped conv, a classification and a box head (dict out)."""

    def __init__(self, conv_after_lift: bool = True):
        super().__init__()
        self.cam = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.lift = Lift()
        self.adapt = nn.Conv2d(32, 32, 1) if conv_after_lift else nn.Identity()
        self.lidar = nn.Sequential(nn.Conv2d(2, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(64, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.grouped = nn.Conv2d(48, 48, 3, padding=1, groups=4)
        self.cls = nn.Conv2d(48, 3, 1)
        self.box = nn.Sequential(nn.Conv2d(48, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1))

    def forward(self, image, scan):
        x = self.fuse(torch.cat([self.adapt(self.lift(self.cam(image))), self.lidar(scan)], dim=1))
        return {"cls": self.cls(self.grouped(x)), "box": self.box(x)}


PARTITION = {
    "camera": ["cam.", "lift.", "adapt."],
    "lidar": ["lidar."],
    "fusion": ["fuse.", "grouped.", "cls.", "box."],
}


def _loss(out, batch):
    return ((out["cls"] - batch["cls"]) ** 2).mean() + (out["box"] - batch["box"]).abs().mean()


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(2, 3, 8, 8, generator=g),
            "scan": torch.randn(2, 2, 8, 8, generator=g),
            "cls": torch.randn(2, 3, 8, 8, generator=g),
            "box": torch.randn(2, 4, 8, 8, generator=g),
        }
        for _ in range(n)
    ]


def _task(**extra):
    return Task(PARTITION, _loss, inputs=lambda b: (b["image"], b["scan"]), **extra)


def _model(conv_after_lift: bool = True):
    torch.manual_seed(0)
    return TwoSensor(conv_after_lift).eval()


def test_task_arguments_and_loss_checks():
    batch = _batches(1)[0]
    assert Task(PARTITION, _loss).arguments(batch) == ((batch,), {})
    args, kwargs = _task().arguments(batch)
    assert len(args) == 2 and kwargs == {}
    keyword = Task(PARTITION, _loss, inputs=lambda b: {"image": b["image"], "scan": b["scan"]})
    assert keyword.arguments(batch)[1].keys() == {"image", "scan"}
    out = _model()(batch["image"], batch["scan"])
    with pytest.raises(TaskError, match="scalar tensor"):
        Task(PARTITION, lambda o, b: o["cls"]).loss_of(out, batch)
    with pytest.raises(TaskError, match="scalar tensor"):
        Task(PARTITION, lambda o, b: (o["cls"].sum(), {})).loss_of(out, batch)
    with pytest.raises(TaskError, match="callable"):
        Task(PARTITION, loss="mse")


def test_partition_accepts_parameterless_modules_and_rejects_overlaps():
    model = _model()
    partition = Partition.of(model, PARTITION)
    assert partition.part_of("lift") == "camera" and partition.part_of("cls.weight") == "fusion"
    with pytest.raises(PartitionError, match="several partitions"):
        Partition.of(model, {**PARTITION, "lidar": ["lidar.", "cam.0."]})
    with pytest.raises(PartitionError, match="matches no module"):
        Partition.of(model, {**PARTITION, "lidar": ["lidar.", "radar."]})


def test_output_layers_are_found_from_the_graph_and_grouped_convs_are_left_whole():
    model, batches = _model(), _batches()
    report = altermoma.prune(model, _task(), batches, method="magnitude", channel_ratio=0.5, progress=False)
    # cls and box.2 produce model outputs; the grouped conv feeds cls (a channel-mixing layer), so it is not
    # an output layer, but its groups are left whole because torch-pruning cannot cut grouped convs.
    assert set(report["protected"]) == {"cls", "box.2"}
    assert model.cls.out_channels == 3 and model.box[2].out_channels == 4
    assert model.grouped.weight.shape == (48, 12, 3, 3)
    assert any("grouped" in g["reason"] for g in report["unpruned_groups"])
    assert sum(report["widths"].values()) < 32 * 4 and all(w % 8 == 0 for w in report["widths"].values())
    assert report["zero_then_prune_error"] < 1e-5
    out = model(batches[0]["image"], batches[0]["scan"])
    assert out["cls"].shape == (2, 3, 8, 8) and out["box"].shape == (2, 4, 8, 8)


def test_a_reshape_before_the_concat_keeps_camera_and_lidar_channels_apart():
    """Without a conv after the buffer-only view transform (flatten, index_select, view_as) torch-pruning 1.6.1
    tied camera channel k to LiDAR channel k at the concat; the reshape mapping decided from the saved shape
    (`compress.tracing`) keeps them apart: both prune, and the pruned model equals the zeroed one."""
    model, batches = _model(conv_after_lift=False), _batches()
    partition = {**PARTITION, "camera": ["cam.", "lift."]}
    task = Task(partition, _loss, inputs=lambda b: (b["image"], b["scan"]))
    report = altermoma.prune(model, task, batches, method="random", channel_ratio=0.5, progress=False)
    assert {"cam.0", "lidar.0"} <= set(report["widths"])
    assert model.cam[0].out_channels < 32 and model.lidar[0].out_channels < 32
    assert report["zero_then_prune_error"] < 1e-5


def test_groups_that_claim_the_same_channels_are_left_whole():
    """The safety net behind the graph: two groups claiming one layer's output channels are both left whole."""
    from compress.structured import ChannelGraph

    model, batches = _model(), _batches()
    graph = ChannelGraph(model, _task(), batches[0])
    first, second = graph.groups[0], graph.groups[1]
    second.items.append(next(i for i in first.items if i.kind == "out"))  # as a wrong index mapping would
    graph._drop_overlapping_groups()
    reasons = {g["root"]: g["reason"] for g in graph.unprunable}
    assert "couples its channels" in reasons[first.root] and "couples its channels" in reasons[second.root]
    assert first.root not in [g.root for g in graph.groups]


def test_a_target_the_widths_cannot_reach_is_refused_unless_best_effort():
    """4 groups of 32 channels in steps of 8: 40% of the channels is either 37.5% or 43.75%."""
    from compress.structured import PruningError

    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="instead of the requested 40.0%"):
        altermoma.prune(model, _task(), _batches(), method="magnitude", channel_ratio=0.4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was removed
    with pytest.warns(UserWarning, match="instead of the requested"):
        altermoma.prune(model, _task(), _batches(), method="magnitude", channel_ratio=0.4, best_effort=True)


def test_protected_names_and_unknown_protected_module():
    model = _model()
    report = altermoma.prune(
        model, _task(protected=("box",)), _batches(), method="magnitude", channel_ratio=0.5, progress=False
    )
    assert model.box[0].out_channels == 32 and {"box.0", "box.2"} <= set(report["protected"])
    with pytest.raises(ValueError, match="not a conv or linear"):
        altermoma.prune(_model(), _task(protected=("nothing",)), _batches(), method="magnitude", channel_ratio=0.5)


def test_imp_uses_the_task_loss_and_the_generic_fine_tune():
    from compress.request import IMPConfig

    model, batches = _model(), _batches()
    report = altermoma.prune(
        model,
        _task(),
        batches,
        method="imp",
        target_gflops=0.4,
        imp=IMPConfig(levels=2, finetune_steps=4),
        train_batches=_batches(2, seed=1),
        progress=False,
    )
    assert abs(report["gflops_reduction"] - 0.4) <= 0.03  # 8-channel steps on a 4-group toy model
    assert report["finetune_steps_used"] == 2 and report["finetune_steps_remaining"] == 2


def test_unstructured_keeps_output_layers_dense():
    model, batches = _model(), _batches()
    original = copy.deepcopy(model)
    report = altermoma.prune(model, _task(), batches, method="snip", sparsity=0.8, progress=False)
    assert abs(report["sparsity"] - 0.8) < 1e-3
    assert torch.equal(model.box[2].weight, original.box[2].weight)
    assert torch.equal(model.cls.weight, original.cls.weight)
    assert set(report["protected"]) == {"cls", "box.2"}


def test_pruned_checkpoint_refuses_a_mixed_folder(tmp_path):
    model = _model()
    report = altermoma.prune(model, _task(), _batches(), method="random", channel_ratio=0.5, progress=False)
    altermoma.save_pruned(model, tmp_path / "a", report)
    other = _model()
    altermoma.save_pruned(other, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(PrunedCheckpointError, match="does not match the manifest"):
        altermoma.load_pruned(_model(), tmp_path / "a")
    with pytest.raises(PrunedCheckpointError, match="not a pruned checkpoint"):
        altermoma.load_pruned(_model(), tmp_path)
    meta = json.loads((tmp_path / "b" / "pruned.json").read_text())
    assert meta["format"] == "altermoma-pruned"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["kind"] == "pruned" and len(manifest["files"]["model.safetensors"]) == 64


def test_save_pruned_replaces_a_previous_output_whole(tmp_path):
    model = _model()
    altermoma.save_pruned(model, tmp_path / "out", {"note": "first"})
    (tmp_path / "out" / "stray.txt").write_text("from an older run")
    altermoma.save_pruned(model, tmp_path / "out", {"note": "second"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.safetensors", "pruned.json"]
    assert json.loads((tmp_path / "out" / "pruned.json").read_text())["report"]["note"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


SETUP_FILE = """
import torch, altermoma
from torch import nn

def setup():
    return {"model": nn.Conv2d(3, 4, 1), "task": altermoma.Task({"fusion": ["weight", "bias"]}, lambda o, b: o.sum()),
            "scoring_batches": []}

def not_a_setup():
    return 42
"""


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like"),
        ("missing.py:setup", "does not exist"),
        ("{file}:nothing", "has no function"),
        ("{file}:not_a_setup", "must return an altermoma.Setup"),
        ("{file}:setup", "scoring_batches must be a non-empty list"),
        ("no_such_module_xyz:setup", "cannot be imported"),
    ],
)
def test_task_option_errors_are_one_line(tmp_path, capsys, spec, message):
    user = tmp_path / "user.py"
    user.write_text(SETUP_FILE)
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            "--task",
            spec.format(file=user),
            "--method",
            "magnitude",
            "--channel-ratio",
            "0.3",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and message in err, err
    assert not out.exists()


def test_prune_needs_exactly_one_of_checkpoint_and_task(tmp_path, capsys):
    assert main(["prune", "--method", "magnitude", "--channel-ratio", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
