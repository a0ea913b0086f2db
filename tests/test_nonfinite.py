"""NaN and Inf (issue 26): checkpoints holding them are refused by every loader and CLI verb, and a
training loss that becomes one stops the run with the step named, keeping the last good checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fusion.train
from altermoma.cli import main
from common.finite import NonFiniteError, NonFiniteLossError, check_finite, non_finite_tensors
from common.task import Task
from compress.checkpoint import NonFinitePrunedError, PrunedCheckpointError, load_pruned, save_pruned
from compress.finetune import finetune
from compress.imp import iterative_magnitude_prune
from compress.request import IMPConfig, PruneRequest
from fusion.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from fusion.models.bevfusion import build_model

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fusion" / "weights"

# A user's --task file: a small two-branch model; `nan_at_3` is the same setup with a loss that is NaN
# on its third call (the third fine-tuning step: nothing else calls the loss when fine-tuning).
TASK_FILE = """
import torch
from torch import nn

from altermoma import Setup, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cam = nn.Conv2d(3, 8, 3, padding=1)
        self.lid = nn.Conv2d(2, 8, 3, padding=1)
        self.fuse = nn.Conv2d(16, 4, 1)

    def forward(self, image, points):
        return self.fuse(torch.cat([self.cam(image).relu(), self.lid(points).relu()], 1))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, 8, 8, generator=g), "points": torch.randn(2, 2, 8, 8, generator=g),
            "target": torch.randn(2, 4, 8, 8, generator=g)}


CALLS = [0]
NAN_AT = [None]


def loss(out, b):
    CALLS[0] += 1
    value = ((out - b["target"]) ** 2).mean()
    return value * float("nan") if CALLS[0] == NAN_AT[0] else value


def setup():
    torch.manual_seed(0)
    task = Task(partition={"camera": ["cam"], "lidar": ["lid"], "fusion": ["fuse"]}, loss=loss,
                inputs=lambda b: {"image": b["image"], "points": b["points"]})
    return Setup(model=Net(), task=task, scoring_batches=[batch(0), batch(1)], train_batches=[batch(2), batch(3)])


def nan_at_3():
    NAN_AT[0] = 3
    return setup()
"""


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def _poison(state_owner: nn.Module) -> tuple[str, int]:
    """Put 2 NaN and 1 Inf into the first weight of at least 4 values; returns (its name, its size)."""
    name, param = next((n, p) for n, p in state_owner.named_parameters() if n.endswith("weight") and p.numel() >= 4)
    with torch.no_grad():
        flat = param.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("nan"), float("inf")
    return name, param.numel()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """NaN checkpoints (reference fusion and LiDAR, a user's pruned one), a finite pruned one, a --task file."""
    root = tmp_path_factory.mktemp("nonfinite")
    poisoned = {}
    for modality in ("fusion", "lidar"):
        model, meta = load_checkpoint(SHIPPED / f"tiny-{modality}")
        poisoned[modality] = _poison(model)
        save_checkpoint(root / f"nan-{modality}", model, meta)
    (root / "task.py").write_text(TASK_FILE)
    from altermoma.user_task import load_setup

    model = load_setup(f"{root / 'task.py'}:setup").model
    save_pruned(model, root / "user-good")
    poisoned["user"] = _poison(model)
    save_pruned(model, root / "user-nan")
    (root / "poisoned.json").write_text(json.dumps(poisoned))
    return root


def _poisoned(ws: Path, which: str) -> tuple[str, int]:
    return tuple(json.loads((ws / "poisoned.json").read_text())[which])


def test_check_finite_names_the_first_tensors_and_counts_the_rest():
    state = {f"t{i}": torch.ones(4) for i in range(6)}
    state["steps"] = torch.tensor(3)  # an integer buffer: never non-finite
    for i in (1, 2, 3, 5):
        state[f"t{i}"][: i % 3 + 1] = float("nan") if i % 2 else float("-inf")
    assert non_finite_tensors(state) == [("t1", 2, 4), ("t2", 3, 4), ("t3", 1, 4), ("t5", 3, 4)]
    with pytest.raises(NonFiniteError) as caught:
        check_finite(state, "checkpoint X")
    assert str(caught.value) == (
        "checkpoint X holds NaN/Inf values in 4 tensors: t1 (2 of 4 values), t2 (3 of 4 values), "
        "t3 (1 of 4 values) and 1 more tensor; it cannot be used"
    )
    check_finite({k: torch.zeros(2) for k in "ab"}, "fine")  # nothing raised


def test_loaders_refuse_nan_weights_with_their_own_error_types(ws):
    name, size = _poisoned(ws, "fusion")
    with pytest.raises(NonFiniteCheckpointError, match=rf"{name} \(3 of {size} values\)") as caught:
        load_checkpoint(ws / "nan-fusion")
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, ValueError)
    from altermoma.user_task import load_setup

    name, size = _poisoned(ws, "user")
    with pytest.raises(NonFinitePrunedError, match=rf"{name} \(3 of {size} values\)") as caught:
        load_pruned(load_setup(f"{ws / 'task.py'}:setup").model, ws / "user-nan")
    assert isinstance(caught.value, PrunedCheckpointError)
    load_pruned(load_setup(f"{ws / 'task.py'}:setup").model, ws / "user-good")  # a finite one loads


NAN_CASES = {
    "prune": (["prune", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o", "--target-gflops", "0.5"], "fusion"),
    "finetune": (["finetune", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o", "--steps", "2"], "fusion"),
    "evaluate": (["evaluate", "--checkpoint", "{ws}/nan-fusion", "--json", "{ws}/o.json"], "fusion"),
    "export": (["export", "onnx", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o"], "fusion"),
    "quantize": (["quantize", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o", "--calib-scenes", "1"], "fusion"),
    "bench": (["bench", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o", "--runs", "1"], "fusion"),
    "bench-second": (
        ["bench", "--checkpoint", "{shipped}/tiny-fusion", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o"],
        "fusion",
    ),
    "latency-table": (["latency-table", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o.json"], "fusion"),
    "compare": (["compare", "--checkpoint", "{ws}/nan-fusion", "--out", "{ws}/o", "--quick"], "fusion"),
    "train-init": (
        [
            "train",
            "--modality",
            "fusion",
            "--init-lidar",
            "{ws}/nan-lidar",
            "--init-camera",
            "{shipped}/tiny-camera",
            "--out",
            "{ws}/o",
            "--set",
            "train.steps=1",
        ],
        "lidar",
    ),  # fmt: skip
    "finetune-task": (
        ["finetune", "--task", "{ws}/task.py:setup", "--checkpoint", "{ws}/user-nan", "--out", "{ws}/o"],
        "user",
    ),
    "export-task": (
        ["export", "onnx", "--task", "{ws}/task.py:setup", "--checkpoint", "{ws}/user-nan", "--out", "{ws}/o"],
        "user",
    ),
    "bench-task": (
        ["bench", "--task", "{ws}/task.py:setup", "--checkpoint", "{ws}/user-nan", "--out", "{ws}/o", "--runs", "1"],
        "user",
    ),
}


SLOW_CASES = {"quantize"}  # importing ModelOpt alone takes ~20 s


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(NAN_CASES)]
)
def test_every_verb_refuses_a_nan_checkpoint_in_one_line(ws, capsys, case):
    argv, which = NAN_CASES[case]
    if case == "quantize":
        pytest.importorskip("modelopt.torch.quantization", reason="quantize needs the `quant` extra")
    before = _tree(ws)
    assert main([a.format(ws=ws, shipped=SHIPPED) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name, size = _poisoned(ws, which)
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "NaN/Inf" in err[0] and f"{name} (3 of {size} values)" in err[0], err
    assert _tree(ws) == before  # no output folder, file or staging leftover


# --- a loss that becomes NaN ---------------------------------------------------------------------------------


def _user_setup(ws: Path, function: str = "setup"):
    from altermoma.user_task import load_setup

    return load_setup(f"{ws / 'task.py'}:{function}")


def test_finetune_api_names_the_step_of_a_nan_loss(ws):
    setup = _user_setup(ws, "nan_at_3")
    with pytest.raises(NonFiniteLossError, match="the loss became nan at fine-tuning step 3 of 5") as caught:
        finetune(setup.model, setup.task, setup.train_batches, steps=5, progress=False)
    assert caught.value.step == 3
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, ValueError)
    assert "nothing was saved" in str(caught.value)


def _nan_gradient_task(task: Task) -> Task:
    """The same loss plus 0 * sqrt(0): a finite value whose gradient is NaN (0 * inf)."""

    def loss(out, batch):
        zero = out.sum() - out.sum().detach()
        return task.loss(out, batch) + 0.0 * torch.sqrt(zero)

    return dataclasses.replace(task, loss=loss)


def test_finetune_api_stops_on_nan_gradients_before_they_reach_the_weights(ws):
    setup = _user_setup(ws)
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    task = _nan_gradient_task(setup.task)
    with pytest.raises(NonFiniteLossError, match="the gradient norm became nan at fine-tuning step 1 of 4"):
        finetune(setup.model, task, setup.train_batches, steps=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in setup.model.state_dict().items())  # no step taken
    # Without clipping there is no norm: the NaN weights are caught by the next step's loss.
    with pytest.raises(NonFiniteLossError, match="the loss became nan at fine-tuning step 2 of 4"):
        finetune(setup.model, task, setup.train_batches, steps=4, max_grad_norm=None, progress=False)
    # ... or, on the last step, by the check of the weights after the loop.
    setup = _user_setup(ws)
    with pytest.raises(NonFiniteLossError, match=r"the weights became NaN/Inf \(.*\) at fine-tuning step 1 of 1"):
        finetune(setup.model, task, setup.train_batches, steps=1, max_grad_norm=None, progress=False)


def test_imp_names_the_level_whose_fine_tune_diverged(ws):
    setup = _user_setup(ws)
    always_nan = dataclasses.replace(setup.task, loss=lambda out, batch: out.sum() * float("nan"))
    request = PruneRequest(method="imp", sparsity=0.5, imp=IMPConfig(levels=2, finetune_steps=4))
    with pytest.raises(NonFiniteLossError, match="IMP's fine-tune after level 1 of 2: the loss became nan at "):
        iterative_magnitude_prune(setup.model, always_nan, setup.scoring_batches, request, progress=False)


def test_cli_finetune_task_with_a_nan_loss_is_one_line_and_writes_nothing(ws, capsys):
    before = _tree(ws)
    argv = ["finetune", "--task", f"{ws / 'task.py'}:nan_at_3", "--checkpoint", str(ws / "user-good"),
            "--out", str(ws / "tuned"), "--steps", "5"]  # fmt: skip
    assert main(argv) == 2
    err = _error_lines(capsys)
    assert err[0].startswith("error: the loss became nan at fine-tuning step 3 of 5") and "nothing was saved" in err[0]
    assert _tree(ws) == before


def _error_lines(capsys) -> list[str]:
    """The `error:` lines on stderr: exactly one, the last line (the progress bar shares stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors


def _nan_loss_at(monkeypatch, call: int) -> None:
    """The reference trainer's loss becomes NaN on its `call`-th evaluation (= step `call`, counted from 1)."""
    real, calls = fusion.train.detection_loss, [0]

    def detection_loss(*args, **kwargs):
        calls[0] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls[0] == call else (loss, parts)

    monkeypatch.setattr(fusion.train, "detection_loss", detection_loss)


def test_cli_finetune_nan_loss_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """3 steps checkpoint after every step: a NaN loss at step 3 leaves the step-2 checkpoint, complete and finite."""
    _nan_loss_at(monkeypatch, 3)
    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(SHIPPED / "tiny-lidar"), "--out", str(out), "--steps", "3",
            "--scenes", "4", "--threads", "1"]  # fmt: skip
    assert main(argv) == 2
    err = _error_lines(capsys)
    assert err[0].startswith("error: the loss became nan at step 3"), err
    assert f"{out} keeps the last good checkpoint (step 2)" in err[0]
    assert read_metadata(out)["step"] == 2
    load_checkpoint(out)  # loads: complete (manifest) and finite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no staging leftovers


def test_cli_train_nan_loss_before_any_checkpoint_writes_nothing(tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, 1)
    argv = ["train", "--modality", "lidar", "--out", str(tmp_path / "t"), "--set", "train.steps=3",
            "--set", "data.train_scenes=4", "--set", "train.batch_size=2"]  # fmt: skip
    assert main(argv) == 2
    err = _error_lines(capsys)
    assert err[0].startswith("error: the loss became nan at step 1"), err
    assert f"nothing was written to {tmp_path / 't'}" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_fit_never_saves_nan_weights(tmp_path, tiny_config, tiny_samples):
    """Weights made NaN after step 3 (an after-step hook) are caught before the step-3 checkpoint is written."""
    torch.manual_seed(0)
    model = build_model(tiny_config, "lidar")
    train = dataclasses.replace(tiny_config.train, steps=4, batch_size=2, checkpoint_every=1, threads=1)
    calls = [0]

    def poison_after_step_3(m: nn.Module) -> None:
        calls[0] += 1
        if calls[0] == 3:
            _poison(m)

    with pytest.raises(NonFiniteLossError, match=r"the weights became NaN/Inf \(.*\) at step 3") as caught:
        fusion.train.fit(model, tiny_samples, train, tmp_path / "c", after_step=poison_after_step_3, progress=False)
    assert f"{tmp_path / 'c'} keeps the last good checkpoint (step 2)" in str(caught.value)
    assert read_metadata(tmp_path / "c")["step"] == 2
    load_checkpoint(tmp_path / "c")
