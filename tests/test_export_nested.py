"""Nested inputs and outputs in `export_onnx` (export/onnx.py, docs/export_nesting.md): a dict as a positional
argument, keyword arguments, nested tuples/lists/namedtuples, dict and tuple outputs, constant leaves, the naming
scheme, ONNX Runtime parity per output, learned-query `nn.MultiheadAttention` (its fused eval fast path
included), and `altermoma export onnx --task` on a dict-input user model. Tiny models: a few seconds."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import altermoma.cli
from export.onnx import (
    ExportError,
    export_onnx,
    flatten_call,
    flatten_outputs,
    graph_feeds,
    mha_fastpath_off,
    parity_report,
)

torch.set_num_threads(1)

Pair = namedtuple("Pair", ["left", "right"])


class DictModel(nn.Module):
    """forward(batch) with one dict: points, a list of camera images, constants and a target it never reads."""

    def __init__(self):
        super().__init__()
        self.point_mlp = nn.Linear(3, 8)
        self.cam = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, batch: dict) -> dict:
        points = self.point_mlp(batch["points"]).relu().mean(dim=1)  # (B, 8)
        cams = torch.stack([self.cam(image).mean(dim=(2, 3)) for image in batch["cams"]], dim=1)  # (B, C, 8)
        fused = points * batch["scale"] + (cams.sum(dim=1) if batch["mode"] == "sum" else cams.amax(dim=1))
        heatmap = self.head(fused)
        return {"heatmap": heatmap, "boxes": (fused[:, :2], fused[:, 2:] * 2), "num_classes": 4}


def _batch(seed: int, mode: str = "sum") -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "points": torch.rand(2, 16, 3, generator=g),
        "cams": [torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)],
        "scale": 0.5,
        "mode": mode,
        "meta": None,
        "labels": torch.rand(2, 4, generator=g),  # a target: the model never reads it
    }


DICT_INPUTS = ["input_0.points", "input_0.cams.0", "input_0.cams.1"]
DICT_OUTPUTS = ["heatmap", "boxes.0", "boxes.1"]


class TupleModel(nn.Module):
    """forward(x, pair) with pair = (a, [b, c]): nested tuple/list inputs; returns a nested tuple with a None."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, pair: tuple) -> tuple:
        a, (b, c) = pair
        y = self.lin(x) + a
        return y, (b * c, [y.sum(dim=1, keepdim=True), None])


class NamedModel(nn.Module):
    def forward(self, x: torch.Tensor, pair: Pair) -> Pair:
        return Pair(left=x + pair.left, right={"prod": x * pair.right})


class Opaque:
    """A leaf type the exporter cannot take."""


def _io_names(path) -> tuple[list[str], list[str]]:
    model = onnx.load(str(path))
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _ort(path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))


def _max_error(actual: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    assert list(actual) == list(expected)
    return {name: float(np.abs(actual[name] - expected[name].numpy()).max()) for name in expected}


# ---- dict, keyword and nested inputs; dict and tuple outputs --------------------------------------------------------
def test_dict_positional_input_dict_outputs(tmp_path):
    torch.manual_seed(0)
    model = DictModel().eval()
    details = export_onnx(model, (_batch(0),), tmp_path / "dict.onnx")
    assert details["input_names"] == DICT_INPUTS and details["output_names"] == DICT_OUTPUTS
    assert _io_names(details["path"]) == (DICT_INPUTS, DICT_OUTPUTS)
    assert details["constant_inputs"] == {"input_0.scale": "0.5", "input_0.mode": "'sum'", "input_0.meta": "None"}
    assert details["unused_inputs"] == ["input_0.labels"]
    assert details["constant_outputs"] == {"num_classes": "4"}
    assert details["inputs"]["input_0.cams.1"] == [2, 3, 8, 8] and details["outputs"]["boxes.1"] == [2, 6]
    assert set(details["parity"]["outputs"]) == set(DICT_OUTPUTS)  # compared one by one, by name
    assert all(o["max_abs"] <= 1e-4 for o in details["parity"]["outputs"].values()) and details["parity"]["ok"]
    assert details["readiness_errors"] == 0

    fresh = _batch(7)  # data the export never saw: the graph reads the tensors, the constants are baked in
    with torch.no_grad():
        expected = flatten_outputs(model(fresh)).tensors
    errors = _max_error(_ort(details["path"], graph_feeds((fresh,))), expected)
    assert max(errors.values()) <= 1e-4, errors


def test_constants_are_baked_not_inputs(tmp_path):
    """Another constant is another graph: "mode" picks sum or max, and the graph follows the example's choice."""
    torch.manual_seed(0)
    model = DictModel().eval()
    summed = export_onnx(model, (_batch(0, "sum"),), tmp_path / "sum.onnx")
    maxed = export_onnx(model, (_batch(0, "max"),), tmp_path / "max.onnx")
    assert summed["input_names"] == maxed["input_names"] == DICT_INPUTS
    feeds = graph_feeds((_batch(3),))
    got_sum, got_max = _ort(summed["path"], feeds), _ort(maxed["path"], feeds)
    with torch.no_grad():
        want_sum = model(_batch(3, "sum"))["heatmap"].numpy()
        want_max = model(_batch(3, "max"))["heatmap"].numpy()
    assert np.abs(got_sum["heatmap"] - want_sum).max() <= 1e-4
    assert np.abs(got_max["heatmap"] - want_max).max() <= 1e-4
    assert np.abs(want_sum - want_max).max() > 1e-2  # the two constants give different functions


def test_keyword_nested_input(tmp_path):
    torch.manual_seed(0)
    model = DictModel().eval()
    details = export_onnx(model, {"batch": _batch(0)}, tmp_path / "kw.onnx")
    names = ["batch.points", "batch.cams.0", "batch.cams.1"]
    assert details["input_names"] == names and _io_names(details["path"])[0] == names
    assert details["max_abs_error"] <= 1e-4
    report = parity_report(model, details["path"], [{"batch": _batch(1)}, {"batch": _batch(2)}])
    assert report["ok"] and set(report["single"]["outputs"]) == set(DICT_OUTPUTS)
    assert report["max_abs"]["single"] <= 1e-4
    with pytest.raises(ValueError, match="nested differently"):
        parity_report(model, details["path"], [{"batch": _batch(1)}, {"batch": {**_batch(2), "extra": 1}}])


def test_nested_tuple_list_inputs_and_tuple_outputs(tmp_path):
    torch.manual_seed(0)
    model = TupleModel().eval()
    x, a, b, c = (torch.rand(3, 6) for _ in range(4))
    details = export_onnx(model, (x, (a, [b, c])), tmp_path / "tuple.onnx")
    inputs = ["input_0", "input_1.0", "input_1.1.0", "input_1.1.1"]
    outputs = ["output_0", "output_1.0", "output_1.1.0"]
    assert _io_names(details["path"]) == (inputs, outputs)
    assert details["constant_outputs"] == {"output_1.1.1": "None"}
    assert "constant_inputs" not in details and "unused_inputs" not in details
    assert details["max_abs_error"] <= 1e-4 and details["parity"]["ok"]

    sample = (torch.rand(3, 6), (torch.rand(3, 6), [torch.rand(3, 6), torch.rand(3, 6)]))
    with torch.no_grad():
        expected = flatten_outputs(model(*sample)).tensors
    assert max(_max_error(_ort(details["path"], graph_feeds(sample)), expected).values()) <= 1e-4
    report = parity_report(model, details["path"], [sample])  # nested positional samples
    assert report["ok"] and report["max_abs"]["single"] <= 1e-4

    names = {"input_names": ["x", "a", "b", "c"], "output_names": ["y", "s", "t"]}
    renamed = export_onnx(model, (x, (a, [b, c])), tmp_path / "renamed.onnx", **names)
    assert _io_names(renamed["path"]) == (["x", "a", "b", "c"], ["y", "s", "t"])
    with pytest.raises(ValueError, match="2 input name"):
        export_onnx(model, (x, (a, [b, c])), tmp_path / "bad.onnx", input_names=["x", "a"])


def test_namedtuple_fields_and_naming_rules(tmp_path):
    x, left, right = torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3)
    details = export_onnx(NamedModel(), (x, Pair(left, right)), tmp_path / "named.onnx")
    assert _io_names(details["path"]) == (["input_0", "input_1.left", "input_1.right"], ["output_0", "output_1.prod"])
    assert details["max_abs_error"] <= 1e-4

    # Unsafe characters become "_"; a name taken by an earlier leaf gets the smallest free suffix.
    call = flatten_call(({"cam front": x, "cam_front": left, "cam_front_1": right, "a:b,c": [x]},))
    assert call.names == ["input_0.cam_front", "input_0.cam_front_2", "input_0.cam_front_1", "input_0.a_b_c.0"]
    assert flatten_call({"image": x, "extra": {"k/v": x}}).names == ["image", "extra.k_v"]
    assert flatten_call((x, left)).names == ["input_0", "input_1"]  # plain tensors: the names they always had
    assert list(flatten_outputs({"a.b": x, "c": {7: x}}).tensors) == ["a.b", "c.7"]


def test_unexportable_leaf_is_refused_before_any_work(tmp_path):
    model = DictModel().eval()
    batch = {**_batch(0), "calib": Opaque()}
    with pytest.raises(ValueError, match="example input 'input_0.calib' is a Opaque, not a tensor"):
        export_onnx(model, (batch,), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="model output 'output_1' is a Opaque"):
        export_onnx(_ReturnsOpaque(), torch.rand(2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="no tensors"):
        export_onnx(_ReturnsOpaque(constant=True), torch.rand(2), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


class _ReturnsOpaque(nn.Module):
    def __init__(self, constant: bool = False):
        super().__init__()
        self.constant = constant

    def forward(self, x: torch.Tensor):
        return (1, None) if self.constant else (x * 2, Opaque())


def test_plain_unused_input_is_still_an_error(tmp_path):
    """A plain tensor argument the model ignores stays an error (unlike a nested batch's unread target)."""
    with pytest.raises(ExportError, match="an unused input"):
        export_onnx(_FirstOnly(), (torch.rand(2), torch.rand(2)), tmp_path / "m.onnx")


class _FirstOnly(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 2


# ---- attention with a learned query --------------------------------------------------------------------------
class LearnedQuery(nn.Module):
    """A learned query expanded over the batch: self-attention over the queries, then cross-attention to `x`."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.query = nn.Parameter(torch.randn(5, 16))
        self.self_attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.cross_attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x: torch.Tensor):
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        if not self.batch_first:
            q, x = q.transpose(0, 1), x.transpose(0, 1)
        q, self_weights = self.self_attn(q, q, q, need_weights=self.need_weights)
        out, cross_weights = self.cross_attn(q, x, x, need_weights=self.need_weights)
        return out, self_weights, cross_weights  # the weights are None without need_weights


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_learned_query_attention(tmp_path, monkeypatch, batch_first, need_weights):
    torch.manual_seed(0)
    model = LearnedQuery(batch_first, need_weights).eval()
    x = torch.rand(2, 7, 16)
    fused, native = [], torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: fused.append(1) or native(*a, **k))
    with torch.no_grad():
        model(x)
    assert fused or not batch_first  # eval + no grad + batch_first self-attention: PyTorch's fused fast path

    details = export_onnx(model, x, tmp_path / "attn.onnx", simplify=batch_first)  # onnxslim: once is enough
    outputs = ["output_0", "output_1", "output_2"] if need_weights else ["output_0"]
    assert _io_names(details["path"]) == (["input_0"], outputs)
    if not need_weights:
        assert details["constant_outputs"] == {"output_1": "None", "output_2": "None"}
    assert details["parity"]["ok"] and details["max_abs_error"] <= 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # switched off for the trace only

    fresh = torch.rand(2, 7, 16)
    with torch.no_grad():
        expected = flatten_outputs(model(fresh)).tensors
    assert max(_max_error(_ort(details["path"], graph_feeds(fresh)), expected).values()) <= 1e-4


def test_mha_fastpath_off_restores_the_flag():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with mha_fastpath_off():
            assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()  # the caller's setting, not True
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(RuntimeError), mha_fastpath_off():
        raise RuntimeError
    assert torch.backends.mha.get_fastpath_enabled()


# ---- the CLI: altermoma export onnx --task on a dict-input user model ---------------------------------------
USER_FILE = """
import torch, altermoma
from torch import nn


class DictFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.camera = nn.Conv2d(3, 32, 3, padding=1)
        self.lidar = nn.Linear(3, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, batch):
        cam = torch.stack([self.camera(c).mean(dim=(2, 3)) for c in batch["cams"]]).sum(0)
        lid = self.lidar(batch["points"]).relu().amax(dim=1)
        return {"logits": self.head(cam + lid * batch["gain"])}


def _batch(seed, leaf=None):
    g = torch.Generator().manual_seed(seed)
    batch = {"points": torch.rand(1, 32, 3, generator=g), "cams": [torch.rand(1, 3, 8, 8, generator=g)] * 2,
             "gain": 0.5, "target": torch.rand(1, 2, generator=g)}
    if leaf is not None:
        batch["calib"] = leaf
    return batch


def _task():
    partition = {"camera": ["camera"], "lidar": ["lidar"], "fusion": ["head"]}
    return altermoma.Task(partition, lambda out, batch: ((out["logits"] - batch["target"]) ** 2).mean())


def setup():
    torch.manual_seed(0)
    return altermoma.Setup(model=DictFusion(), task=_task(), scoring_batches=[_batch(0), _batch(1)])


class Opaque:
    pass


def opaque():
    torch.manual_seed(0)
    return altermoma.Setup(model=DictFusion(), task=_task(), scoring_batches=[_batch(0, Opaque())])
"""


def test_cli_task_export_of_a_dict_input_model(tmp_path, capsys):
    user = tmp_path / "dict_user.py"
    user.write_text(USER_FILE)
    out = tmp_path / "onnx"
    code = altermoma.cli.main(["export", "onnx", "--task", f"{user}:setup", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    names = ["input_0.points", "input_0.cams.0", "input_0.cams.1"]
    assert _io_names(out / "model.onnx") == (names, ["logits"])
    report = json.loads((out / "export_report.json").read_text())
    assert report["input_names"] == names and report["max_abs_error"] <= 1e-4
    assert report["constant_inputs"] == {"input_0.gain": "0.5"} and report["unused_inputs"] == ["input_0.target"]
    assert "input_0.gain=0.5" in printed.out and "input_0.target" in printed.out


def test_cli_task_bench_of_a_dict_input_model(tmp_path):
    """`bench --task` feeds the exported graph by input name: nested arguments included."""
    user = tmp_path / "dict_user.py"
    user.write_text(USER_FILE)
    out = tmp_path / "bench"
    argv = ["bench", "--task", f"{user}:setup", "--runs", "1", "--warmup", "0", "--out", str(out)]
    assert altermoma.cli.main(argv) == 0
    (row,) = json.loads((out / "bench.json").read_text())["models"]
    assert row["onnx_max_abs_error"] <= 1e-4 and row["ort_cpu"]["median_ms"] > 0


def test_cli_prune_then_export_of_a_dict_input_model(tmp_path):
    """The issue's case: a dict-input user model pruned, then exported from its pruned checkpoint."""
    user = tmp_path / "dict_user.py"
    user.write_text(USER_FILE)
    spec, pruned, out = f"{user}:setup", tmp_path / "pruned", tmp_path / "onnx"
    argv = ["prune", "--task", spec, "--method", "magnitude", "--channel-ratio", "0.5", "--out", str(pruned)]
    assert altermoma.cli.main(argv) == 0
    assert altermoma.cli.main(["export", "onnx", "--task", spec, "--checkpoint", str(pruned), "--out", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["input_names"] == ["input_0.points", "input_0.cams.0", "input_0.cams.1"]
    assert report["max_abs_error"] <= 1e-4
    weights = {i.name: list(i.dims) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert any(dims[:1] == [16] for dims in weights.values())  # the 32 camera/LiDAR channels were halved


def test_cli_task_export_refuses_an_unexportable_leaf(tmp_path, capsys):
    user = tmp_path / "dict_user.py"
    user.write_text(USER_FILE)
    out = tmp_path / "onnx"
    code = altermoma.cli.main(["export", "onnx", "--task", f"{user}:opaque", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err, err
    assert "'input_0.calib' is a Opaque" in err
    assert not out.exists()
