"""`altermoma export trt`: what runs without TensorRT here, and the TensorRT path where it imports."""

import importlib.util
import sys

import pytest
import torch

from altermoma.cli import main
from export.engines import build_engines, exported_graphs


@pytest.fixture()
def onnx_dir(tmp_path):
    """A directory shaped like `export onnx` output: model.onnx and one split stage."""
    (tmp_path / "onnx" / "split").mkdir(parents=True)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    for path in (tmp_path / "onnx" / "model.onnx", tmp_path / "onnx" / "split" / "heads.onnx"):
        torch.onnx.export(
            conv,
            (torch.rand(1, 3, 8, 8),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            dynamo=False,
        )
    return tmp_path / "onnx"


def test_graphs_are_found_and_missing_export_is_a_clear_error(onnx_dir, tmp_path):
    assert list(exported_graphs(onnx_dir)) == ["model", "heads"]
    with pytest.raises(FileNotFoundError, match="run `altermoma export onnx` first"):
        exported_graphs(tmp_path)


def test_without_tensorrt_the_script_is_written_and_nothing_is_claimed(onnx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now fails, as on this machine
    report = build_engines(onnx_dir, tmp_path / "engines", precisions=("fp32", "fp16"))
    assert report["built"] is False and report["engines"] == {} and "TensorRT" in report["reason"]
    script = (tmp_path / "engines" / "build_engines.sh").read_text().splitlines()
    commands = [line for line in script if line.startswith('"$TRTEXEC"')]
    assert len(commands) == 4  # 2 graphs x 2 precisions
    assert sum("--fp16" in c for c in commands) == 2
    assert all("--saveEngine=" in c and "--onnx=../onnx/" in c for c in commands)  # relative: copyable to a Jetson
    assert 'cd "$(dirname "$0")"' in script
    assert any("/usr/src/tensorrt/bin/trtexec" in line and "command -v trtexec" in line for line in script)
    assert not list((tmp_path / "engines").glob("*.engine"))
    assert not (tmp_path / "engines" / "trt_report.json").exists()
    # The CLI says what it did and exits 0, so a deploy script goes on to `bench`.
    assert main(["export", "trt", "--onnx-dir", str(onnx_dir), "--out", str(tmp_path / "e2")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no engine built here" in out[0] and "build_engines.sh" in out[0]


def test_a_mixed_export_folder_is_refused(onnx_dir, tmp_path):
    from common.io import OutputError, staged_directory

    with staged_directory(tmp_path / "exported", kind="onnx-export") as staging:
        (staging / "split").mkdir()
        for path in ("model.onnx", "split/heads.onnx"):
            (staging / path).write_bytes((onnx_dir / path).read_bytes())
    (tmp_path / "exported" / "model.onnx").write_bytes(b"another export's graph")
    with pytest.raises(OutputError, match="does not match the manifest"):
        build_engines(tmp_path / "exported", tmp_path / "engines")


def test_bad_precision_and_missing_parent(onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        build_engines(onnx_dir, tmp_path / "e", precisions=("int4",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_engines(onnx_dir, tmp_path / "missing" / "e")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT Python bindings not installed")
def test_engines_match_onnxruntime(onnx_dir, tmp_path):
    from export.runtime import cuda_device_count

    if cuda_device_count() == 0:
        pytest.skip("TensorRT is installed but there is no CUDA device")
    report = build_engines(onnx_dir, tmp_path / "engines", precisions=("fp32", "fp16"))
    assert report["ok"] and len(report["engines"]) == 4
