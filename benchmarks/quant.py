"""Prune, then quantize: ONNX Runtime CPU latency of FP32/INT8 x unpruned/pruned, and INT8 accuracy (issue 14).

Latency: the `small` preset with seeded random weights (latency depends on shapes, not values), pruned to
`--target-gflops` with the real pipeline (`benchmarks.speedup.prepare`), each model exported as FP32 and
as an INT8 Q/DQ graph (ModelOpt PTQ, calibrated on training-split scenes), timed in ONNX Runtime's CPU
provider with explicit threads (`benchmarks.latency.measure`: warm-up, then >= 50 runs, median/p90/p99).
For every INT8 graph the graph ONNX Runtime actually runs (`SessionOptions.optimized_model_filepath`) is
inspected: QLinearConv / QLinearMatMul / MatMulInteger etc. are Q/DQ fused into integer kernels; a Conv
left between DequantizeLinear and QuantizeLinear ran as an FP32 kernel on dequantized values.

Accuracy: `altermoma quantize --onnx --val-scenes N` on each `--accuracy LABEL=CHECKPOINT` (FP32 vs INT8
through ONNX Runtime on the val split, calibration on the training split); its report is copied in.

    python -m benchmarks.quant --out reports/quant --threads 1 \
        --accuracy tiny=fusion/weights/tiny-fusion --accuracy pruned-ft=/tmp/q/ft --val-scenes 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from benchmarks.latency import environment
from common.io import atomic_write_text
from export.onnx import OrtPipeline, export_onnx, session_options, torch_threads

FUSED_INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QLinearAdd",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QGemm",
    "QLinearAveragePool",
)
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")


def optimized_graph_ops(onnx_path: Path, threads: int, out_path: Path) -> dict[str, Any]:
    """Op histogram of the graph ONNX Runtime runs after its optimisations (saved to `out_path`), and which
    compute ops stayed floating point (read dequantized inputs) or were fused into integer kernels."""
    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # serialisable level
    options.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out_path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    ops = Counter(n.op_type for n in graph.node)
    float_compute = []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            src = producers.get(node.input[0])
            float_compute.append(
                {"node": node.name, "op": node.op_type, "input_from": src.op_type if src is not None else "graph input"}
            )
    return {
        "level": "ORT_ENABLE_EXTENDED",
        "ops": dict(ops.most_common()),
        "integer_kernels": {k: ops[k] for k in FUSED_INTEGER_OPS if ops[k]},
        "float_compute_ops": len(float_compute),
        "float_compute": float_compute,
        "quantize_linear_left": ops["QuantizeLinear"],
        "dequantize_linear_left": ops["DequantizeLinear"],
    }


def uint8_after_relu(path: Path, out: Path) -> Path:
    """An ONNX Runtime-only variant of a Q/DQ graph: Relu -> Q/DQ(int8, zero-point 0) becomes Q/DQ(uint8,
    zero-point 0) with the same scale. ONNX Runtime removes a Relu before a Q only when the zero-point is the
    type's minimum (its ReluQuantFusion), and only then sees DQ -> Conv -> Q to fuse into QLinearConv. Values
    equal the symmetric graph's below the int8 ceiling (127 x scale; uint8 saturates at 255 x scale instead).
    TensorRT wants the symmetric int8 graph: this variant is measured, never shipped."""
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        producer = producers.get(node.input[0])
        if producer is None or producer.op_type != "Relu":
            continue
        zero = f"{node.name}/uint8_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zero))
        node.input[2] = zero
        for dq in consumers.get(node.output[0], []):
            dq.input[2] = zero
    onnx.save(model, str(out))
    return out


def latency_models(preset: str, target: float, method: str, calib_scenes: int, threads: int, work: Path):
    """(label, onnx path) for FP32/INT8 x unpruned/pruned, plus the pruning and quantization details."""
    from benchmarks.speedup import prepare
    from export.quantize import QuantizeConfig, quantize
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes, collate
    from fusion.models.bevfusion import example_inputs
    from fusion.task import reference_task

    unpruned_dir, pruned_dir = prepare(preset, target, method, 8, work)
    graphs, details = {}, {}
    for kind, directory in (("unpruned", unpruned_dir), ("pruned", pruned_dir)):
        model, meta = load_checkpoint(directory)
        inputs = example_inputs(model.config, 1, model.modality)
        path = work / f"{kind}-fp32.onnx"
        export_onnx(model, inputs, path, check=False, threads=threads)
        graphs[f"FP32 {kind}"] = path
        scenes = SyntheticScenes(model.config, "train", num_scenes=calib_scenes, progress=False)
        batches = [collate([scenes[i]]) for i in range(len(scenes))]
        skip = tuple(n for n in ("lidar.pfn.conv", "decoder.neck.lateral.0") if n in dict(model.named_modules()))
        report = quantize(model, reference_task(model), batches, QuantizeConfig(skip=skip), progress=False)
        path = work / f"{kind}-int8.onnx"
        export_onnx(model, inputs, path, check=True, threads=threads)
        graphs[f"INT8 {kind}"] = path
        graphs[f"INT8 {kind}, ORT uint8 variant"] = uint8_after_relu(path, work / f"{kind}-int8-ort-u8.onnx")
        details[kind] = {
            "checkpoint": str(directory),
            "gflops_reduction": meta.get("pruning", {}).get("gflops_reduction", 0.0),
            "quantizers_enabled": report["quantizers_enabled"],
            "skipped": report["skipped"],
            "calibration_scenes": calib_scenes,
        }
    return graphs, details


def _feeds(pipeline: OrtPipeline) -> dict[str, Any]:
    """Seeded inputs of the graph's shapes: floats in [0, 1), integer indices 0 (valid for every gather)."""
    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for value in pipeline.sessions["model"].get_inputs():
        shape = [int(d) for d in value.shape]
        if value.type == "tensor(float)":
            feeds[value.name] = torch.rand(shape, generator=generator).numpy()
        else:
            feeds[value.name] = torch.zeros(shape, dtype=torch.int64).numpy()
    return feeds


def bench_latency(graphs: Mapping[str, Path], threads: int, warmup: int, runs: int, work: Path) -> dict[str, Any]:
    """Every graph timed in interleaved rounds (10 rounds of runs/10 calls each, after `warmup` calls), so that
    load from other processes on a shared machine hits all models alike; median/p90/p99 over all runs."""
    import numpy as np

    from export.runtime import latency_summary

    pipelines = {label: OrtPipeline(path, threads) for label, path in graphs.items()}
    feeds = {label: _feeds(pipeline) for label, pipeline in pipelines.items()}
    samples: dict[str, list[float]] = {label: [] for label in graphs}
    for label, pipeline in pipelines.items():
        for _ in range(warmup):
            pipeline(feeds[label])
    rounds = 10
    for r in range(rounds):
        for label, pipeline in pipelines.items():
            for _ in range(runs // rounds + (1 if r < runs % rounds else 0)):
                start = time.perf_counter()
                pipeline(feeds[label])
                samples[label].append((time.perf_counter() - start) * 1e3)
    results = {}
    for label, path in graphs.items():
        summary = {f"{k}_ms": v for k, v in latency_summary(np.array(samples[label])).items()}
        timed = {**summary, "runs": len(samples[label]), "warmup": warmup, "rounds": rounds}
        results[label] = {"path": str(path), "latency": timed}
        if label.startswith("INT8"):
            results[label]["ort_graph"] = optimized_graph_ops(path, threads, work / f"{path.stem}.ort.onnx")
    base = results["FP32 unpruned"]["latency"]["median_ms"]
    reference = OrtPipeline(graphs["INT8 unpruned"], threads)
    variant = OrtPipeline(graphs["INT8 unpruned, ORT uint8 variant"], threads)
    feeds = {k: v for k, v in _feeds(reference).items()}
    a, b = reference(feeds), variant(feeds)
    results["INT8 unpruned, ORT uint8 variant"]["max_abs_vs_int8"] = max(float(abs(a[k] - b[k]).max()) for k in a)
    for row in results.values():
        row["speedup_vs_fp32_unpruned"] = base / row["latency"]["median_ms"]
    return results


def accuracy(label: str, checkpoint: str, work: Path, calib_scenes: int, val_scenes: int, threads: int) -> dict:
    """`altermoma quantize --onnx --val-scenes` on one checkpoint (the exact user command), its report."""
    out = work / f"int8-{label}"
    command = [
        sys.executable,
        "-m",
        "altermoma",
        "quantize",
        "--checkpoint",
        checkpoint,
        "--out",
        str(out),
        "--calib-scenes",
        str(calib_scenes),
        "--onnx",
        "--val-scenes",
        str(val_scenes),
        "--threads",
        str(threads),
        "--overwrite",
    ]
    subprocess.run(command, check=True)
    report = json.loads((out / "quantize_report.json").read_text())
    shown = ["altermoma", *command[3:]]
    return {
        "label": label,
        "checkpoint": checkpoint,
        "command": " ".join(shown),
        "accuracy": report["accuracy"],
        "parity": report["parity"],
        "pruned": report["pruned"],
        "calibration": {
            "split": report["calibration_split"],
            "scenes": report["calibration_scenes"],
            "method": report["config"]["method"],
        },
        "skipped": report["skipped"],
    }


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Prune, then quantize: INT8 Q/DQ on ONNX Runtime CPU",
        "",
        f"Command: `{report['command']}`",
        "",
        f"CPU: {env['cpu']} ({env['logical_cpus']} logical), ONNX Runtime {env['onnxruntime']}, "
        f"{report['threads']} intra-op thread(s), inter-op 1, batch 1; load average at start "
        f"{env['load_average_1_5_15']}.",
        "",
    ]
    if report.get("latency"):
        lat = report["latency"]
        lines += [
            f"## Latency, `{report['preset']}` preset (random weights), {report['runs']} runs after {report['warmup']}"
            " warm-up",
            "",
            f"Pruned: {report['method']} to {report['pruning']['pruned']['gflops_reduction']:.1%} fewer GFLOPs. INT8: "
            f"ModelOpt PTQ (max calibration, {report['pruning']['unpruned']['calibration_scenes']} training scenes), "
            "Conv+BN fused, first LiDAR layer and first decoder deblock in FP32.",
            "",
            "| model | median ms | p90 ms | p99 ms | speed-up vs FP32 unpruned |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, row in lat.items():
            t = row["latency"]
            lines.append(
                f"| {label} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} | {t['p99_ms']:.2f} | "
                f"{row['speedup_vs_fp32_unpruned']:.2f}x |"
            )
        combined = lat["INT8 pruned"]["speedup_vs_fp32_unpruned"]
        lines += [
            "",
            f"Combined speed-up (INT8 pruned vs FP32 unpruned): **{combined:.2f}x** (goal 3x: "
            f"{'met' if combined >= 3 else 'NOT met'}).",
            "",
            '"ORT uint8 variant": the same Q/DQ graph with each Relu -> Q/DQ pair turned from int8 into uint8 '
            "(zero-point 0, same scale), so that ONNX Runtime can drop the Relu and fuse DQ -> Conv -> Q into "
            "QLinearConv; an ONNX Runtime experiment, not the TensorRT deliverable (max abs difference from the "
            f"symmetric graph: {lat['INT8 unpruned, ORT uint8 variant'].get('max_abs_vs_int8', float('nan')):.2e}).",
            "",
            "### Where ONNX Runtime ran integer kernels",
            "",
            "| model | integer kernels | float Conv/MatMul left | Q left | DQ left |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for label, row in lat.items():
            if "ort_graph" in row:
                g = row["ort_graph"]
                kernels = ", ".join(f"{k} {v}" for k, v in g["integer_kernels"].items()) or "none"
                lines.append(
                    f"| {label} | {kernels} | {g['float_compute_ops']} | {g['quantize_linear_left']} | "
                    f"{g['dequantize_linear_left']} |"
                )
        for label, row in lat.items():
            if "ort_graph" in row and row["ort_graph"]["float_compute"]:
                names = ", ".join(f"{c['node']} ({c['op']})" for c in row["ort_graph"]["float_compute"])
                lines += ["", f"{label}, compute ops ONNX Runtime left in FP32: {names}"]
    if report.get("accuracy"):
        lines += [
            "",
            "## Accuracy through ONNX Runtime (val split; calibration on the training split)",
            "",
            "| model | val scenes | FP32 mAP | INT8 mAP | change (points) | FP32 NDS | INT8 NDS | detection counts equal |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in report["accuracy"]:
            acc, par = row["accuracy"], row["parity"]
            equal = sum(a == b for a, b in zip(par["detections_torch"], par["detections_ort"]))
            confident = sum(a == b for a, b in zip(par["confident_detections_torch"], par["confident_detections_ort"]))
            lines.append(
                f"| {row['label']} | {acc['scenes']} | {acc['fp32']['mAP']:.4f} | {acc['int8']['mAP']:.4f} | "
                f"{100 * acc['mAP_change']:+.2f} | {acc['fp32'].get('NDS', float('nan')):.4f} | "
                f"{acc['int8'].get('NDS', float('nan')):.4f} | {equal}/{len(par['detections_torch'])} scenes (score >= 0.05),"
                f" {confident}/{len(par['detections_torch'])} (score >= {par['confident_threshold']}) |"
            )
        lines += ["", "Commands:", ""] + [f"- {row['label']}: `{row['command']}`" for row in report["accuracy"]]
        lines += ["", "Parity, Q/DQ graph in ONNX Runtime vs PyTorch fake-quant (max abs error per output):", ""]
        for row in report["accuracy"]:
            par = row["parity"]
            lines.append(
                f"- {row['label']} ({par['scenes']} val scenes): "
                + ", ".join(f"{k} {o['max_abs']:.3g} (|ref| {o['max_ref_abs']:.3g})" for k, o in par["outputs"].items())
                + f"; detections per scene (score >= 0.05) torch {par['detections_torch']} vs ORT {par['detections_ort']}"
                + f", (score >= {par['confident_threshold']}) torch {par['confident_detections_torch']} vs ORT "
                f"{par['confident_detections_ort']}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/quant")
    parser.add_argument("--work", default="runs/quant", help="exported graphs and quantized checkpoints")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--target-gflops", type=float, default=0.5)
    parser.add_argument("--method", default="altereva", help="pruning method for the latency model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--calib-scenes", type=int, default=64)
    parser.add_argument("--accuracy", action="append", default=[], metavar="LABEL=CHECKPOINT")
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 50:
        parser.error("--runs must be >= 50 (measurement rules)")
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.quant", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(args.threads, 1),
        "threads": args.threads,
        "preset": args.preset,
        "method": args.method,
        "runs": args.runs,
        "warmup": args.warmup,
    }
    if not args.no_latency:
        with torch_threads(args.threads):
            graphs, details = latency_models(
                args.preset, args.target_gflops, args.method, args.calib_scenes, args.threads, work
            )
            report["pruning"] = details
            report["latency"] = bench_latency(graphs, args.threads, args.warmup, args.runs, work)
    report["accuracy"] = []
    for spec in args.accuracy:
        label, _, checkpoint = spec.partition("=")
        report["accuracy"].append(accuracy(label, checkpoint, work, args.calib_scenes, args.val_scenes, args.threads))
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "quant.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "quant.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
