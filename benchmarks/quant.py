"""Prune, then quantize: ONNX Runtime CPU latency of FP32/INT8 x unpruned/pruned, and INT8 accuracy (issue 14).

Latency: the `small` preset with seeded random weights (latency depends on shapes, not values), pruned to
`--target-gflops` with the real pipeline (`benchmarks.speedup.prepare`), each model exported as FP32 and
as an INT8 Q/DQ graph (ModelOpt PTQ, calibrated on training-split scenes), timed in ONNX Runtime's CPU
provider with explicit threads (`altermoma.bench.measure`: warm-up, then >= 50 runs, median/p90/p99).
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

from altermoma.bench import environment
from common.io import atomic_write_text
from export.onnx import export_onnx, session_options, torch_threads
from export.qdq_ort import ort_fusion_report, to_ort_cpu_form

ORT_SETTINGS = {  # ONNX Runtime session config entries tried on the pruned ORT CPU form (export/qdq_ort.py)
    "session.qdqisint8allowed=1": {"session.qdqisint8allowed": "1"},
    "session.x64quantprecision=1": {"session.x64quantprecision": "1"},
}


def ort_cpu_forms(path: Path, kind: str, work: Path) -> dict[str, Path]:
    """The ORT CPU deployment form of an INT8 graph (`export.qdq_ort.to_ort_cpu_form`) and its exact
    variant (zero-point 128 only, the Relu kept), written next to it."""
    forms = {}
    for label, relu_uint8 in (("ORT CPU form", True), ("ORT CPU form, zero-point 128 only (exact)", False)):
        converted, _ = to_ort_cpu_form(onnx.load(str(path)), relu_uint8=relu_uint8)
        out = work / f"{kind}-int8-ort-cpu{'' if relu_uint8 else '-exact'}.onnx"
        onnx.save(converted, str(out))
        forms[f"INT8 {kind}, {label}"] = out
    return forms


def latency_models(
    preset: str, target: float, method: str, calib_scenes: int, threads: int, work: Path, residual_adds: bool = True
):
    """(label, onnx path) for FP32/INT8 x unpruned/pruned, plus the pruning and quantization details;
    `residual_adds`: quantize with `QuantizeConfig.quantize_residual_adds`."""
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
        config = QuantizeConfig(skip=skip, quantize_residual_adds=residual_adds)
        report = quantize(model, reference_task(model), batches, config, progress=False)
        path = work / f"{kind}-int8.onnx"
        export_onnx(model, inputs, path, check=True, threads=threads)
        graphs[f"INT8 {kind}"] = path
        graphs.update(ort_cpu_forms(path, kind, work))
        details[kind] = {
            "checkpoint": str(directory),
            "gflops_reduction": meta.get("pruning", {}).get("gflops_reduction", 0.0),
            "quantizers_enabled": report["quantizers_enabled"],
            "skipped": report["skipped"],
            "residual_adds": report["residual_adds"],
            "calibration_scenes": calib_scenes,
        }
    return graphs, details


def _feeds(session: ort.InferenceSession) -> dict[str, Any]:
    """Seeded inputs of the graph's shapes: floats in [0, 1), integer indices 0 (valid for every gather)."""
    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [int(d) for d in value.shape]
        if value.type == "tensor(float)":
            feeds[value.name] = torch.rand(shape, generator=generator).numpy()
        else:
            feeds[value.name] = torch.zeros(shape, dtype=torch.int64).numpy()
    return feeds


def _session(path: Path, threads: int, config: Mapping[str, str] | None = None, profile: str | None = None):
    options = session_options(threads)  # explicit intra-op threads, inter-op 1, sequential, ORT_ENABLE_ALL
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, threads: int, runs: int, work: Path) -> dict[str, float]:
    """Milliseconds per run spent in each op type (ONNX Runtime's profiler, `runs` runs after 3 warm-up)."""
    session = _session(path, threads, profile=str(work / f"{path.stem}-profile"))
    feeds = _feeds(session)
    for _ in range(runs + 3):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    trace.unlink()
    per_op: Counter = Counter()
    for event in events[-len(events) * runs // (runs + 3) :]:  # drop the warm-up runs (same nodes each run)
        per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return {op: round(ms, 2) for op, ms in per_op.most_common()}


def bench_latency(graphs: Mapping[str, Path], threads: int, warmup: int, runs: int, work: Path) -> dict[str, Any]:
    """Every graph timed in interleaved rounds (10 rounds of runs/10 calls each, after `warmup` calls), so that
    load from other processes on a shared machine hits all models alike; median/p90/p99 over all runs.
    The pruned ORT CPU form is also timed with the ONNX Runtime settings in `ORT_SETTINGS`."""
    import numpy as np

    from export.runtime import latency_summary

    configs: dict[str, tuple[Path, dict[str, str]]] = {label: (path, {}) for label, path in graphs.items()}
    for name, config in ORT_SETTINGS.items():
        configs[f"INT8 pruned, ORT CPU form, {name}"] = (graphs["INT8 pruned, ORT CPU form"], config)
    sessions = {label: _session(path, threads, config) for label, (path, config) in configs.items()}
    feeds = {label: _feeds(session) for label, session in sessions.items()}
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    for label, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[label])
    rounds = 10
    for r in range(rounds):
        for label, session in sessions.items():
            for _ in range(runs // rounds + (1 if r < runs % rounds else 0)):
                start = time.perf_counter()
                session.run(None, feeds[label])
                samples[label].append((time.perf_counter() - start) * 1e3)
    results = {}
    for label, (path, config) in configs.items():
        summary = {f"{k}_ms": v for k, v in latency_summary(np.array(samples[label])).items()}
        timed = {**summary, "runs": len(samples[label]), "warmup": warmup, "rounds": rounds}
        results[label] = {"path": str(path), "session_config": config, "latency": timed}
        if label.startswith("INT8") and not config:
            results[label]["ort_graph"] = ort_fusion_report(path, threads, work / f"{path.stem}.ort.onnx")
    base = results["FP32 unpruned"]["latency"]["median_ms"]
    for kind in ("unpruned", "pruned"):  # same inputs through the TensorRT form and the ORT CPU forms
        reference = sessions[f"INT8 {kind}"].run(None, feeds[f"INT8 {kind}"])
        for label in results:
            if label.startswith(f"INT8 {kind}, ORT CPU form") and not configs[label][1]:
                out = sessions[label].run(None, feeds[label])
                results[label]["max_abs_vs_int8"] = max(float(np.abs(a - b).max()) for a, b in zip(reference, out))
    for row in results.values():
        row["speedup_vs_fp32_unpruned"] = base / row["latency"]["median_ms"]
    for label in ("FP32 pruned", "INT8 pruned", "INT8 pruned, ORT CPU form"):
        results[label]["op_profile_ms"] = op_profile(configs[label][0], threads, 10, work)
    return results


def accuracy(
    label: str,
    checkpoint: str,
    work: Path,
    calib_scenes: int,
    val_scenes: int,
    threads: int,
    residual_adds: bool = True,
) -> dict:
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
        "--ort-cpu",
        "--val-scenes",
        str(val_scenes),
        "--threads",
        str(threads),
        "--overwrite",
        "--quantize-residual-adds" if residual_adds else "--no-quantize-residual-adds",
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
        "ort_cpu": report["ort_cpu"],
        "pruned": report["pruned"],
        "calibration": {
            "split": report["calibration_split"],
            "scenes": report["calibration_scenes"],
            "method": report["config"]["method"],
        },
        "skipped": report["skipped"],
    }


def parity_layers(directory: Path, scenes: int, threads: int) -> dict[str, Any]:
    """Where the Q/DQ graph in ONNX Runtime and PyTorch's fake quant part, quantizer by quantizer.

    Both sides compute the graph's own Q/DQ arithmetic (`onnx_qdq_semantics`; ORT without the optimizers in
    `ORT_INEXACT_OPTIMIZERS`). For every enabled input quantizer, in execution order: the largest float
    difference of its input and how many INT8 codes (round(x / scale)) differ. A scene whose first quantizers
    agree to the last bit and then flip one code after a conv shows the residual is FP32 conv kernels
    (PyTorch's vs ONNX Runtime's MLAS) differing in the last bit, not a scale or rounding mismatch."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import ORT_INEXACT_OPTIMIZERS, load_quantized, onnx_qdq_semantics, quantizers
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes, collate, model_inputs

    model = load_quantized(load_checkpoint(directory / "base")[0], directory)  # as `altermoma quantize` wrote it
    graph = onnx.load(str(directory / "model.onnx"))
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node if n.op_type == "Constant"
    }
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.graph.initializer})

    def module_path(node_name: str) -> str:  # "/a/b/layer1/layer1.0/conv1/input_quantizer/QuantizeLinear"
        parts = node_name.strip("/").split("/")[:-1]
        keep = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
        return ".".join(keep)

    q_nodes = {module_path(n.name): n for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    table = {  # a residual Add's quantizer runs twice (one Q per Add input): only single-call quantizers here
        n: q
        for n, q in quantizers(model).items()
        if q.is_enabled and n.endswith("input_quantizer") and n in q_nodes and ".residual_add" not in n
    }
    graph.graph.output.extend(
        helper.make_tensor_value_info(q_nodes[n].input[0], TensorProto.FLOAT, None) for n in table
    )
    session = ort.InferenceSession(
        graph.SerializeToString(), session_options(threads), ["CPUExecutionProvider"],
        disabled_optimizers=list(ORT_INEXACT_OPTIMIZERS),
    )  # fmt: skip
    dataset = SyntheticScenes(model.config, "val", num_scenes=scenes, progress=False)
    rows = []
    for index in range(len(dataset)):
        inputs = model_inputs(collate([dataset[index]]))
        seen: dict[str, torch.Tensor] = {}
        order: list[str] = []
        handles = []
        for name in table:

            def hook(_module, args, name=name, seen=seen, order=order):
                if name not in seen:
                    order.append(name)
                seen[name] = args[0].detach().clone()

            handles.append(table[name].register_forward_pre_hook(hook))
        with torch.no_grad(), onnx_qdq_semantics():
            reference = model(**inputs)
        for handle in handles:
            handle.remove()
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {v.name: inputs[v.name].numpy() for v in session.get_inputs()})))
        layers = []
        for name in order:
            node = q_nodes[name]
            ours, theirs, scale = seen[name].numpy(), values[node.input[0]], constants[node.input[1]]
            codes = int(
                (np.clip(np.rint(ours / scale), -128, 127) != np.clip(np.rint(theirs / scale), -128, 127)).sum()
            )
            layers.append({"quantizer": name, "max_abs_input": float(np.abs(ours - theirs).max()), "codes_differ": codes,
                           "codes": int(ours.size)})  # fmt: skip
        first = next((layer for layer in layers if layer["codes_differ"]), None)
        rows.append(
            {
                "scene": index,
                "heatmap_max_abs": float(np.abs(values["heatmap"] - reference["heatmap"].numpy()).max()),
                "first_flip": first,
                "before_first_flip_max_abs": max(
                    [layer["max_abs_input"] for layer in layers[: layers.index(first)]]
                    if first
                    else [layer["max_abs_input"] for layer in layers],
                    default=0.0,
                ),  # fmt: skip
                "codes_differ_last": layers[-1]["codes_differ"] if layers else 0,
                "layers": layers,
            }
        )
    return {"checkpoint": str(directory), "scenes": len(dataset), "threads": threads, "rows": rows}


def parity_layers_markdown(result: Mapping[str, Any], command: str) -> str:
    lines = [
        "# Parity layer by layer: where ONNX Runtime and PyTorch's fake quant part",
        "",
        f"Command: `{command}`; checkpoint {result['checkpoint']}, {result['threads']} thread(s). Both sides "
        "compute the graph's Q/DQ arithmetic (PyTorch under `export.quantize.onnx_qdq_semantics`, ONNX Runtime "
        "without `WeightBiasQuantization`). Per scene: the heatmap's max abs difference, the largest float difference "
        "at the quantizer inputs before the first INT8 code differs, the first quantizer where one does, and the "
        "codes differing at the last quantizer.",
        "",
        "| scene | heatmap max abs | max abs before first flip | first quantizer with a differing code "
        "(input max abs, codes differing) | codes differing at the last quantizer |",
        "| ---: | ---: | ---: | --- | ---: |",
    ]
    for row in result["rows"]:
        first = row["first_flip"]
        where = (
            f"{first['quantizer']} ({first['max_abs_input']:.2e}, {first['codes_differ']}/{first['codes']})"
            if first
            else "none"
        )
        last = row["layers"][-1] if row["layers"] else {"codes": 0}
        lines.append(
            f"| {row['scene']} | {row['heatmap_max_abs']:.3g} | {row['before_first_flip_max_abs']:.2e} | {where} | "
            f"{row['codes_differ_last']}/{last['codes']} |"
        )
    return "\n".join(lines) + "\n"


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
            "Conv+BN fused, first LiDAR layer and first decoder deblock in FP32"
            + (
                f"; residual Adds with one shared quantizer on both inputs ({len(report['pruning']['pruned']['residual_adds'])}"
                " modules, `--quantize-residual-adds`)."
                if report.get("quantize_residual_adds")
                else "; residual Adds not quantized (`--no-quantize-residual-adds`)."
            ),
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
        ort_form = lat["INT8 pruned, ORT CPU form"]["speedup_vs_fp32_unpruned"]
        lines += [
            "",
            f"Combined speed-up (INT8 pruned vs FP32 unpruned), TensorRT-form graph: **{combined:.2f}x**; ORT CPU form: "
            f"**{ort_form:.2f}x** (goal 3x: {'met' if max(combined, ort_form) >= 3 else 'NOT met'}).",
            "",
            '"ORT CPU form" (`export.qdq_ort.to_ort_cpu_form`, `altermoma quantize --onnx --ort-cpu`): activation '
            "Q/DQ pairs int8 zero-point 0 -> uint8 zero-point 128 (the same grid, identical values), and after a "
            "Relu uint8 zero-point 0 with the same scale (identical up to 127 x scale, saturating at 255 x scale "
            "instead), so ONNX Runtime drops the Relu and fuses DQ -> Conv -> Q into QLinearConv. "
            '"zero-point 128 only (exact)": the first rewrite alone. Max abs difference from the TensorRT-form '
            "graph on the benchmark's random inputs (ONNX Runtime default optimizations on both): "
            + ", ".join(
                f"{label} {row['max_abs_vs_int8']:.2e}" for label, row in lat.items() if "max_abs_vs_int8" in row
            )
            + ". Session settings rows: the pruned ORT CPU form with one ONNX Runtime config entry set.",
            "",
            "### Where the time goes (ONNX Runtime profiler, ms per run by op type, top 8)",
            "",
        ]
        for label, row in lat.items():
            if "op_profile_ms" in row:
                top = list(row["op_profile_ms"].items())[:8]
                total = sum(row["op_profile_ms"].values())
                lines.append(f"- {label} ({total:.1f} ms in kernels): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
        lines += [
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
            if "ort_graph" in row and row["ort_graph"]["float_compute"] and "(exact)" not in label:
                names = ", ".join(f"{c['node']} ({c['op']})" for c in row["ort_graph"]["float_compute"])
                lines += ["", f"{label}, compute ops ONNX Runtime left in FP32: {names}"]
    if report.get("accuracy"):
        lines += [
            "",
            "## Accuracy through ONNX Runtime (val split; calibration on the training split)",
            "",
            "| model | val scenes | FP32 mAP | INT8 mAP | change (points) | INT8 ORT CPU form mAP | change (points) "
            "| FP32 NDS | INT8 NDS |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["accuracy"]:
            acc = row["accuracy"]
            lines.append(
                f"| {row['label']} | {acc['scenes']} | {acc['fp32']['mAP']:.4f} | {acc['int8']['mAP']:.4f} | "
                f"{100 * acc['mAP_change']:+.2f} | {acc['int8_ort_cpu']['mAP']:.4f} | "
                f"{100 * acc['mAP_change_ort_cpu']:+.2f} | {acc['fp32'].get('NDS', float('nan')):.4f} | "
                f"{acc['int8'].get('NDS', float('nan')):.4f} |"
            )
        lines += ["", "Commands:", ""] + [f"- {row['label']}: `{row['command']}`" for row in report["accuracy"]]
        lines += [
            "",
            "Parity, Q/DQ graph in ONNX Runtime vs PyTorch fake-quant, max abs error per output (|ref| = the "
            "output's largest value) and detections per scene. Exact: PyTorch's fake quant with the graph's Q/DQ "
            "arithmetic (`export.quantize.onnx_qdq_semantics`) vs ONNX Runtime without `WeightBiasQuantization`; "
            "as shipped: ModelOpt's own formula vs ONNX Runtime's default optimizations.",
            "",
        ]
        for row in report["accuracy"]:
            par = row["parity"]
            for name, side in (("exact", par), ("as shipped", {**par["as_shipped"], "confident_threshold": 0.3})):
                t, o = side["detections_torch"], side["detections_ort"]
                ct, co = side["confident_detections_torch"], side["confident_detections_ort"]
                lines.append(
                    f"- {row['label']}, {name} ({par['scenes']} val scenes): "
                    + ", ".join(
                        f"{k} {v['max_abs']:.3g} (|ref| {v['max_ref_abs']:.3g})" for k, v in side["outputs"].items()
                    )
                    + f"; score >= 0.05: torch {t} vs ORT {o} ({sum(a == b for a, b in zip(t, o))}/{len(t)} equal)"
                    + f"; score >= 0.3: torch {ct} vs ORT {co} ({sum(a == b for a, b in zip(ct, co))}/{len(ct)} equal)"
                )
            cpu = row["ort_cpu"]
            vs = cpu["vs_qdq"]
            lines.append(
                f"- {row['label']}, ORT CPU form vs the Q/DQ graph (both ONNX Runtime defaults): "
                + ", ".join(f"{k} {v:.3g}" for k, v in vs["max_abs"].items())
                + f"; score >= 0.05: {vs['detections_qdq']} vs {vs['detections_ort_cpu']}; score >= 0.3: "
                f"{vs['confident_detections_qdq']} vs {vs['confident_detections_ort_cpu']}; integer kernels "
                f"{cpu['integer_kernels']}, {cpu['float_compute_ops']} convs in FP32"
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
    parser.add_argument(
        "--quantize-residual-adds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one shared quantizer on both inputs of each residual Add (QuantizeConfig.quantize_residual_adds; "
        "default, as `altermoma quantize`)",
    )
    parser.add_argument(
        "--parity-layers",
        metavar="QUANTIZED_DIR",
        help="only: where a `quantize --onnx` folder's graph and its fake quant part, per quantizer "
        "(writes parity_layers.{md,json} into --out)",
    )
    parser.add_argument("--parity-scenes", type=int, default=8)
    args = parser.parse_args(argv)
    if args.parity_layers:
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.quant", *(argv if argv is not None else sys.argv[1:])])
        result = parity_layers(Path(args.parity_layers), args.parity_scenes, args.threads)
        result["command"] = command
        atomic_write_text(out / "parity_layers.json", json.dumps(result, indent=2))
        atomic_write_text(out / "parity_layers.md", parity_layers_markdown(result, command))
        print(parity_layers_markdown(result, command))
        return 0
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
        "quantize_residual_adds": args.quantize_residual_adds,
    }
    if not args.no_latency:
        with torch_threads(args.threads):
            graphs, details = latency_models(
                args.preset, args.target_gflops, args.method, args.calib_scenes, args.threads, work,
                args.quantize_residual_adds,
            )  # fmt: skip
            report["pruning"] = details
            report["latency"] = bench_latency(graphs, args.threads, args.warmup, args.runs, work)
    report["accuracy"] = []
    for spec in args.accuracy:
        label, _, checkpoint = spec.partition("=")
        report["accuracy"].append(
            accuracy(
                label, checkpoint, work, args.calib_scenes, args.val_scenes, args.threads, args.quantize_residual_adds
            )
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "quant.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "quant.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
