"""ONNX export of the reference BEVFusion: parity with PyTorch for both BEV-pooling forms, the CUDA-BEVFusion
split (`BEVFusion.export_stages` through the generic `export_split`), single-modal models, the TensorRT-readiness
gate, atomic writes and checkpoint errors. Tiny models, random weights."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from altermoma.export_reference import CUMSUM_ATOL, export_checkpoint
from export import trt_check
from export.onnx import FP32_ATOL, ExportError, OrtPipeline, export_onnx, export_split, parity_report
from fusion.checkpoint import CheckpointError, save_checkpoint
from fusion.models.bevfusion import build_model, example_inputs, pool_method_as
from fusion.models.stages import STAGES, split_stages

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fusion_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config, "fusion").eval()


@pytest.fixture(scope="module")
def samples(tiny_config):
    return [example_inputs(tiny_config, 1, "fusion", seed=seed) for seed in (1, 2)]


def _export(model, path, pool_method=None, **options):
    """The reference single graph: the config's example inputs, the BEV pooling switched for the export only."""
    with pool_method_as(model, pool_method):
        return export_onnx(model, example_inputs(model.config, 1, model.modality), path, **options)


def _export_split(model, out_dir, **options):
    """The reference CUDA-BEVFusion split through the generic split export."""
    inputs = example_inputs(model.config, 1, model.modality)
    return export_split(split_stages(model, inputs), inputs, out_dir, **options)


@pytest.fixture(scope="module")
def split_export(fusion_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    single = _export(fusion_model, out / "model.onnx")
    paths = _export_split(fusion_model, out)
    return single, paths


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["scatter", pytest.param("cumsum", marks=pytest.mark.slow)])  # cumsum: slow set
def test_single_graph_parity(fusion_model, samples, tmp_path, method):
    before = _state(fusion_model)
    details = _export(fusion_model, tmp_path / f"{method}.onnx", pool_method=method)
    assert fusion_model.camera.vtransform.pool.method == "scatter"  # restored
    assert all(torch.equal(v, before[k]) for k, v in fusion_model.state_dict().items())  # BN stats untouched
    assert not fusion_model.training
    model = onnx.load(details["path"])
    assert [i.name for i in model.graph.input] == ["images", "pillars", "pillar_map"]
    assert [o.name for o in model.graph.output] == ["heatmap", "offset", "height", "size", "rotation", "bev_map"]
    for value in [*model.graph.input, *model.graph.output]:  # static shapes
        assert all(d.HasField("dim_value") and d.dim_value > 0 for d in value.type.tensor_type.shape.dim)
    ops = details["ops"]
    if method == "scatter":
        assert "ScatterElements" in ops and "CumSum" not in ops
    else:
        assert "CumSum" in ops and not any(op.startswith("Scatter") for op in ops)
    assert not {"NonZero", "Unique", "TopK", "ScatterND"} & set(ops)
    assert details["readiness_errors"] == 0 and details["checker"] == "ok"
    assert details["max_abs_error"] <= 1e-4 and details["parity"]["ok"]
    assert not [f for f in trt_check.check_model(details["path"]) if f.severity == trt_check.ERROR]
    assert details["size_bytes_unsimplified"] > 0 and details["size_bytes"] > 0
    # no all-zero initializer as large as the BEV canvas (1 x 32 x 4096 on tiny): it would be 40 MB on r50
    zeros = [i.name for i in model.graph.initializer if np.prod(i.dims) >= 4096 and not numpy_helper.to_array(i).any()]
    assert not zeros, zeros

    with pool_method_as(fusion_model, method):
        atol = CUMSUM_ATOL if method == "cumsum" else FP32_ATOL
        report = parity_report(fusion_model, details["path"], samples, threads=1, atol=atol)
    assert report["ok"], report
    for out in report["single"]["outputs"].values():
        assert out["max_abs"] <= 1e-4


def test_split_chain_reproduces_single_graph(fusion_model, samples, split_export):
    single, paths = split_export
    assert list(paths) == list(STAGES)
    chain = OrtPipeline(paths)
    assert chain.input_names == ["images", "pillars", "pillar_map"]
    io = {
        name: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
        for name, s in chain.sessions.items()
    }
    assert io["camera_backbone"] == (["images"], ["depth", "context"])
    assert io["camera_vtransform"] == (["depth", "context"], ["camera_bev"])
    assert io["lidar_backbone"] == (["pillars", "pillar_map"], ["lidar_bev"])
    assert io["fuser_decoder"] == (["camera_bev", "lidar_bev"], ["bev_features"])
    assert io["heads"] == (["bev_features"], list(single["outputs"]))
    assert chain.output_names == list(single["outputs"])
    with pytest.raises(ValueError, match="not in run order"):
        OrtPipeline(dict(reversed(paths.items())))  # the mapping's order is the run order
    depth = chain.run_stage("camera_backbone", {"images": samples[0]["images"].numpy()})["depth"]
    np.testing.assert_allclose(depth.sum(axis=1), 1.0, atol=1e-5)  # softmaxed over depth bins

    report = parity_report(fusion_model, {"model": single["path"], **paths}, samples, threads=1)
    assert report["ok"]
    for out in report["split_vs_single"]["outputs"].values():
        assert out["max_abs"] <= 1e-5
    for out in report["split"]["outputs"].values():
        assert out["max_abs"] <= 1e-4


def test_ort_runner_handles_other_batch_sizes(fusion_model, split_export, tiny_config):
    single, _ = split_export
    pipeline = OrtPipeline(single["path"])
    batch = example_inputs(tiny_config, 3, "fusion", seed=5)
    out = pipeline.torch_runner()(batch)
    with torch.no_grad():
        ref = fusion_model(**batch)
    for name in ref:
        assert out[name].shape == ref[name].shape
        assert (out[name] - ref[name]).abs().max() <= 1e-4


@pytest.mark.parametrize("modality", [pytest.param("camera", marks=pytest.mark.slow), "lidar"])  # camera: slow set
def test_single_modal_exports(tiny_config, tmp_path, modality):
    torch.manual_seed(0)
    model = build_model(tiny_config, modality).eval()
    single = _export(model, tmp_path / "model.onnx")
    paths = _export_split(model, tmp_path)
    expected = {"camera": ["camera_backbone", "camera_vtransform"], "lidar": ["lidar_backbone"]}[modality]
    assert list(paths) == [*expected, "fuser_decoder", "heads"]
    assert list(single["inputs"]) == model.input_names
    fd_inputs = [i.name for i in onnx.load(paths["fuser_decoder"]).graph.input]
    assert fd_inputs == [f"{modality}_bev"]
    assert single["readiness_errors"] == 0
    samples = [example_inputs(tiny_config, 1, modality, seed=3)]
    report = parity_report(model, {"model": single["path"], **paths}, samples, threads=1)
    assert report["ok"], report


def test_missing_output_directory(fusion_model, tmp_path):
    target = tmp_path / "nope" / "model.onnx"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _export(fusion_model, target)
    assert not target.parent.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _export_split(fusion_model, tmp_path / "nope")


@pytest.mark.slow  # a tiny fusion export; default set: readiness rules in test_trt_check, staging in test_faults
def test_readiness_error_blocks_export_and_keeps_old_file(fusion_model, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous good export")

    def planted(model, fp16=False):
        return [trt_check.Finding("unsupported-op", trt_check.ERROR, "n0", "NonZero", "planted failure")]

    monkeypatch.setattr(trt_check, "check_model", planted)
    with pytest.raises(ExportError, match="not TensorRT-ready.*planted failure"):
        _export(fusion_model, target)
    assert target.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files left
    with pytest.raises(ExportError):
        _export(fusion_model, tmp_path / "fresh.onnx")
    assert not (tmp_path / "fresh.onnx").exists()
    calls = []

    def planted_on_heads(model, fp16=False):  # the last split stage fails, after four good ones
        calls.append(1)
        return planted(model) if len(calls) == len(STAGES) else []

    monkeypatch.setattr(trt_check, "check_model", planted_on_heads)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    with pytest.raises(ExportError, match="heads.onnx"):
        _export_split(fusion_model, split_dir)
    assert not list(split_dir.iterdir())  # no stage written when any stage fails
    monkeypatch.setattr(trt_check, "check_model", planted)
    # check=False records the findings instead of failing
    details = _export(fusion_model, tmp_path / "unchecked.onnx", check=False, simplify=False)
    assert details["readiness_errors"] == 1 and (tmp_path / "unchecked.onnx").is_file()


def test_failed_simplification_keeps_unsimplified_graph(fusion_model, tmp_path, monkeypatch):
    import onnxslim

    def broken(*args, **kwargs):
        raise RuntimeError("planted onnxslim failure")

    monkeypatch.setattr(onnxslim, "slim", broken)
    details = _export(fusion_model, tmp_path / "model.onnx", pool_method="cumsum")
    assert not details["simplified"] and "planted onnxslim failure" in details["simplify_note"]
    assert details["size_bytes"] == len((tmp_path / "model.onnx").read_bytes())
    assert details["parity"]["ok"]


def test_bad_pool_method(fusion_model, tmp_path):
    with pytest.raises(ValueError, match="pool_method"):
        _export(fusion_model, tmp_path / "model.onnx", pool_method="index_add")
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(ValueError, match="pool_method"):  # refused before the checkpoint is read
        export_checkpoint(tmp_path / "missing", tmp_path / "out", pool_method="index_add")
    assert not (tmp_path / "out").exists()


def _cli():
    from altermoma.cli_deploy import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow  # the CLI export of the tiny fusion model; default set: test_byom's CLI export
def test_export_checkpoint_writes_report(tiny_config, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(tiny_config, "fusion"))
    out = tmp_path / "out"
    argv = ["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--preset", "tiny"]
    args = _cli().parse_args([*argv, "--pool-method", "cumsum", "--samples", "2"])
    args.run(args)  # the CLI handler calls export_checkpoint
    printed = capsys.readouterr().out
    assert "parity on 2 val scenes" in printed and "mAP torch" in printed
    assert (out / "model.onnx").is_file() and all((out / "split" / f"{s}.onnx").is_file() for s in STAGES)
    saved = json.loads((out / "export_report.json").read_text())
    parity = saved["parity"]
    assert parity["ok"] and saved["pool_method"] == "cumsum" and parity["atol"] == CUMSUM_ATOL
    assert parity["meets_fp32_target"]  # random weights: tiny outputs, tiny errors
    assert parity["mAP_equal"]
    assert set(parity["metrics"]) == {"torch", "single", "split"}
    assert "ONNX Runtime" in (out / "export_report.md").read_text()
    assert saved["single"]["readiness_errors"] == 0


def test_export_checkpoint_other_preset(tiny_config, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(tiny_config, "lidar"))
    with pytest.raises(CheckpointError, match="preset 'tiny', expected 'small'"):
        export_checkpoint(ckpt, tmp_path / "out", preset="small")
    assert not (tmp_path / "out").exists()


def test_export_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_parsers(tmp_path):
    parser = _cli()
    args = parser.parse_args(
        ["export", "onnx", "--checkpoint", str(tmp_path / "x"), "--out", str(tmp_path / "o"), "--pool-method", "cumsum"]
    )
    assert args.pool_method == "cumsum" and args.opset == 17 and args.samples == 8 and not args.no_simplify
    with pytest.raises(CheckpointError):
        args.run(args)
    args = parser.parse_args(["bench", "--checkpoint", "a", "--checkpoint", "b", "--runs", "5"])
    assert args.checkpoint == ["a", "b"] and args.runs == 5 and args.threads == 1 and args.out == "reports/bench"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "onnx", "--checkpoint", "x", "--out", "o", "--pool-method", "index_add"])
