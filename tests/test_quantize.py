"""INT8 Q/DQ quantization (issue 14): placement rules, storage, ONNX export and readiness, CLI errors.

The ModelOpt tests skip with a reason where `nvidia-modelopt` is absent (install the `quant` extra);
the TensorRT Q/DQ readiness rules need only onnx and always run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from common.task import Task
from export import trt_check
from export.quantize import QuantizeConfig, QuantizeError, modelopt_missing

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fusion" / "weights"


@functools.cache
def missing() -> str | None:
    """Why ModelOpt cannot be used, asked when a test needs it: importing it takes ~14 s, which every xdist worker
    would pay while collecting (a module-level check), whether or not it runs a test of this file."""
    return modelopt_missing()


@pytest.fixture
def modelopt_ready():
    if missing():
        pytest.skip(missing())


needs_modelopt = pytest.mark.usefixtures("modelopt_ready")


class Toy(nn.Module):
    """Conv+BN+ReLU, a residual Add, a Concat, one tensor read by two convs, a transposed conv, a linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 1)
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(image)
        x = torch.relu(self.block(x) + x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = self.up(x)
        return {"map": x, "logits": self.fc(x.mean(dim=(2, 3)))}


def toy_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Toy().eval()
    for bn in (model.stem[1], model.block[1], model.up[1]):  # non-trivial statistics, so fusion matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    task = Task(partition={"camera": ("stem", "block", "left", "right", "up", "fc")}, loss=lambda o, b: o["map"].sum())
    batches = [torch.rand(2, 3, 16, 16) for _ in range(4)]
    return model, task, batches


@needs_modelopt
def test_quantize_fuses_bn_skips_and_shares():
    from export.quantize import quantize, quantizers

    model, task, batches = toy_setup()
    with torch.no_grad():
        fp = model(batches[0])
    report = quantize(model, task, batches, QuantizeConfig(skip=("fc",)), progress=False)
    # Conv+BN fused (the transposed one too), BN gone, outputs unchanged by the fusion
    assert sorted(report["fused_conv_bn"]) == [["block.0", "block.1"], ["stem.0", "stem.1"], ["up.0", "up.1"]]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report["fusion_max_scaled_error"] < 1e-5
    table = quantizers(model)
    # skipped: no enabled quantizer under fc; the convs' weights and inputs are quantized
    assert not any(q.is_enabled for name, q in table.items() if name.startswith("fc."))
    assert table["stem.0.weight_quantizer"].is_enabled and table["stem.0.input_quantizer"].is_enabled
    assert table["stem.0.weight_quantizer"].axis == 0
    assert table["up.0.weight_quantizer"].axis == 1  # transposed conv: output channels are axis 1
    # left and right read the same tensor: one scale
    assert ["left.input_quantizer", "right.input_quantizer"] in report["shared_groups"]
    assert torch.equal(table["left.input_quantizer"].amax, table["right.input_quantizer"].amax)
    # quantized, but close: INT8 error is small and not zero
    with torch.no_grad():
        q = model(batches[0])
    err = (q["map"] - fp["map"]).abs().max().item()
    assert 0 < err < 0.1 * fp["map"].abs().max().item()


@needs_modelopt
def test_quantize_refuses_bad_input():
    from export.quantize import quantize

    model, task, batches = toy_setup()
    with pytest.raises(QuantizeError, match="no calibration batches"):
        quantize(model, task, [], progress=False)
    with pytest.raises(QuantizeError, match="no module named 'nope'"):
        quantize(model, task, batches, QuantizeConfig(skip=("nope",)), progress=False)
    with pytest.raises(QuantizeError, match="calibration method"):
        quantize(model, task, batches, QuantizeConfig(method="entropy"), progress=False)


class Tapped(nn.Module):
    """A conv whose output feeds its BatchNorm AND an Add: folding the BN into it would change the Add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@needs_modelopt
def test_fusion_that_changes_outputs_is_refused():
    from export.quantize import quantize

    torch.manual_seed(0)
    model = Tapped().eval()
    model.bn.running_var.fill_(4.0)
    task = Task(partition={"camera": ("conv", "bn")}, loss=lambda o, b: o.sum())
    with pytest.raises(QuantizeError, match="fuse_conv_bn=False"):
        quantize(model, task, [torch.rand(1, 3, 8, 8)], progress=False)
    model = Tapped().eval()
    model.bn.running_var.fill_(4.0)
    report = quantize(model, task, [torch.rand(1, 3, 8, 8)], QuantizeConfig(fuse_conv_bn=False), progress=False)
    assert report["fused_conv_bn"] == []


@needs_modelopt
def test_save_load_roundtrip_is_exact(tmp_path):
    from export.quantize import load_quantized, quantize, save_quantized

    model, task, batches = toy_setup()
    report = quantize(model, task, batches, progress=False)
    save_quantized(model, tmp_path / "q", report, {"note": "toy"})
    meta = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert meta["format"] == "altermoma-quantized" and meta["note"] == "toy"
    assert not list((tmp_path / "q").glob("*.pt")) and not list((tmp_path / "q").glob("*.pkl"))
    fresh, _, _ = toy_setup(seed=1)  # other random weights: everything must come from the files
    load_quantized(fresh, tmp_path / "q")
    with torch.no_grad():
        a, b = model(batches[1]), fresh(batches[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_modelopt
def test_qdq_export_is_trt_ready_and_matches_fake_quant(tmp_path):
    from export.onnx import export_onnx
    from export.quantize import quantize

    model, task, batches = toy_setup()
    quantize(model, task, batches, QuantizeConfig(skip=("fc",)), progress=False)
    report = export_onnx(model, batches[1][:1], tmp_path / "toy.onnx")
    assert report["quantized"] and report["readiness_errors"] == 0
    assert report["ops"]["QuantizeLinear"] == report["ops"]["DequantizeLinear"] >= 10
    graph = onnx.load(tmp_path / "toy.onnx")
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "fc" in n.name for n in graph.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    # A shallow net: ONNX Runtime's Q/DQ matches PyTorch's fake-quant to float rounding.
    assert report["max_abs_error"] < 1e-4


@needs_modelopt
def test_onnx_qdq_semantics_is_the_graph_arithmetic(tmp_path):
    """Under `onnx_qdq_semantics` a quantizer computes QuantizeLinear/DequantizeLinear exactly (x / (amax/127),
    half to even, [-128, 127], q * scale), which ModelOpt's own formula (x * (127/amax)) does not always."""
    from export.onnx import export_onnx
    from export.quantize import onnx_qdq_semantics, ort_qdq_session, quantize, quantizers

    model, task, batches = toy_setup()
    quantize(model, task, batches, progress=False)
    quantizer = quantizers(model)["left.input_quantizer"]
    amax = quantizer.amax.float()
    x = torch.linspace(-1.2, 1.2, 200_001) * amax  # fine grid: rounding boundaries and saturation both hit
    scale = (amax / 127).numpy()
    expected = np.clip(np.rint(x.numpy() / scale), -128, 127) * scale
    with torch.no_grad():
        with onnx_qdq_semantics():
            exact = quantizer(x).numpy()
        modelopt = quantizer(x).numpy()
    np.testing.assert_array_equal(exact, expected.astype(np.float32))
    assert not np.array_equal(modelopt, exact)  # the float32 formulas disagree on some boundary values
    # The whole toy graph in ONNX Runtime (inexact optimizers off) against the PyTorch model with the same arithmetic
    export_onnx(model, batches[1][:1], tmp_path / "toy.onnx")
    session = ort_qdq_session(tmp_path / "toy.onnx", threads=1, exact=True)
    for batch in batches:
        for image in batch.split(1):
            with torch.no_grad(), onnx_qdq_semantics():
                ref = model(image)
            out = dict(
                zip(
                    [o.name for o in session.get_outputs()],
                    session.run(None, {session.get_inputs()[0].name: image.numpy()}),
                )
            )
            for name, value in ref.items():
                assert np.abs(out[name] - value.numpy()).max() < 1e-5, name


def _qdq_graph(zero_point=0, zp_type=TensorProto.INT8, scale=0.1, axis=None, then="DequantizeLinear", w_axis=0):
    """x -> Q -> DQ (or `then`) -> Conv(weight: Q -> DQ per channel on `w_axis`)."""
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    w_scale = np.full(weight.shape[w_axis], 0.01, np.float32)
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32) if axis is None else np.full(3, scale, np.float32), "s"),
        helper.make_tensor("zp", zp_type, [] if axis is None else [3], [zero_point] * (1 if axis is None else 3)),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        helper.make_tensor("wzp", TensorProto.INT8, [len(w_scale)], [0] * len(w_scale)),
    ]
    q_attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q", **q_attrs),
        helper.make_node(
            then,
            ["xq", "s", "zp"] if then == "DequantizeLinear" else ["xq"],
            ["xd"],
            name="dq",
            **(q_attrs if then == "DequantizeLinear" else {}),
        ),
        helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], name="wq", axis=w_axis),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], name="wdq", axis=w_axis),
        helper.make_node("Conv", ["xd" if then == "DequantizeLinear" else "x", "wd"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _errors(model) -> set[str]:
    return {f.rule for f in trt_check.check_model(model) if f.severity == trt_check.ERROR}


def test_trt_qdq_rules():
    assert _errors(_qdq_graph()) == set()
    assert "qdq-zero-point" in _errors(_qdq_graph(zero_point=3))
    assert "qdq-int8" in _errors(_qdq_graph(zp_type=TensorProto.UINT8))
    assert "qdq-scale" in _errors(_qdq_graph(scale=-0.1))
    assert "qdq-axis" in _errors(_qdq_graph(axis=1))  # per-channel activations
    assert "qdq-axis" in _errors(_qdq_graph(w_axis=1))  # a Conv weight quantized on its input channels
    assert "qdq-pair" in _errors(_qdq_graph(then="Relu"))  # a Q not followed by DQ


# ----------------------------------------------------------------------------------------------------------
# The reference model and the CLI


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    """`altermoma quantize --onnx` on the shipped tiny fusion checkpoint: (output folder, printed lines)."""
    if missing():
        pytest.skip(missing())
    from altermoma.cli import main

    out = tmp_path_factory.mktemp("quant") / "int8"
    argv = ["quantize", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(out), "--calib-scenes", "4"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*argv, "--onnx", "--ort-cpu", "--parity-scenes", "2"])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.mark.slow  # quantize --onnx of the shipped tiny model (ModelOpt calibration, ORT parity); default set: the Q/DQ unit tests here
def test_cli_quantize_reference(quantized_tiny):
    from altermoma.cli_quant import load_quantized_checkpoint
    from export.quantize import quantizers

    out, printed = quantized_tiny
    assert "left in floating point: lidar.pfn.conv, decoder.neck.lateral.0" in printed
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["calibration_split"] == "train" and report["calibration_scenes"] == 4
    assert report["onnx"]["readiness_errors"] == 0
    assert report["onnx"]["ops"]["QuantizeLinear"] > 50
    assert all(stage["readiness_errors"] == 0 for stage in report["onnx_split"].values())
    assert sum(stage["quantize_linear"] for stage in report["onnx_split"].values()) > 50
    parity = report["parity"]
    assert set(parity["outputs"]) >= {"heatmap", "bev_map"}
    # Exact comparison (same Q/DQ arithmetic on both sides, ORT's bias-quantizing optimizer off): what is left
    # is FP32 conv kernels differing in the last bit, which flips an INT8 code now and then and spreads
    # (docs/quantize.md, "Parity"). Bound per output; a wrong scale or a missing Q/DQ pair gives errors of
    # the order of the outputs. Detection counts at the deployment threshold are identical.
    assert parity["ort_disabled_optimizers"] == ["WeightBiasQuantization"]
    for out_parity in parity["outputs"].values():
        assert np.isfinite(out_parity["max_abs"]) and out_parity["max_abs"] < 0.1 * max(1.0, out_parity["max_ref_abs"])
    assert len(parity["detections_torch"]) == len(parity["detections_ort"]) == 2
    assert parity["confident_detections_torch"] == parity["confident_detections_ort"]
    assert parity["confident_detections_equal"]
    assert set(parity["as_shipped"]["outputs"]) == set(parity["outputs"])
    # The ONNX Runtime CPU form: integer convs where the TensorRT form had none, same detections at 0.3
    cpu = report["ort_cpu"]
    assert (out / "model_ort_cpu.onnx").is_file() and cpu["integer_kernels"].get("QLinearConv", 0) >= 10
    assert cpu["vs_qdq"]["confident_detections_qdq"] == cpu["vs_qdq"]["confident_detections_ort_cpu"]
    assert "ORT CPU form: QLinearConv" in printed
    model, meta = load_quantized_checkpoint(out)
    table = quantizers(model)
    # BEV pooling has no quantizer; the default skips are disabled; the rest is quantized
    assert not any(name.startswith("camera.vtransform.pool") for name in table)
    assert not any(
        q.is_enabled for n, q in table.items() if n.startswith(("lidar.pfn.conv.", "decoder.neck.lateral.0."))
    )
    assert table["fuser.fuse.0.input_quantizer"].is_enabled


@pytest.mark.slow  # times two runtimes; default set: the quantized checkpoint's CLI path
def test_bench_times_int8_next_to_fp32(quantized_tiny, tmp_path, capsys):
    """`altermoma bench` takes a quantized folder: its Q/DQ graphs (as exported and in ONNX Runtime's CPU form)
    timed whole and per split stage on ONNX Runtime CPU, compared with the FP32 baseline's ort-cpu-fp32."""
    import shutil

    from altermoma.cli import main

    out, _ = quantized_tiny
    argv = ["bench", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--checkpoint", str(out)]
    assert main([*argv, "--runs", "1", "--warmup", "0", "--out", str(tmp_path / "bench")]) == 0
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    int8 = report["models"][1]
    assert int8["label"].endswith("(INT8)") and int8["gflops"] == report["models"][0]["gflops"]
    for backend in ("ort-cpu-int8", "ort-cpu-int8-ort-form"):
        timed = int8["latency"][backend]
        assert timed["status"] == "ok" and timed["total"]["median_ms"] > 0
        assert set(timed["stages"]) == set(report["models"][0]["latency"]["ort-cpu-fp32"]["stages"])
    rows = {(r["model"], r["backend"]) for r in report["comparison"]}
    assert {(int8["label"], "ort-cpu-int8"), (int8["label"], "ort-cpu-int8-ort-form")} <= rows
    assert "ort-cpu-int8-ort-form" in (tmp_path / "bench" / "bench.md").read_text()
    # a quantized folder written without --onnx has no graphs to time: one error line
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("*.onnx", "split"))
    capsys.readouterr()
    assert main(["bench", "--checkpoint", str(bare), "--out", str(tmp_path / "bench2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--onnx" in err[0]


@needs_modelopt
@pytest.mark.slow
def test_pipeline_int8_rows(tmp_path):
    """`altermoma pipeline --int8`: the fine-tuned pruned model quantized, its ONNX Runtime mAP rows in the table
    and the INT8-vs-unpruned-FP32 section (latency of the four graphs with one harness) in the report."""
    from altermoma.cli_quant import pipeline_int8
    from altermoma.pipeline import run_pipeline
    from compress.request import PruneRequest

    summary = run_pipeline(tmp_path / "p", False, PruneRequest(target_gflops=0.5), 2, 4, 1, int8=pipeline_int8)
    names = [row["model"] for row in summary["rows"]]
    assert names[-2:] == [
        "fusion, altereva 50% GFLOPs, fine-tuned 2 steps, INT8",
        "fusion, altereva 50% GFLOPs, fine-tuned 2 steps, INT8 (ONNX Runtime CPU form)",
    ]
    int8 = summary["int8"]
    assert [r["model"].split(", ")[-1] for r in int8["rows"]] == [
        "FP32",
        "FP32",
        "INT8",
        "INT8 (ONNX Runtime CPU form)",
    ]
    assert int8["rows"][0]["speedup_vs_unpruned_fp32"] == 1.0 and all(
        r["latency"]["median_ms"] > 0 for r in int8["rows"]
    )
    assert summary["rows"][-2]["mAP"] == int8["accuracy"]["int8"]["mAP"]
    report = (tmp_path / "p" / "report.md").read_text()
    assert "INT8 (`--int8`)" in report and "speed-up vs unpruned FP32" in report
    assert (tmp_path / "p" / "int8" / "quantized.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--target-gflops", "0.5"], "error: a quantized checkpoint cannot be pruned"),
        (["export", "onnx"], "altermoma quantize --onnx"),
        (["finetune", "--steps", "2"], "fine-tune it with --qat"),
        (["quantize"], "is already quantized"),
    ],
)
@pytest.mark.slow  # needs the quantized tiny checkpoint (quantize --onnx)
def test_quantized_checkpoint_refused(quantized_tiny, tmp_path, capsys, argv, message):
    """One `error:` line, status 2, before any work, nothing written."""
    from altermoma.cli import main

    out, _ = quantized_tiny
    code = main([*argv, "--checkpoint", str(out), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # needs the quantized tiny checkpoint (quantize --onnx)
def test_qat_trains_weights_keeps_scales(quantized_tiny, tmp_path):
    from altermoma.cli import main
    from altermoma.cli_quant import load_quantized_checkpoint

    out, _ = quantized_tiny
    argv = ["finetune", "--qat", "--checkpoint", str(out), "--out", str(tmp_path / "qat"), "--steps", "2"]
    assert main([*argv, "--scenes", "4", "--threads", "1"]) == 0
    model, _ = load_quantized_checkpoint(out)
    tuned, meta = load_quantized_checkpoint(tmp_path / "qat")
    assert meta["qat"]["steps"] == 2 and meta["qat"]["split"] == "train"
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed and all(not k.endswith("_amax") for k in changed)  # weights learned, scales kept


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calib-scenes", "0"], "error: argument --calib-scenes: must be >= 1"),
        (["--reference", str(SHIPPED / "tiny-camera")], "error: --reference"),
        (["--val-scenes", "4"], "error: --val-scenes measures mAP through ONNX Runtime"),
        (["--ort-cpu"], "error: --ort-cpu converts the exported Q/DQ graph: add --onnx"),
    ],
)
def test_cli_quantize_bad_input(tmp_path, capsys, args, message):
    from altermoma.cli import main

    if missing() and "--calib-scenes" not in args:
        pytest.skip(missing())
    code = main(["quantize", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(tmp_path / "q"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "q").exists()


def _qdq_export_dir(root: Path) -> Path:
    from common.io import staged_directory

    with staged_directory(root / "onnx", kind="onnx-export") as staging:
        onnx.save(_qdq_graph(), staging / "model.onnx")
    return root / "onnx"


def test_build_script_has_both_int8_forms(tmp_path):
    from export.engines import build_engines, engine_specs, exported_graphs

    onnx_dir = _qdq_export_dir(tmp_path)
    specs = engine_specs(exported_graphs(onnx_dir), tmp_path / "eng", ("fp16",), 1024)
    assert [(s.precision, s.strongly_typed) for s in specs] == [("int8-qdq", False), ("int8-qdq", True)]
    report = build_engines(onnx_dir, tmp_path / "eng", ("fp16",))
    script = (tmp_path / "eng" / "build_engines.sh").read_text()
    assert '-lt 11 ]; then "$TRTEXEC"' in script and "--int8 --fp16" in script
    assert '-ge 11 ]; then "$TRTEXEC"' in script and "--stronglyTyped" in script
    if not report["built"]:
        assert "TensorRT" in report["reason"]


def test_int8_engine_builds_where_tensorrt_exists(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (no builder wheel on PyPI)")
    from export.engines import build_engines

    report = build_engines(_qdq_export_dir(tmp_path), tmp_path / "eng", ("fp16",))
    assert report["built"] and len(report["engines"]) == 1
    assert all(engine["samples"] for engine in report["engines"].values())


@needs_modelopt
def test_ort_cpu_form_is_exact_and_fuses_integer_convs(tmp_path):
    """to_ort_cpu_form: zero-point 128 alone gives bit-identical outputs; uint8 zero-point 0 after a Relu gives
    identical outputs inside the calibrated range, differs only above it, and lets ORT fuse QLinearConv."""
    from export.onnx import export_onnx
    from export.qdq_ort import ort_fusion_report, to_ort_cpu_form
    from export.quantize import ort_qdq_session, quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    task = Task(partition={"camera": ("0", "2", "4")}, loss=lambda o, b: o.sum())
    batches = [torch.rand(2, 3, 16, 16) for _ in range(4)]
    quantize(model, task, batches, progress=False)
    export_onnx(model, batches[0][:1], tmp_path / "toy.onnx")
    source = onnx.load(tmp_path / "toy.onnx")
    exact, exact_info = to_ort_cpu_form(source, relu_uint8=False)
    relu, relu_info = to_ort_cpu_form(source)
    assert exact_info["uint8_zero_point_128"] == 3 and exact_info["uint8_zero_point_0_after_relu"] == 0
    assert relu_info["uint8_zero_point_128"] == 1 and relu_info["uint8_zero_point_0_after_relu"] == 2
    cast = helper.make_node("Cast", [source.graph.input[0].name], ["recast"], to=TensorProto.FLOAT)
    twice = onnx.ModelProto()
    twice.CopyFrom(source)
    twice.graph.node.insert(0, cast)  # a float -> float Cast in front of the first Q: removed, values unchanged
    for node in twice.graph.node[1:]:
        node.input[:] = ["recast" if name == source.graph.input[0].name else name for name in node.input]
    assert to_ort_cpu_form(twice)[1]["identity_casts_removed"] == 1
    onnx.save(exact, tmp_path / "exact.onnx")
    onnx.save(relu, tmp_path / "relu.onnx")
    assert "qdq-int8" in _errors(relu)  # an ONNX Runtime form: TensorRT's rules refuse uint8 Q/DQ
    before = ort_fusion_report(tmp_path / "toy.onnx", 1, tmp_path / "a.onnx")
    after = ort_fusion_report(tmp_path / "relu.onnx", 1, tmp_path / "b.onnx")
    assert not before["integer_kernels"] and after["integer_kernels"].get("QLinearConv", 0) == 2
    sessions = {name: ort_qdq_session(tmp_path / f"{name}.onnx") for name in ("toy", "exact", "relu")}

    def run(name, image):
        return sessions[name].run(None, {sessions[name].get_inputs()[0].name: image.numpy()})[0]

    for image in torch.cat(batches).split(1):  # the calibration range: all three identical
        reference = run("toy", image)
        np.testing.assert_array_equal(run("exact", image), reference)
        np.testing.assert_array_equal(run("relu", image), reference)
    # Beyond the calibrated range (int8 saturates at 127 x scale, uint8 at 255 x scale): an image tiled with the
    # sign pattern of the first conv's first filter drives that channel to its largest possible value.
    pattern = (model[0].weight[0] > 0).float()
    big = pattern.repeat(1, 6, 6)[:, :16, :16].unsqueeze(0)
    np.testing.assert_array_equal(run("exact", big), run("toy", big))
    assert not np.array_equal(run("relu", big), run("toy", big))


@needs_modelopt
# histogram: ModelOpt's entropy search, ~13 CPU-seconds for two quantizers; the default set passes the method
# through to ModelOpt with mse (the same plumbing), `make test-slow` runs both
@pytest.mark.parametrize("method", ["mse", pytest.param("histogram", marks=pytest.mark.slow)])
def test_calibration_methods_set_other_scales(method):
    """The calibration knobs work and change the scales max calibration gives: ModelOpt's MSE searches the
    weights' amax, the histogram calibrator (entropy) the activations'."""
    from export.quantize import quantize, quantizers

    kind = "weight_quantizer" if method == "mse" else "input_quantizer"

    def small():  # the entropy search costs seconds per histogram quantizer on CPU: two convs only
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()

    task = Task(partition={"camera": ("0", "2")}, loss=lambda o, b: o.sum())
    batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    model, other = small(), small()
    quantize(model, task, batches, progress=False)
    quantize(other, task, batches, QuantizeConfig(method=method), progress=False)
    base, tuned = quantizers(model), quantizers(other)
    assert tuned["2.input_quantizer"].amax is not None
    assert any(not torch.allclose(base[n].amax, q.amax) for n, q in tuned.items() if n.endswith(kind) and q.is_enabled)


class _Block(nn.Module):
    """A ResNet BasicBlock: its own forward adds the conv branch and the identity (or a downsample conv)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out))
        self.downsample = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class _ResidualToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(_Block(8, 8), _Block(8, 12))
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"map": self.head(self.blocks(self.stem(image)) + 0.5)}  # a broadcast add: not a residual Add


def _residual_toy(seed: int = 0):
    torch.manual_seed(seed)
    model = _ResidualToy().eval()
    task = Task(partition={"camera": ("stem", "blocks", "head")}, loss=lambda o, b: o["map"].sum())
    return model, task, [torch.rand(2, 3, 12, 12) for _ in range(3)]


@needs_modelopt
def test_residual_adds_share_one_quantizer_on_both_inputs(tmp_path):
    from export.onnx import export_onnx
    from export.quantize import (
        load_quantized,
        onnx_qdq_semantics,
        ort_qdq_session,
        quantize,
        quantizers,
        save_quantized,
    )

    model, task, batches = _residual_toy()
    plain, _, _ = _residual_toy()
    off = QuantizeConfig(quantize_residual_adds=False)
    assert quantize(plain, task, batches, off, progress=False)["residual_adds"] == []
    report = quantize(model, task, batches, progress=False)  # the default
    assert report["residual_adds"] == ["blocks.0", "blocks.1"] and report["residual_adds_not_quantized"] == {}
    table = quantizers(model)
    # One quantizer per Add, called on both of its inputs (the conv branch and the identity / downsample output).
    for block in ("blocks.0", "blocks.1"):
        quantizer = table[f"{block}.residual_add.input_quantizer"]
        assert quantizer.is_enabled and quantizer.axis is None and quantizer.amax.numel() == 1
        calls = []
        handle = quantizer.register_forward_pre_hook(lambda _m, args, calls=calls: calls.append(args[0].shape))
        with torch.no_grad():
            model(batches[0])
        handle.remove()
        assert len(calls) == 2 and calls[0] == calls[1]
    # blocks.0's identity is its input, read by conv1 too: the two quantizers of that tensor share a scale.
    assert torch.equal(
        table["blocks.0.residual_add.input_quantizer"].amax, table["blocks.0.conv1.0.input_quantizer"].amax
    )

    # Exported: every residual Add reads two DequantizeLinear nodes with the same scale; TensorRT-ready, parity.
    export = export_onnx(model, batches[1][:1], tmp_path / "toy.onnx")
    # Fake quantization and ORT's Q/DQ round a few boundary values apart (one INT8 step of the output, ~12% of
    # its range on this toy): the loose check is the INT8 parity verdict; the exact one follows.
    assert export["readiness_errors"] == 0 and export["parity"]["ok"]
    with torch.no_grad(), onnx_qdq_semantics():  # exact parity: both sides compute the graph's Q/DQ arithmetic
        reference = model(batches[1][:1])["map"].numpy()
    session = ort_qdq_session(tmp_path / "toy.onnx", threads=1)
    ours = session.run(None, {session.get_inputs()[0].name: batches[1][:1].numpy()})[0]
    assert np.abs(ours - reference).max() < 1e-5
    graph = onnx.load(tmp_path / "toy.onnx").graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    )
    quantized_adds = 0
    for node in (n for n in graph.node if n.op_type == "Add"):
        sources = [producers.get(name) for name in node.input]
        if all(s is not None and s.op_type == "DequantizeLinear" for s in sources):
            scales = [constants[s.input[1]] for s in sources]
            assert scales[0].size == 1 and np.array_equal(scales[0], scales[1])
            quantized_adds += 1
    assert quantized_adds == 2
    plain_export = export_onnx(plain, batches[1][:1], tmp_path / "plain.onnx")
    assert export["ops"]["QuantizeLinear"] > plain_export["ops"]["QuantizeLinear"]

    # The rewrite is stored by name and rebuilt on load, bit for bit.
    save_quantized(model, tmp_path / "q", report)
    fresh, _, _ = _residual_toy(seed=1)
    load_quantized(fresh, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(batches[2])["map"], fresh(batches[2])["map"])
