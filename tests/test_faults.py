"""Fault injection: a child process is killed (os._exit, like kill -9) at every write and swap step of
a multi-file output, and what is left on disk must be the old output or the new one, complete, never a
mix. `ALTERMOMA_FAULT_AT=N` ends the child at the N-th `common.io.fault_point()`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.io import FAULT_ENV, FAULT_EXIT, MANIFEST, verify_manifest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, fault_at: int | None, cwd: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault_at is not None:
        env[FAULT_ENV] = str(fault_at)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, timeout=900).returncode


def _crash_at(code: str, points: list[int], cwd: Path, check) -> None:
    """Run `code` crashing at each of `points`, then to completion; `check(crashed)` after each run."""
    for point in [*points, None]:
        code_rc = _run(code, point, cwd)
        assert code_rc == (0 if point is None else FAULT_EXIT), (point, code_rc)
        check(crashed=point is not None)


def _crash_everywhere(code: str, cwd: Path, check) -> int:
    """Run `code` crashing at point 1, 2, ... until it completes; `check(crashed)` after each run."""
    point = 0
    while True:
        point += 1
        code_rc = _run(code, point, cwd)
        assert code_rc in (0, FAULT_EXIT), code_rc
        check(crashed=code_rc == FAULT_EXIT)
        if code_rc == 0:
            return point - 1  # the number of fault points the command passes
        assert point < 50


STAGED = """
import sys
from common.io import staged_directory
with staged_directory("out", kind="demo") as staging:
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (staging / name).parent.mkdir(exist_ok=True)
        (staging / name).write_text(sys.argv[0] + " new " + name)
"""


def test_a_staged_folder_is_old_or_new_at_every_crash_point(tmp_path):
    _run(STAGED.replace("new", "old"), None, tmp_path)

    def check(crashed: bool) -> None:
        texts = {p.relative_to(tmp_path / "out").as_posix(): p.read_text() for p in (tmp_path / "out").rglob("*.txt")}
        versions = {t.split()[1] for t in texts.values()}
        assert sorted(texts) == ["a.txt", "b.txt", "sub/c.txt"] and len(versions) == 1, texts
        verify_manifest(tmp_path / "out")
        if not crashed:
            assert versions == {"new"}

    points = _crash_everywhere(STAGED, tmp_path, check)
    assert points >= 5  # 3 files, the manifest and the swap
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # leftovers were cleaned


SAVE = """
import sys, torch
from fusion.checkpoint import save_checkpoint
from fusion.config import get_config
from fusion.models.bevfusion import build_model
from fusion.train import make_optimizer, train_state
step = int(sys.argv[1]) if len(sys.argv) > 1 else STEP
torch.manual_seed(step)
config = get_config("tiny")
model = build_model(config, "lidar")
optimizer = make_optimizer(model, config.train)
model(**{k: v for k, v in __import__("fusion.models.bevfusion", fromlist=["x"]).example_inputs(config, modality="lidar").items()})["heatmap"].sum().backward()
optimizer.step()
save_checkpoint("ckpt", model, {"step": step}, train_state=train_state(optimizer, step))
"""


def _checkpoint_check(tmp_path: Path):
    """Writes the step-3 checkpoint; returns check(crashed): the checkpoint is step 3 or 4, whole."""
    import torch

    from fusion.checkpoint import load_checkpoint
    from fusion.train import load_train_state, make_optimizer

    _run(SAVE.replace("STEP", "3"), None, tmp_path)
    old = load_checkpoint(tmp_path / "ckpt")[0].state_dict()

    def check(crashed: bool) -> None:
        model, meta = load_checkpoint(tmp_path / "ckpt")  # checks the manifest: a mix fails here
        step = meta["step"]
        assert step in (3, 4) and (step == 4 or crashed)
        same = all(torch.equal(v, old[k]) for k, v in model.state_dict().items())
        assert same == (step == 3)
        assert load_train_state(tmp_path / "ckpt", make_optimizer(model, model.config.train)) == step

    return check


@pytest.mark.slow  # one child process per crash point; the default set crashes at two (below)
def test_a_checkpoint_is_old_or_new_at_every_crash_point(tmp_path):
    points = _crash_everywhere(SAVE.replace("STEP", "4"), tmp_path, _checkpoint_check(tmp_path))
    assert points >= 8  # weights, optimizer tensors and JSON, metadata, their fsyncs, the swap
    assert json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["kind"] == "checkpoint"


@pytest.mark.slow  # child processes killed mid-write; default set: the staged-folder crash points
def test_a_checkpoint_is_old_or_new_when_killed_early_or_late(tmp_path):
    """Killed at the second and at the eighth of its write and swap steps (it has at least eight)."""
    _crash_at(SAVE.replace("STEP", "4"), [2, 8], tmp_path, _checkpoint_check(tmp_path))
    assert json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["kind"] == "checkpoint"


EXPORT = """
from altermoma.cli import main
raise SystemExit(main(["export", "onnx", "--checkpoint", "CKPT", "--out", "onnx", "--samples", "1", "--no-simplify"]))
"""


@pytest.mark.slow  # child processes killed mid-export; default set: the staged-folder crash points
@pytest.mark.parametrize("crash_at", [2, 9])  # 2: the same staging, earlier
def test_an_export_killed_midway_leaves_the_previous_export_whole(tmp_path, crash_at):
    shipped = ROOT / "fusion" / "weights" / "tiny-lidar"
    code = EXPORT.replace("CKPT", str(shipped))
    assert _run(code, None, tmp_path) == 0
    before = {p.relative_to(tmp_path / "onnx"): p.read_bytes() for p in (tmp_path / "onnx").rglob("*") if p.is_file()}
    assert _run(code, crash_at, tmp_path) in (0, FAULT_EXIT)
    after = {p.relative_to(tmp_path / "onnx"): p.read_bytes() for p in (tmp_path / "onnx").rglob("*") if p.is_file()}
    assert sorted(after) == sorted(before)
    verify_manifest(tmp_path / "onnx")  # every file belongs to one export
