"""`altermoma quantize`: INT8 PTQ (ModelOpt Q/DQ) of a reference checkpoint, pruned or not.

    altermoma quantize --checkpoint C --out D [--calib-scenes 64] [--method max|mse|histogram]
                       [--skip NAME ...] [--no-default-skip] [--no-fuse-bn] [--no-share]
                       [--no-quantize-residual-adds]
                       [--reference F] [--onnx] [--val-scenes 0] [--threads 1] [--overwrite]

Calibration scenes are rendered from the TRAINING split (never val). The output folder holds the
quantized checkpoint (`quantized.json` + `model.safetensors`, `export.quantize`) and, under `base/`, the
floating-point checkpoint it came from (loading rebuilds the model from it). With `--onnx` it also holds
`model.onnx` (the Q/DQ graph, TensorRT-readiness checked), `split/<stage>.onnx` (the CUDA-BEVFusion split,
Q/DQ too) and `model_fp32.onnx`, with parity against the PyTorch fake-quant model on `--parity-scenes` val
scenes; with `--val-scenes N` the mAP of both graphs through ONNX Runtime on N val scenes. Everything lands
in `quantize_report.json`; `altermoma export trt --onnx-dir D` then writes the INT8 engine build script.

The reference model's placement defaults live here, not in `export` (which knows no model):
CUDA-BEVFusion leaves its first LiDAR layer and first decoder deblock in floating point (their issue #8);
here those are `lidar.pfn.conv` (the PillarFeatureNet's conv, the first LiDAR layer) and
`decoder.neck.lateral.0` (SECONDFPN's first deblock, the stride-1 branch).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from common.argtypes import non_negative_int, positive_int

REFERENCE_SKIP = ("lidar.pfn.conv", "decoder.neck.lateral.0")
BASE = "base"  # the floating-point source checkpoint, inside a quantized checkpoint
CALIB_BATCH = 4


def reference_skip(model) -> tuple[str, ...]:
    """The CUDA-BEVFusion skips that exist in this model (a camera-only model has no LiDAR layer)."""
    names = {name for name, _ in model.named_modules()}
    return tuple(name for name in REFERENCE_SKIP if name in names)


def calibration_batches(config, scenes: int, batch_size: int = CALIB_BATCH, progress: bool = True) -> list:
    """`scenes` scenes of the TRAINING split, collated in batches: calibration never sees val data."""
    from fusion.data.dataset import SyntheticScenes, collate

    if scenes < 1:
        raise ValueError("--calib-scenes must be >= 1: quantization needs calibration scenes")
    dataset = SyntheticScenes(config, "train", num_scenes=scenes, progress=progress)
    return [collate([dataset[j] for j in range(i, min(i + batch_size, scenes))]) for i in range(0, scenes, batch_size)]


def check_pair(checkpoint: str, reference: str | None) -> None:
    """--reference must describe the same model as --checkpoint (modality and preset): an INT8 fusion model
    compared with (or calibrated against) a camera-only one would report a meaningless accuracy change."""
    from fusion.checkpoint import read_metadata

    if reference is None:
        return
    ours, theirs = read_metadata(checkpoint), read_metadata(reference)
    kind = (ours.get("modality"), ours.get("config", {}).get("preset"))
    other = (theirs.get("modality"), theirs.get("config", {}).get("preset"))
    if kind != other:
        raise ValueError(
            f"--reference {reference} is a {other[0]} checkpoint (preset {other[1]}), --checkpoint {checkpoint} is "
            f"{kind[0]} (preset {kind[1]}): calibrating and comparing them mixes different models"
        )


def load_quantized_checkpoint(directory: str | Path):
    """(quantized model, quantized.json) from an `altermoma quantize` folder: the floating-point model is
    rebuilt from `base/`, then fused and given its quantizers and amax values (`export.quantize`)."""
    from export.quantize import load_quantized, read_quantized_metadata
    from fusion.checkpoint import load_checkpoint

    meta = read_quantized_metadata(directory)
    model, _ = load_checkpoint(Path(directory) / BASE)
    return load_quantized(model, directory), meta


CONFIDENT = 0.3  # a deployment-style score threshold, next to the evaluation's 0.05


def detections_per_scene(outputs: dict, grid, score_threshold: float = 0.05) -> list[int]:
    """Boxes per scene above `score_threshold` (0.05: what the mAP evaluation decodes), of either head."""
    from fusion.evaluate import decode_detections

    return [len(d["scores"]) for d in decode_detections(outputs, grid, score_threshold=score_threshold)]


def _counts(outputs: dict, grid) -> tuple[list[int], list[int]]:
    return detections_per_scene(outputs, grid), detections_per_scene(outputs, grid, CONFIDENT)


def qdq_parity(model, onnx_path: Path, config, scenes: int, threads: int) -> dict[str, Any]:
    """ONNX Runtime (the Q/DQ graph) against PyTorch's fake-quant model on `scenes` val scenes.

    Two comparisons, both reported: the exact one (`outputs`, `detections_*`): PyTorch's fake quant with the
    Q/DQ graph's own arithmetic (`export.quantize.onnx_qdq_semantics`) against ONNX Runtime with the
    optimizers that change a Q/DQ graph's function turned off (`ORT_INEXACT_OPTIMIZERS`); and the as-shipped
    one (`as_shipped`): ModelOpt's own fake-quant formula against ONNX Runtime's default optimizations. Each
    with per-output max/mean abs error and the detection count of every scene at score >= 0.05 and 0.3."""
    import numpy as np
    import torch

    from export.onnx import graph_feeds
    from export.parity import compare_outputs
    from export.quantize import ORT_INEXACT_OPTIMIZERS, onnx_qdq_semantics, ort_qdq_session
    from fusion.data.dataset import SyntheticScenes, collate, model_inputs
    from fusion.data.sparse_inputs import graph_padding

    dataset = SyntheticScenes(config, "val", num_scenes=scenes, progress=False)
    pad, _ = graph_padding(config)
    sessions = {
        "exact": ort_qdq_session(onnx_path, threads, exact=True),
        "default": ort_qdq_session(onnx_path, threads, exact=False),
    }
    sides = ("torch_exact", "ort_exact", "torch_modelopt", "ort_default")
    outs: dict[str, list[dict]] = {k: [] for k in sides}
    counts: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in sides}
    with torch.no_grad():
        for i in range(len(dataset)):
            inputs = pad(model_inputs(collate([dataset[i]])))
            feeds = graph_feeds(inputs)  # nested inputs (rulebooks) by the graph's names
            with onnx_qdq_semantics():
                results = {"torch_exact": dict(model(**inputs))}
            results["torch_modelopt"] = dict(model(**inputs))
            for key, session in sessions.items():
                names = [o.name for o in session.get_outputs()]
                feed = {v.name: feeds[v.name] for v in session.get_inputs()}
                results[f"ort_{key}"] = {n: torch.from_numpy(v) for n, v in zip(names, session.run(None, feed))}
            for side in sides:
                outs[side].append({k: v.numpy() for k, v in results[side].items()})
                low, high = _counts(results[side], config.grid)
                counts[side][0].extend(low)
                counts[side][1].extend(high)

    def errors(ref_side: str, cand_side: str) -> dict[str, Any]:
        ref = {k: np.concatenate([r[k] for r in outs[ref_side]]) for k in outs[ref_side][0]}
        cand = {k: np.concatenate([c[k] for c in outs[cand_side]]) for k in ref}
        report = compare_outputs(ref, cand, precision="int8-qdq")
        return {
            k: {"max_abs": o.max_abs, "mean_abs": o.mean_abs, "max_ref_abs": o.max_ref_abs}
            for k, o in report.outputs.items()
        }

    return {
        "scenes": len(dataset),
        "threads": int(threads),
        "reference": "PyTorch fake quant with the Q/DQ graph's arithmetic (x / (amax/127), q * (amax/127))",
        "ort_disabled_optimizers": list(ORT_INEXACT_OPTIMIZERS),
        "outputs": errors("torch_exact", "ort_exact"),
        "detections_torch": counts["torch_exact"][0],
        "detections_ort": counts["ort_exact"][0],
        "detections_equal": counts["torch_exact"][0] == counts["ort_exact"][0],
        "confident_threshold": CONFIDENT,
        "confident_detections_torch": counts["torch_exact"][1],
        "confident_detections_ort": counts["ort_exact"][1],
        "confident_detections_equal": counts["torch_exact"][1] == counts["ort_exact"][1],
        "as_shipped": {
            "what": "ModelOpt's fake-quant formula (x * (127/amax), q / (127/amax)) vs ONNX Runtime default optimizations",
            "outputs": errors("torch_modelopt", "ort_default"),
            "detections_torch": counts["torch_modelopt"][0],
            "detections_ort": counts["ort_default"][0],
            "confident_detections_torch": counts["torch_modelopt"][1],
            "confident_detections_ort": counts["ort_default"][1],
            "torch_formula_only": errors("torch_exact", "torch_modelopt"),
            "ort_optimizers_only": errors("ort_exact", "ort_default"),
        },
    }


def ort_map(onnx_path: Path, config, scenes: int, threads: int) -> dict[str, float]:
    """mAP/NDS/mIoU of one graph through ONNX Runtime on `scenes` val scenes."""
    from export.onnx import OrtPipeline, flat_runner
    from fusion.data.dataset import SyntheticScenes
    from fusion.data.sparse_inputs import graph_padding
    from fusion.evaluate import evaluate

    dataset = SyntheticScenes(config, "val", num_scenes=scenes, progress=False)
    run, (pad, _) = flat_runner(OrtPipeline(onnx_path, threads).torch_runner()), graph_padding(config)
    metrics = evaluate(lambda inputs: run(pad(inputs)), dataset, progress=False)
    return {k: float(metrics[k]) for k in ("mAP", "NDS", "mIoU") if k in metrics}


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    calib_scenes: int = 64,
    method: str = "max",
    skip: tuple[str, ...] | None = None,
    fuse_conv_bn: bool = True,
    share_quantizers: bool = True,
    quantize_residual_adds: bool = True,
    reference: str | None = None,
    onnx: bool = False,
    parity_scenes: int = 8,
    val_scenes: int = 0,
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    ort_cpu: bool = False,
) -> dict[str, Any]:
    """Quantize a reference checkpoint into `out` (see the module docstring); returns the report."""
    from common.io import check_replaceable, staged_directory
    from export.onnx import torch_threads
    from export.quantize import (
        QUANT_KIND,
        QuantizeConfig,
        is_quantized_checkpoint,
        modelopt_missing,
        quantize,
        write_quantized,
    )
    from fusion.checkpoint import load_checkpoint, save_checkpoint
    from fusion.task import reference_task

    if calib_scenes < 1:
        raise ValueError("--calib-scenes must be >= 1: quantization needs calibration scenes")
    if is_quantized_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is already quantized; quantize its floating-point checkpoint ({BASE}/)")
    if val_scenes and not onnx:
        raise ValueError("--val-scenes measures mAP through ONNX Runtime: add --onnx")
    if ort_cpu and not onnx:
        raise ValueError("--ort-cpu converts the exported Q/DQ graph: add --onnx")
    reason = modelopt_missing()
    if reason:
        raise ValueError(reason)
    check_replaceable(out, (QUANT_KIND,), overwrite)
    check_pair(str(checkpoint), reference)
    start = time.perf_counter()
    model, meta = load_checkpoint(checkpoint)
    config = QuantizeConfig(
        fuse_conv_bn=fuse_conv_bn,
        share_quantizers=share_quantizers,
        quantize_residual_adds=quantize_residual_adds,
        skip=reference_skip(model) if skip is None else tuple(skip),
        method=method,
    ).validate()
    with torch_threads(threads):
        batches = calibration_batches(model.config, calib_scenes, progress=progress)
        base = copy.deepcopy(model)
        report = quantize(model, reference_task(model), batches, config, progress=progress)
        report.update(
            checkpoint=str(checkpoint),
            reference=reference or str(checkpoint),
            calibration_split="train",
            calibration_scenes=int(calib_scenes),
            modality=model.modality,
            preset=model.config.preset,
            pruned=bool(meta.get("pruning")),
            threads=int(threads),
            command=" ".join(["altermoma", *sys.argv[1:]]),
        )
        out = Path(out)
        with staged_directory(out, kind=QUANT_KIND) as staging:
            save_checkpoint(staging / BASE, base, {k: v for k, v in meta.items() if k in ("pruning", "command")})
            write_quantized(
                model,
                staging,
                report,
                {"source": {k: report[k] for k in ("checkpoint", "modality", "preset", "pruned")}},
            )
            if onnx:
                report.update(
                    _export_both(
                        model,
                        base,
                        reference,
                        staging,
                        out,
                        threads,
                        parity_scenes,
                        val_scenes,
                        ort_cpu=ort_cpu,
                    )
                )
            report["seconds"] = round(time.perf_counter() - start, 2)
            (staging / "quantize_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def ort_cpu_export(onnx_path: Path, out_path: Path, config, scenes: int, threads: int) -> dict[str, Any]:
    """`model_ort_cpu.onnx`: the Q/DQ graph in ONNX Runtime's CPU form (`export.qdq_ort`), with which convs
    ONNX Runtime fused into integer kernels, and its outputs and detection counts against the TensorRT-form
    graph on `scenes` val scenes (both with ONNX Runtime's default optimizations, as deployed)."""
    import tempfile

    import numpy as np
    import onnx
    import torch

    from export.onnx import ort_session
    from export.qdq_ort import ort_fusion_report, to_ort_cpu_form
    from fusion.data.dataset import SyntheticScenes, collate, model_inputs

    converted, conversion = to_ort_cpu_form(onnx.load(str(onnx_path)))
    onnx.save(converted, str(out_path))
    with tempfile.TemporaryDirectory() as tmp:
        fusion = ort_fusion_report(out_path, threads, Path(tmp) / "optimized.onnx")
    sessions = {"qdq": ort_session(onnx_path, threads), "ort_cpu": ort_session(out_path, threads)}
    dataset = SyntheticScenes(config, "val", num_scenes=scenes, progress=False)
    worst: dict[str, float] = {}
    counts: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in sessions}
    for i in range(len(dataset)):
        inputs = model_inputs(collate([dataset[i]]))
        outs = {}
        for key, session in sessions.items():
            names = [o.name for o in session.get_outputs()]
            values = session.run(None, {v.name: inputs[v.name].numpy() for v in session.get_inputs()})
            outs[key] = {n: torch.from_numpy(v) for n, v in zip(names, values)}
            low, high = _counts(outs[key], config.grid)
            counts[key][0].extend(low)
            counts[key][1].extend(high)
        for name, value in outs["qdq"].items():
            diff = float(np.abs(outs["ort_cpu"][name].numpy() - value.numpy()).max())
            worst[name] = max(worst.get(name, 0.0), diff)
    return {
        "conversion": conversion,
        "integer_kernels": fusion["integer_kernels"],
        "float_compute_ops": fusion["float_compute_ops"],
        "float_compute": [c["node"] for c in fusion["float_compute"]],
        "vs_qdq": {
            "scenes": len(dataset),
            "max_abs": worst,
            "detections_qdq": counts["qdq"][0],
            "detections_ort_cpu": counts["ort_cpu"][0],
            "confident_detections_qdq": counts["qdq"][1],
            "confident_detections_ort_cpu": counts["ort_cpu"][1],
        },
    }


def _export_both(
    model,
    base,
    reference,
    staging,
    out,
    threads,
    parity_scenes,
    val_scenes,
    ort_cpu: bool = False,
) -> dict[str, Any]:
    """model.onnx (Q/DQ) and model_fp32.onnx of the FP reference, parity and (optionally) ORT mAP of both;
    with `ort_cpu` also model_ort_cpu.onnx (`ort_cpu_export`) and its mAP."""
    from export.onnx import ExportError, export_onnx, export_split_details
    from export.qdq_ort import ORT_CPU_FILE
    from fusion.checkpoint import load_checkpoint
    from fusion.models.bevfusion import example_inputs
    from fusion.models.stages import split_stages

    fp = base if reference is None else load_checkpoint(reference)[0]
    inputs = example_inputs(model.config, 1, model.modality)
    int8 = export_onnx(model, inputs, staging / "model.onnx", threads=threads, check=True)
    if int8["readiness_errors"]:
        raise ExportError(f"the Q/DQ graph is not TensorRT-ready ({int8['readiness_errors']} errors)")
    fp32 = export_onnx(fp, inputs, staging / "model_fp32.onnx", threads=threads, check=True)
    (staging / "split").mkdir()
    split = export_split_details(split_stages(model, inputs), inputs, staging / "split", threads=threads, check=True)
    for details, name in ((int8, "model.onnx"), (fp32, "model_fp32.onnx")):
        details["path"] = str(Path(out) / name)
    result: dict[str, Any] = {
        "onnx": {k: int8[k] for k in ("path", "nodes", "ops", "findings", "readiness_errors", "simplify_note")},
        "onnx_fp32": {k: fp32[k] for k in ("path", "nodes", "max_abs_error")},
        "onnx_split": {
            name: {
                "quantize_linear": d["ops"].get("QuantizeLinear", 0),
                "readiness_errors": d["readiness_errors"],
                "max_abs_error_vs_fake_quant": d["max_abs_error"],
            }
            for name, d in split.items()
        },
        "parity": qdq_parity(model, staging / "model.onnx", model.config, parity_scenes, threads),
    }
    if ort_cpu:
        result["ort_cpu"] = {
            "path": str(Path(out) / ORT_CPU_FILE),
            **ort_cpu_export(staging / "model.onnx", staging / ORT_CPU_FILE, model.config, parity_scenes, threads),
        }
    if val_scenes:
        fp_map = ort_map(staging / "model_fp32.onnx", model.config, val_scenes, threads)
        int8_map = ort_map(staging / "model.onnx", model.config, val_scenes, threads)
        result["accuracy"] = {
            "split": "val",
            "scenes": int(val_scenes),
            "backend": "onnxruntime-cpu",
            "fp32": fp_map,
            "int8": int8_map,
            "mAP_change": int8_map["mAP"] - fp_map["mAP"],
        }
        if ort_cpu:
            ort_cpu_map = ort_map(staging / ORT_CPU_FILE, model.config, val_scenes, threads)
            result["accuracy"]["int8_ort_cpu"] = ort_cpu_map
            result["accuracy"]["mAP_change_ort_cpu"] = ort_cpu_map["mAP"] - fp_map["mAP"]
    return result


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    skip = None if args.skip is None and not args.no_default_skip else tuple(args.skip or ())
    report = quantize_checkpoint(
        args.checkpoint,
        args.out,
        calib_scenes=args.calib_scenes,
        method=args.method,
        skip=skip,
        fuse_conv_bn=not args.no_fuse_bn,
        share_quantizers=not args.no_share,
        quantize_residual_adds=args.quantize_residual_adds,
        reference=args.reference,
        onnx=args.onnx,
        parity_scenes=args.parity_scenes,
        val_scenes=args.val_scenes,
        threads=args.threads,
        overwrite=args.overwrite,
        ort_cpu=args.ort_cpu,
    )
    print(
        f"quantized {report['quantizers_enabled']} of {report['quantizers']} quantizers on {report['calibration_scenes']}"
        f" training scenes ({report['config']['method']}); fused {len(report['fused_conv_bn'])} Conv+BN; "
        f"left in floating point: {', '.join(report['skipped']) or 'nothing'}"
    )
    if report["config"].get("quantize_residual_adds"):
        not_done = report.get("residual_adds_not_quantized", {})
        print(
            f"residual Adds with one shared quantizer on both inputs: {len(report['residual_adds'])} modules"
            + (f"; not rewritten (torch.fx cannot trace them): {', '.join(not_done)}" if not_done else "")
        )
    if "parity" in report:
        parity = report["parity"]
        print(
            f"parity vs PyTorch fake-quant (the graph's Q/DQ arithmetic) on {parity['scenes']} val scenes: "
            + ", ".join(f"{k} max abs {o['max_abs']:.2e}" for k, o in parity["outputs"].items())
            + f"; detection counts (score >= 0.05) {'equal' if parity['detections_equal'] else 'DIFFER'}, "
            f"(score >= {CONFIDENT}) {'equal' if parity['confident_detections_equal'] else 'DIFFER'}"
        )
    if "ort_cpu" in report:
        cpu = report["ort_cpu"]
        kernels = ", ".join(f"{k} {v}" for k, v in cpu["integer_kernels"].items()) or "no integer kernels"
        print(
            f"ORT CPU form: {kernels}, {cpu['float_compute_ops']} convs left in FP32; max abs vs the Q/DQ graph "
            f"{max(cpu['vs_qdq']['max_abs'].values()):.2e}"
        )
    if "accuracy" in report:
        acc = report["accuracy"]
        print(
            f"ONNX Runtime on {acc['scenes']} val scenes: mAP FP32 {acc['fp32']['mAP']:.4f}, INT8 {acc['int8']['mAP']:.4f}"
            f" ({acc['mAP_change']:+.4f})"
            + (
                f", INT8 ORT CPU form {acc['int8_ort_cpu']['mAP']:.4f} ({acc['mAP_change_ort_cpu']:+.4f})"
                if "int8_ort_cpu" in acc
                else ""
            )
        )
    print(f"saved {args.out}")


def add_quantize_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="INT8 post-training quantization (ModelOpt Q/DQ) of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a reference checkpoint, pruned or not")
    p.add_argument("--out", required=True, help="quantized checkpoint folder")
    p.add_argument(
        "--calib-scenes", type=positive_int, default=64, help="training-split scenes to calibrate on (default 64)"
    )
    p.add_argument("--method", choices=("max", "mse", "histogram"), default="max", help="calibration (default max)")
    p.add_argument(
        "--skip",
        action="append",
        metavar="MODULE",
        help=f"module left in floating point (repeatable; default: {', '.join(REFERENCE_SKIP)})",
    )
    p.add_argument("--no-default-skip", action="store_true", help="quantize the default skipped layers too")
    p.add_argument("--no-fuse-bn", action="store_true", help="do not fold BatchNorm into the convs first")
    p.add_argument("--no-share", action="store_true", help="no shared scale for quantizers reading one tensor")
    p.add_argument(
        "--quantize-residual-adds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one shared quantizer on both inputs of each residual Add (default; CUDA-BEVFusion's rule; lets ONNX "
        "Runtime CPU run the block's second conv and downsample conv as QLinearConv)",
    )
    p.add_argument("--reference", help="the floating-point checkpoint to compare with (default: --checkpoint)")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx (Q/DQ) + model_fp32.onnx, parity")
    p.add_argument(
        "--ort-cpu",
        action="store_true",
        help="with --onnx: also write model_ort_cpu.onnx, the graph in ONNX Runtime's CPU form (uint8 activations)",
    )
    p.add_argument("--parity-scenes", type=positive_int, default=8, help="val scenes for parity (default 8)")
    p.add_argument(
        "--val-scenes", type=non_negative_int, default=0, help="with --onnx: mAP of both graphs on N val scenes"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch and ONNX Runtime threads (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    p.set_defaults(run=cmd_quantize)
    return p


def qat_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    steps: int = 300,
    lr: float = 5e-4,
    scenes: int = 500,
    batch_size: int = 4,
    threads: int = 1,
    val_scenes: int = 0,
    parity_scenes: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning: continue training a quantized checkpoint with its quantizers in place
    (ModelOpt's straight-through estimator; the activation scales stay as calibrated, the fused weights
    learn to live with the rounding), on `scenes` training scenes; saved as a quantized checkpoint again."""
    from common.io import check_replaceable, staged_directory
    from compress.finetune import finetune
    from export.onnx import export_onnx, torch_threads
    from export.quantize import QUANT_KIND, is_quantized_checkpoint, write_quantized
    from fusion.checkpoint import load_checkpoint, save_checkpoint
    from fusion.models.bevfusion import example_inputs
    from fusion.task import reference_task

    if not is_quantized_checkpoint(checkpoint):
        raise ValueError(f"--qat fine-tunes a quantized checkpoint; {checkpoint} is not one (run altermoma quantize)")
    check_replaceable(out, (QUANT_KIND,), overwrite)
    start = time.perf_counter()
    with torch_threads(threads):
        model, meta = load_quantized_checkpoint(checkpoint)
        base, base_meta = load_checkpoint(Path(checkpoint) / BASE)
        batches = calibration_batches(model.config, scenes, batch_size, progress=progress)
        result = finetune(model, reference_task(model), batches, steps=steps, lr=lr, progress=progress)
        model.eval()
        report = {k: meta[k] for k in ("config", "fused_conv_bn", "calibration_batches", "shared_groups")}
        report["residual_adds"] = meta.get("residual_adds", [])  # the rewritten modules travel with the weights
        report.update(
            qat={"steps": steps, "lr": lr, "scenes": scenes, "batch_size": batch_size, "split": "train", **result},
            checkpoint=str(checkpoint),
            threads=int(threads),
            command=" ".join(["altermoma", *sys.argv[1:]]),
        )
        out = Path(out)
        with staged_directory(out, kind=QUANT_KIND) as staging:
            save_checkpoint(staging / BASE, base, {k: v for k, v in base_meta.items() if k in ("pruning", "command")})
            write_quantized(model, staging, report, {"source": meta.get("source", {}), "qat": report["qat"]})
            if val_scenes:
                report.update(
                    _export_both(
                        model,
                        base,
                        None,
                        staging,
                        out,
                        threads,
                        parity_scenes,
                        val_scenes,
                        example_inputs,
                        export_onnx,
                        load_checkpoint,
                    )
                )
            report["seconds"] = round(time.perf_counter() - start, 2)
            (staging / "quantize_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def cmd_finetune_qat(args: argparse.Namespace) -> None:
    """`altermoma finetune --qat`: see `qat_checkpoint`."""
    if not args.qat:
        raise ValueError(f"{args.checkpoint} is a quantized checkpoint: fine-tune it with --qat (or its base/ without)")
    if args.task is not None or args.resume or getattr(args, "data", "synthetic") != "synthetic":
        raise ValueError(
            "--qat fine-tunes a reference quantized checkpoint on synthetic scenes: no --task/--resume/--data"
        )
    threads = args.threads or 1
    report = qat_checkpoint(
        args.checkpoint,
        args.out,
        steps=args.steps,
        lr=args.lr,
        scenes=args.scenes,
        threads=threads,
        val_scenes=args.val_scenes,
        overwrite=args.overwrite,
    )
    qat = report["qat"]
    print(f"QAT {qat['steps']} steps: loss {qat['first_loss']:.4f} -> {qat['final_loss']:.4f}")
    if "accuracy" in report:
        acc = report["accuracy"]
        print(
            f"ONNX Runtime on {acc['scenes']} val scenes: mAP FP32 {acc['fp32']['mAP']:.4f}, INT8 {acc['int8']['mAP']:.4f}"
            f" ({acc['mAP_change']:+.4f})"
        )
    print(f"saved {args.out}")


INT8_CALIB_SCENES = 64


def pipeline_int8(
    out: Path, unpruned, finetuned: Path, name: str, val_scenes: int, threads: int, runs: int = 50
) -> tuple[dict, str]:
    """`--int8`: INT8 PTQ of the fine-tuned pruned model (`altermoma quantize --onnx --ort-cpu`, calibration on
    training scenes), mAP/NDS through ONNX Runtime on the val scenes, and ONNX Runtime CPU latency of the
    unpruned FP32 graph, the pruned FP32 graph and the pruned INT8 graphs with the `bench` harness."""
    import os

    from altermoma.bench import measure
    from export.onnx import OrtPipeline, export_onnx, torch_threads
    from export.qdq_ort import ORT_CPU_FILE
    from fusion.models.bevfusion import example_inputs

    quantized = quantize_checkpoint(
        finetuned, out / "int8", INT8_CALIB_SCENES, onnx=True, ort_cpu=True, val_scenes=val_scenes,
        threads=threads, overwrite=True,
    )  # fmt: skip
    acc = quantized["accuracy"]
    with torch_threads(threads):
        inputs = example_inputs(unpruned.config, 1, unpruned.modality)
        export_onnx(unpruned, inputs, out / "int8" / "unpruned_fp32.onnx", check=False, threads=threads)
    graphs = {
        "fusion unpruned, FP32": out / "int8" / "unpruned_fp32.onnx",
        f"{name}, FP32": out / "int8" / "model_fp32.onnx",
        f"{name}, INT8": out / "int8" / "model.onnx",
        f"{name}, INT8 (ONNX Runtime CPU form)": out / "int8" / ORT_CPU_FILE,
    }
    unpruned_map = ort_map(graphs["fusion unpruned, FP32"], unpruned.config, val_scenes, threads)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    rows = []
    for label, path in graphs.items():
        pipeline = OrtPipeline(path, threads)
        timed = measure(lambda pipeline=pipeline: pipeline({k: feeds[k] for k in pipeline.input_names}), 10, runs)
        rows.append({"model": label, "onnx": str(path), "latency": timed})
    metrics = [unpruned_map, acc["fp32"], acc["int8"], acc["int8_ort_cpu"]]
    base_ms = rows[0]["latency"]["median_ms"]
    for row, m in zip(rows, metrics):
        row.update(mAP=m["mAP"], NDS=m["NDS"], mIoU=m.get("mIoU", float("nan")))
        row["speedup_vs_unpruned_fp32"] = base_ms / row["latency"]["median_ms"]
        row["mAP_change_vs_unpruned_fp32"] = m["mAP"] - unpruned_map["mAP"]
    lines = [
        "## INT8 (`--int8`): the fine-tuned pruned model quantized, next to FP32",
        "",
        f"INT8 PTQ (ModelOpt, max calibration on {INT8_CALIB_SCENES} training scenes, CUDA-BEVFusion placement; "
        f"`altermoma quantize --checkpoint {finetuned} --onnx --ort-cpu`). mAP/NDS through ONNX Runtime on the "
        f"same {val_scenes} val scenes; latency: ONNX Runtime CPU, {threads} thread(s), batch 1, median of {runs} "
        f"runs after 10 warm-up, load average {[round(x, 2) for x in os.getloadavg()]}.",
        "",
        "| model | mAP | NDS | mAP vs unpruned FP32 (points) | ORT CPU median ms | speed-up vs unpruned FP32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['mAP']:.4f} | {row['NDS']:.4f} | {100 * row['mAP_change_vs_unpruned_fp32']:+.2f} "
            f"| {row['latency']['median_ms']:.2f} | {row['speedup_vs_unpruned_fp32']:.2f}x |"
        )
    parity = quantized["parity"]
    lines += [
        "",
        f"INT8 vs FP32 of the same pruned model: {100 * acc['mAP_change']:+.2f} mAP points (Q/DQ graph), "
        f"{100 * acc['mAP_change_ort_cpu']:+.2f} (ONNX Runtime CPU form). Parity, Q/DQ graph vs PyTorch fake "
        f"quant on {parity['scenes']} val scenes: max abs "
        + ", ".join(f"{k} {o['max_abs']:.3g}" for k, o in parity["outputs"].items())
        + f"; detections at score >= {parity['confident_threshold']} "
        f"{'identical' if parity['confident_detections_equal'] else 'DIFFER'} in count.",
    ]
    summary = {
        "quantized": str(out / "int8"),
        "calibration_scenes": INT8_CALIB_SCENES,
        "accuracy": acc,
        "parity": parity,
        "rows": rows,
    }
    return summary, "\n".join(lines) + "\n"
