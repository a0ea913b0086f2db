"""The generic export (`export.onnx`) on small models written here, not the reference BEVFusion: every input
and output form `export_onnx` accepts, its naming rules and errors, a split declared as plain tuples, and
that `export` imports nothing from `fusion`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.onnx import (
    ExportError,
    OrtPipeline,
    Stage,
    as_stages,
    export_onnx,
    export_split,
    parity_report,
    stage_tensors,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


class Positional(nn.Module):
    """forward(x, y) -> (feature map, vector): positional tensors in, a tuple out; BatchNorm to see the modes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.conv(x))
        return h.relu(), h.mean(dim=(2, 3)) + y


class Keywords(nn.Module):
    """forward(image, scale) -> {"features", "pooled"}: keyword tensors in, a dict out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv(image) * scale
        return {"features": features, "pooled": features.amax(dim=(2, 3))}


class Nested(nn.Module):
    def forward(self, x: torch.Tensor):
        return x, (x + 1, object())  # nesting exports (tests/test_export_nested.py); an object leaf cannot


class CumSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)  # ONNX CumSum exists from opset 11


class KeywordOnlyDefault(nn.Module):
    """A keyword-only default the legacy exporter would pass positionally: needs the adapter."""

    def forward(self, x: torch.Tensor, *, factor: float = 2.0) -> torch.Tensor:
        return x * factor


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, dict(zip(names, session.run(None, {k: v.numpy() for k, v in feeds.items()})))


def _io_names(path):
    model = onnx.load(str(path))
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=0, atol=1e-4)


def test_positional_inputs_tuple_outputs_and_modes_restored(tmp_path):
    torch.manual_seed(0)
    model = Positional().train()
    model.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics, which a training forward would move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(1, 3, 8, 8), torch.rand(1, 4)
    details = export_onnx(model, (x, y), tmp_path / "positional.onnx")
    assert model.training and model.bn.training  # the caller's mode is back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # exported in eval mode
    assert details["input_names"] == ["input_0", "input_1"] and details["output_names"] == ["output_0", "output_1"]
    assert _io_names(details["path"]) == (["input_0", "input_1"], ["output_0", "output_1"])
    assert details["checker"] == "ok" and details["readiness_errors"] == 0
    assert details["parity"]["ok"] and details["max_abs_error"] <= 1e-4
    assert details["max_abs_error"] == max(o["max_abs"] for o in details["parity"]["outputs"].values())
    with torch.no_grad():
        expected = model.eval()(x, y)
    _, actual = _ort(details["path"], {"input_0": x, "input_1": y})
    _close(actual["output_0"], expected[0])
    _close(actual["output_1"], expected[1])
    model.train()
    report = parity_report(model, details["path"], [(x, y), (torch.rand(1, 3, 8, 8), torch.rand(1, 4))])
    assert report["ok"] and report["single"]["outputs"]["output_0"]["max_abs"] <= 1e-4  # positional samples
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    named = export_onnx(
        model, [x, y], tmp_path / "named.onnx", input_names=["x", "y"], output_names=["act", "vec"], simplify=False
    )
    assert _io_names(named["path"]) == (["x", "y"], ["act", "vec"])
    _, actual = _ort(named["path"], {"x": x, "y": y})
    _close(actual["vec"], expected[1])


@pytest.mark.parametrize("order", ["signature", "reversed"])
def test_dict_inputs_dict_outputs(tmp_path, order):
    torch.manual_seed(0)
    model = Keywords().eval()
    inputs = {"image": torch.rand(1, 3, 8, 8), "scale": torch.full((1, 1, 1, 1), 3.0)}
    if order == "reversed":  # not the forward's order: the graph must still bind each name to its tensor
        inputs = dict(reversed(inputs.items()))
    details = export_onnx(model, inputs, tmp_path / "keywords.onnx")
    assert not model.training
    assert details["input_names"] == list(inputs) and details["output_names"] == ["features", "pooled"]
    assert _io_names(details["path"]) == (list(inputs), ["features", "pooled"])
    assert details["max_abs_error"] <= 1e-4
    with torch.no_grad():
        expected = model(**inputs)
    names, actual = _ort(details["path"], inputs)
    assert names == ["features", "pooled"]
    for name in names:
        _close(actual[name], expected[name])

    renamed = export_onnx(model, inputs, tmp_path / "renamed.onnx", input_names=["a", "b"], output_names=["f", "p"])
    assert _io_names(renamed["path"]) == (["a", "b"], ["f", "p"])
    a, b = inputs.values()
    _, actual = _ort(renamed["path"], {"a": a, "b": b})
    _close(actual["p"], expected["pooled"])


def test_single_tensor_in_and_out(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8)
    details = export_onnx(model, x, tmp_path / "seq.onnx")
    assert details["input_names"] == ["input_0"] and details["output_names"] == ["output"]
    assert _io_names(details["path"]) == (["input_0"], ["output"])
    assert details["inputs"] == {"input_0": [2, 3, 8, 8]} and details["max_abs_error"] <= 1e-4
    _, actual = _ort(details["path"], {"input_0": x})
    with torch.no_grad():
        _close(actual["output"], model(x))
    adapted = export_onnx(KeywordOnlyDefault(), x, tmp_path / "kwonly.onnx")
    _, actual = _ort(adapted["path"], {"input_0": x})
    _close(actual["output"], 2 * x)


def test_bad_outputs_names_and_opsets_write_nothing(tmp_path):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="model output 'output_1.1' is a object, not a tensor"):
        export_onnx(Nested(), (x,), tmp_path / "nested.onnx")
    model = Positional().eval()
    inputs = (torch.rand(1, 3, 8, 8), torch.rand(1, 4))
    with pytest.raises(ValueError, match="1 input name"):
        export_onnx(model, inputs, tmp_path / "m.onnx", input_names=["x"])
    with pytest.raises(ValueError, match="3 output name"):
        export_onnx(model, inputs, tmp_path / "m.onnx", output_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="not a tensor"):
        export_onnx(model, (inputs[0], object()), tmp_path / "m.onnx")  # a float would be a baked constant
    with pytest.raises(ExportError, match="opset 9"):
        export_onnx(CumSum(), x, tmp_path / "m.onnx", opset=9)
    assert not list(tmp_path.iterdir())  # no graph and no temporary file


def test_split_declared_as_tuples(tmp_path):
    torch.manual_seed(0)
    model = Keywords().eval()
    inputs = {"image": torch.rand(1, 3, 8, 8), "scale": torch.full((1, 1, 1, 1), 0.5)}
    stages = [
        ("features", _Features(model), ("image", "scale"), ("features",)),
        Stage("pool", _Pool(), ("features",), ("pooled",)),
    ]
    assert [s.params for s in as_stages(stages)] == [4 * 3 * 9 + 4, 0]  # no owned_modules(): all parameters
    tensors = stage_tensors(stages, inputs)
    assert set(tensors) == {"image", "scale", "features", "pooled"}
    paths = export_split(stages, inputs, tmp_path)
    assert list(paths) == ["features", "pool"]
    chain = OrtPipeline(paths)
    assert chain.input_names == ["image", "scale"] and chain.output_names == ["pooled"]
    samples = [{"image": torch.rand(1, 3, 8, 8), "scale": torch.full((1, 1, 1, 1), 2.0)}]
    report = parity_report(
        _PooledOnly(model), paths, samples, metrics_fn=lambda run: {"sum": float(run(samples[0])["pooled"].sum())}
    )
    assert report["ok"] and report["split"]["outputs"]["pooled"]["max_abs"] <= 1e-4
    assert report["metrics"]["torch"]["sum"] == pytest.approx(report["metrics"]["split"]["sum"], abs=1e-4)
    with pytest.raises(ValueError, match="needs \\['missing'\\]"):
        stage_tensors([("bad", _Pool(), ("missing",), ("out",))], inputs)


class _Features(nn.Module):
    def __init__(self, model: Keywords):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.model(image, scale)["features"]


class _Pool(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.amax(dim=(2, 3))


class _PooledOnly(nn.Module):
    def __init__(self, model: Keywords):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.model(image, scale)["pooled"]}


@pytest.mark.slow  # a fresh interpreter; default set: test_architecture's fresh-interpreter check
def test_export_imports_nothing_from_fusion():
    code = (
        "import export.onnx, export.engines, export.tensorrt, export.trt_check, export.parity, export.runtime; "
        "import sys; assert not any(m == 'fusion' or m.startswith('fusion.') for m in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
