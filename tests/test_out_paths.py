"""Inputs are never outputs (issue 26): an output path that is, contains or lies inside one of the verb's
inputs is refused in one `error:` line, exit 2, before any work, with paths compared resolved."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from altermoma.cli import main
from common.io import OutputError, check_inputs_not_outputs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fusion" / "weights"


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's folder: a checkpoint, a second one, a --task file, a latency table, a data root, an ONNX folder."""
    root = tmp_path_factory.mktemp("paths")
    shutil.copytree(SHIPPED / "tiny-fusion", root / "runs" / "ckpt")
    shutil.copytree(SHIPPED / "tiny-lidar", root / "runs" / "lidar")
    (root / "task.py").write_text("def setup():\n    raise AssertionError('never called')\n")
    (root / "table.json").write_text("{}")
    (root / "nusc" / "v1.0-mini").mkdir(parents=True)
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"never read")
    os.symlink(root / "runs" / "ckpt", root / "link")
    return root


C = "{ws}/runs/ckpt"
# (verb's arguments with the output last, its input option named in the message); the output is filled in below.
VERBS = {
    "prune": (["prune", "--checkpoint", C, "--target-gflops", "0.5", "--out"], "--checkpoint"),
    "finetune": (["finetune", "--checkpoint", C, "--out"], "--checkpoint"),
    "evaluate": (["evaluate", "--checkpoint", C, "--out"], "--checkpoint"),
    "evaluate-json": (["evaluate", "--checkpoint", C, "--json"], "--checkpoint"),
    "export": (["export", "onnx", "--checkpoint", C, "--out"], "--checkpoint"),
    "quantize": (["quantize", "--checkpoint", C, "--out"], "--checkpoint"),
    "bench": (["bench", "--checkpoint", "{ws}/runs/lidar", "--checkpoint", C, "--out"], "--checkpoint"),
    "latency-table": (["latency-table", "--checkpoint", C, "--out"], "--checkpoint"),
    "compare": (["compare", "--checkpoint", C, "--quick", "--out"], "--checkpoint"),
}
# Where the output goes relative to the checkpoint {ws}/runs/ckpt, and the words of the message.
PLACES = {
    "same": ("{ws}/runs/ckpt", "is the same path as"),
    "inside": ("{ws}/runs/ckpt/sub", "lies inside"),
    "file-inside": ("{ws}/runs/ckpt/model.safetensors", "lies inside"),
    "containing": ("{ws}/runs", "contains"),
    "symlink": ("{ws}/link", "is the same path as"),
    "dotdot": ("{ws}/runs/lidar/../ckpt/.", "is the same path as"),
}


def _refused(ws: Path, capsys, argv: list[str], words: str, option: str) -> None:
    before = _tree(ws)
    assert main([a.format(ws=ws) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert f" {words} {option} " in err[0] and "choose another" in err[0], err
    assert _tree(ws) == before


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_output_overlapping_the_checkpoint_is_refused(ws, capsys, verb, place):
    argv, option = VERBS[verb]
    out, words = PLACES[place]
    _refused(ws, capsys, [*argv, out], words, option)


def test_relative_paths_are_resolved_against_the_working_directory(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws / "runs")
    _refused(
        ws, capsys, ["finetune", "--checkpoint", "ckpt", "--out", "../runs/ckpt"], "is the same path as", "--checkpoint"
    )
    _refused(
        ws,
        capsys,
        ["prune", "--checkpoint", "./ckpt", "--out", ".", "--target-gflops", "0.5"],
        "contains",
        "--checkpoint",
    )


OTHER_INPUTS = {
    "task-file": (["prune", "--task", "{ws}/task.py:setup", "--target-gflops", "0.5", "--out", "{ws}"], "contains", "--task"),
    "latency-table": (
        ["prune", "--checkpoint", C, "--target-latency", "0.5", "--latency-table", "{ws}/table.json", "--out",
         "{ws}/table.json"],
        "is the same path as",
        "--latency-table",
    ),
    "dataroot": (
        ["finetune", "--checkpoint", C, "--data", "nuscenes", "--dataroot", "{ws}/nusc", "--out", "{ws}/nusc/tuned"],
        "lies inside",
        "--dataroot",
    ),
    "init-lidar": (
        ["train", "--modality", "fusion", "--init-lidar", "{ws}/runs/lidar", "--out", "{ws}/runs/lidar"],
        "is the same path as",
        "--init-lidar",
    ),
    "reference": (
        ["quantize", "--checkpoint", C, "--reference", "{ws}/runs/lidar", "--out", "{ws}/runs/lidar/q"],
        "lies inside",
        "--reference",
    ),
    "onnx-dir": (["export", "trt", "--onnx-dir", "{ws}/onnx", "--out", "{ws}/onnx"], "is the same path as", "--onnx-dir"),
    "parse-trtexec": (
        ["latency-table", "--parse-trtexec", "{ws}/onnx", "--out", "{ws}/onnx/table.json"],
        "lies inside",
        "--parse-trtexec",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OTHER_INPUTS))
def test_every_input_option_is_protected(ws, capsys, case):
    argv, words, option = OTHER_INPUTS[case]
    _refused(ws, capsys, argv, words, option)


def test_a_module_task_names_no_file_and_apart_paths_pass():
    check_inputs_not_outputs({"--out": "runs/a"}, {"--checkpoint": ["runs/b", None], "--task": None})
    check_inputs_not_outputs({"--out": None}, {"--checkpoint": "runs/b"})
    check_inputs_not_outputs({"--out": "runs/ab"}, {"--checkpoint": "runs/a"})  # a prefix is not a parent
    with pytest.raises(OutputError, match="--json runs/a/m.json lies inside --checkpoint runs/a"):
        check_inputs_not_outputs({"--out": "runs/x", "--json": "runs/a/m.json"}, {"--checkpoint": ["runs/a"]})
