"""Tests for export.trt_check: every rule fires on a planted bad graph, and a clean graph stays clean."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.trt_check import Finding, check_model, format_findings, main

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def _vi(name: str, shape: list[int | str], elem: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    opset: int = 17,
    extra_opsets: Sequence[onnx.OperatorSetIdProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _rules(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.rule, f.severity) for f in findings}


def _clean_model() -> onnx.ModelProto:
    """Conv + Relu + Gather + CumSum with static shapes at opset 17."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Gather", ["r", "gidx"], ["g"], name="gather", axis=1),
        helper.make_node("CumSum", ["g", "axis"], ["y"], name="cumsum"),
    ]
    inits = [
        _init("w", np.zeros((4, 3, 3, 3), np.float32)),
        _init("gidx", np.array([0, 2], np.int64)),
        _init("axis", np.array(3, np.int64)),
    ]
    return _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 2, 8, 8])], inits)


def _scatternd_model(reduction: str | None, opset: int = 18) -> onnx.ModelProto:
    attrs = {} if reduction is None else {"reduction": reduction}
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["y"], name="snd", **attrs)
    inputs = [_vi("data", [4, 4]), _vi("idx", [2, 1], I64), _vi("upd", [2, 4])]
    return _model([node], inputs, [_vi("y", [4, 4])], opset=opset)


def _scatterelements_model(idx_type: int, opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["y"], name="se", axis=1, reduction="add")
    inputs = [_vi("data", [2, 6]), _vi("idx", [2, 3], idx_type), _vi("upd", [2, 3])]
    return _model([node], inputs, [_vi("y", [2, 6])], opset=opset)


def _topk_model(k_initializer: int | None = None, sorted_: int = 1) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, sorted=sorted_)
    inputs = [_vi("x", [1, 5000])]
    inits = []
    if k_initializer is None:
        inputs.append(_vi("k", [1], I64))
        k = 10
    else:
        inits.append(_init("k", np.array([k_initializer], np.int64)))
        k = k_initializer
    return _model([node], inputs, [_vi("v", [1, k]), _vi("i", [1, k], I64)], inits)


def test_clean_graph_has_no_findings() -> None:
    model = _clean_model()
    onnx.checker.check_model(model, full_check=True)
    assert check_model(model) == []
    assert format_findings(check_model(model)) == "no findings"


def test_scatternd_reduction_is_error() -> None:
    findings = check_model(_scatternd_model("add"))
    assert _rules(findings) == {("scatternd-reduction", "error")}
    assert findings[0].node == "snd" and findings[0].op_type == "ScatterND"


def test_scatternd_without_reduction_is_clean() -> None:
    assert check_model(_scatternd_model(None)) == []


def test_legacy_index_put_accumulate_pattern_is_error() -> None:
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("v", F32, [1], [0.0])),
        helper.make_node("ScatterND", ["zeros", "idx", "upd"], ["scattered"], name="snd"),
        helper.make_node("Add", ["x", "scattered"], ["y"]),
    ]
    inputs = [_vi("x", [4, 4]), _vi("idx", [2, 1], I64), _vi("upd", [2, 4])]
    model = _model(nodes, inputs, [_vi("y", [4, 4])], [_init("shape", np.array([4, 4], np.int64))])
    assert _rules(check_model(model)) == {("index-put-accumulate", "error")}


def test_scatternd_duplicate_constant_indices_is_error() -> None:
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["y"], name="snd")
    inputs = [_vi("data", [4, 4]), _vi("upd", [2, 4])]
    model = _model([node], inputs, [_vi("y", [4, 4])], [_init("idx", np.array([[1], [1]], np.int64))])
    assert _rules(check_model(model)) == {("scatternd-duplicate-indices", "error")}


def test_scatterelements_reduction_is_plugin_warning() -> None:
    assert _rules(check_model(_scatterelements_model(I64))) == {("scatterelements-plugin", "warning")}


def test_scatterelements_int32_indices_is_error() -> None:
    rules = _rules(check_model(_scatterelements_model(TensorProto.INT32)))
    assert rules == {("scatterelements-plugin", "warning"), ("scatter-int32-indices", "error")}


def test_topk_too_large_is_error() -> None:
    assert _rules(check_model(_topk_model(k_initializer=4000))) == {("topk-too-large", "error")}
    assert check_model(_topk_model(k_initializer=100)) == []


def test_topk_dynamic_k_is_warning() -> None:
    assert _rules(check_model(_topk_model(k_initializer=None))) == {("topk-dynamic-k", "warning")}


def test_topk_unsorted_is_error() -> None:
    assert _rules(check_model(_topk_model(k_initializer=10, sorted_=0))) == {("topk-unsorted", "error")}


@pytest.mark.parametrize("op_type", ["Unique", "NonZero", "Compress"])
def test_unsupported_ops_are_errors(op_type: str) -> None:
    inputs = [_vi("x", [6])]
    node_inputs = ["x"]
    if op_type == "Compress":
        inputs.append(_vi("cond", [6], TensorProto.BOOL))
        node_inputs.append("cond")
    node = helper.make_node(op_type, node_inputs, ["y"], name="bad")
    findings = check_model(_model([node], inputs, [_vi("y", ["n"])]))
    assert ("unsupported-op", "error") in _rules(findings)
    assert any(f.rule == "unsupported-op" and f.node == "bad" and f.op_type == op_type for f in findings)


def test_loop_with_dynamic_trip_count_and_scan_output_is_error() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["x"], ["scan"]),
        ],
        "body",
        [_vi("iter", [], I64), _vi("cond_in", [], TensorProto.BOOL)],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("scan", [3])],
    )
    loop = helper.make_node("Loop", ["trip", "cond"], ["stacked"], name="loop", body=body)
    inputs = [_vi("x", [3]), _vi("trip", [], I64), _vi("cond", [], TensorProto.BOOL)]
    findings = check_model(_model([loop], inputs, [_vi("stacked", ["n", 3])]))
    assert any(f.rule == "unsupported-op" and f.severity == "error" and f.node == "loop" for f in findings)


def test_custom_domain_is_warning() -> None:
    node = helper.make_node("BevPool", ["x"], ["y"], name="bevpool", domain="com.altermoma")
    model = _model(
        [node], [_vi("x", [1, 4])], [_vi("y", [1, 4])], extra_opsets=[helper.make_opsetid("com.altermoma", 1)]
    )
    assert _rules(check_model(model)) == {("custom-op", "warning")}


def test_dynamic_input_is_error_and_dynamic_output_is_warning() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    findings = check_model(_model([node], [_vi("x", ["batch", 4])], [_vi("y", ["batch", 4])]))
    assert {(f.rule, f.severity, f.node) for f in findings} == {
        ("dynamic-shape", "error", "x"),
        ("dynamic-shape", "warning", "y"),
    }


def test_fp16_flags_risky_ops_only_when_fp16() -> None:
    nodes = [helper.make_node("Exp", ["x"], ["e"], name="exp"), helper.make_node("CumSum", ["e", "axis"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 8])], [_vi("y", [1, 8])], [_init("axis", np.array(1, np.int64))])
    assert check_model(model, fp16=False) == []
    findings = check_model(model, fp16=True)
    assert {(f.rule, f.severity, f.op_type) for f in findings} == {
        ("fp32-only", "warning", "Exp"),
        ("fp32-only", "warning", "CumSum"),
    }
    assert all("--precisionConstraints=obey" in f.message for f in findings)


def test_double_tensor_is_warning() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], to=F32)
    findings = check_model(_model([node], [_vi("x", [2], TensorProto.DOUBLE)], [_vi("y", [2])]))
    assert {(f.rule, f.severity, f.node) for f in findings} == {("double", "warning", "x")}


@pytest.mark.parametrize(("opset", "severity"), [(8, "error"), (25, "error"), (21, "warning")])
def test_opset_range(opset: int, severity: str) -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=opset)
    assert _rules(check_model(model)) == {("opset", severity)}


def test_reduction_attribute_below_opset_16_is_warning() -> None:
    rules = _rules(check_model(_scatterelements_model(I64, opset=13)))
    assert rules == {("opset", "warning"), ("scatterelements-plugin", "warning")}


def test_rules_walk_into_subgraphs() -> None:
    scatter = helper.make_node("ScatterND", ["data", "idx", "upd"], ["t"], name="inner", reduction="add")
    then_branch = helper.make_graph([scatter], "then", [], [_vi("t", [4, 4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["data"], ["e"])], "else", [], [_vi("e", [4, 4])])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)
    inputs = [_vi("c", [], TensorProto.BOOL), _vi("data", [4, 4]), _vi("idx", [2, 1], I64), _vi("upd", [2, 4])]
    findings = check_model(_model([node], inputs, [_vi("y", [4, 4])], opset=18))
    assert [(f.rule, f.severity, f.node) for f in findings] == [("scatternd-reduction", "error", "inner")]


def test_check_model_accepts_paths_and_external_data(tmp_path: Path) -> None:
    model = _scatternd_model("add")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert _rules(check_model(str(path))) == {("scatternd-reduction", "error")}
    assert _rules(check_model(path)) == {("scatternd-reduction", "error")}

    clean = _clean_model()
    ext_path = tmp_path / "ext.onnx"
    onnx.save(clean, ext_path, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    assert check_model(ext_path) == []


def test_format_findings_report() -> None:
    findings = check_model(_scatterelements_model(TensorProto.INT32))
    report = format_findings(findings)
    lines = report.splitlines()
    assert lines[0] == "TensorRT readiness: 1 error(s), 1 warning(s)"
    assert "ERROR" in lines[1] and "[scatter-int32-indices]" in lines[1] and "se (ScatterElements)" in lines[1]
    assert "WARNING" in lines[2] and "[scatterelements-plugin]" in lines[2]


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(_scatternd_model("add"), bad)
    onnx.save(_clean_model(), good)
    assert main([str(bad)]) == 1
    assert main([str(good)]) == 0
    assert "no findings" in capsys.readouterr().out


def _export_legacy(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


class _ScatterAdd(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 4, 10).scatter_add(2, idx, x)


class _IndexPutAccumulate(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(10, 4)
        out.index_put_((idx,), x, accumulate=True)
        return out


def test_torch_scatter_add_export_is_plugin_warning_only() -> None:
    model = _export_legacy(_ScatterAdd(), (torch.randn(1, 4, 5), torch.randint(0, 10, (1, 4, 5))))
    findings = check_model(model)
    assert [(f.rule, f.severity) for f in findings] == [("scatterelements-plugin", "warning")]


def test_torch_index_put_accumulate_export_is_flagged() -> None:
    args = (torch.randn(6, 4), torch.tensor([0, 1, 1, 3, 3, 3]))
    try:
        model = _export_legacy(_IndexPutAccumulate(), args)
    except Exception as exc:  # noqa: BLE001 - an exporter refusal is an outcome, not a checker failure
        pytest.skip(f"legacy exporter refused index_put(accumulate=True): {exc}")
    op_types = {n.op_type for n in model.graph.node}
    rules = _rules(check_model(model))
    if "ScatterND" in op_types:
        # Legacy lowering: Add(self, ScatterND(zeros, idx, x)); reduction-less ScatterND drops duplicate updates.
        assert rules & {("index-put-accumulate", "error"), ("scatternd-reduction", "error")}, rules
    else:
        # Any other accumulate lowering must go through a reducing ScatterElements, which needs the plugin.
        assert "ScatterElements" in op_types, op_types
        assert ("scatterelements-plugin", "warning") in rules, rules
