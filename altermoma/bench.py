"""Latency per stage and in total, across backends, for one or more models (e.g. unpruned vs pruned).

Rules (shared/DESIGN.md, "Measurement rules"): warm-up, then >= 50 timed runs (the CLI default);
median, p90, p99; batch size, precision, backend and threads recorded; speed-up efficiency =
measured speed-up / GFLOPs ratio against the first model (1.0 is ideal). Thread counts are always
explicit: torch.set_num_threads(threads) for PyTorch, intra_op_num_threads=threads, inter_op=1,
sequential execution for ONNX Runtime.

Backends: PyTorch eager CPU and ONNX Runtime CPU always; PyTorch CUDA eager, CUDA graphs (FP32 and FP16
autocast), ONNX Runtime CUDA and TensorRT (FP32, FP16) only where they exist. A backend that cannot
run is listed as "unavailable: <reason>" (or "failed: <error>") in every report, never dropped.
Per-stage numbers come from the CUDA-BEVFusion split (`BEVFusion.export_stages`): the PyTorch stage
wrappers and the split ONNX graphs, each run alone on the intermediate tensors of one real forward pass.

`altermoma bench` is defined here (`add_parser`) and registered by the CLI; `python -m altermoma.bench` (or
`python -m benchmarks.latency`) takes the same options.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from altermoma.flops import flops_table, split_stage_flops, stage_flops
from common.argtypes import non_negative_int, positive_int
from common.io import atomic_write, atomic_write_text
from export.onnx import (
    OrtPipeline,
    Stage,
    as_stages,
    export_onnx,
    export_split_details,
    graph_feeds,
    stage_tensors,
    torch_threads,
)
from export.runtime import latency_summary

CPU_BACKENDS = ("torch-cpu-fp32", "ort-cpu-fp32")
GPU_BACKENDS = (
    "torch-cuda-fp32",
    "torch-cuda-graph-fp32",
    "torch-cuda-graph-fp16-autocast",
    "ort-cuda-fp32",
    "tensorrt-fp32",
    "tensorrt-fp16",
)
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
# An INT8 checkpoint of `altermoma quantize --onnx`: its Q/DQ graphs as exported (TensorRT form) and in ONNX
# Runtime's CPU form (export.qdq_ort), both on ONNX Runtime CPU; compared with the baseline's ort-cpu-fp32.
INT8_BACKENDS = ("ort-cpu-int8", "ort-cpu-int8-ort-form")
SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"


def measure(fn: Callable[[], Any], warmup: int = 10, runs: int = 50) -> dict[str, Any]:
    """Call `fn` `warmup` times, then time `runs` calls (perf_counter; `fn` must synchronise a GPU itself).

    Returns median_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms, runs, warmup.
    """
    if warmup < 0 or runs < 1:
        raise ValueError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
    for _ in range(warmup):
        fn()
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        samples[i] = (time.perf_counter() - start) * 1e3
    summary = {f"{key}_ms": value for key, value in latency_summary(samples).items()}
    return {**summary, "runs": int(runs), "warmup": int(warmup)}


# ----------------------------------------------------------------------------------------------------------
# Environment and availability


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown")


def environment(threads: int, batch_size: int) -> dict[str, Any]:
    env = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "threads": int(threads),
        "batch_size": int(batch_size),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from export.runtime import import_tensorrt

        env["tensorrt"] = import_tensorrt().__version__
    except Exception:  # noqa: BLE001 - recorded as absent; availability() gives the reason
        env["tensorrt"] = None
    return env


def availability() -> dict[str, str]:
    """ "available" or "unavailable: <reason>" for every backend."""
    status = dict.fromkeys(CPU_BACKENDS, "available")
    if torch.cuda.is_available():
        cuda = "available"
    else:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        cuda = f"unavailable: torch {torch.__version__} ({build}) sees no CUDA device"
    for name in ("torch-cuda-fp32", "torch-cuda-graph-fp32", "torch-cuda-graph-fp16-autocast"):
        status[name] = cuda
    providers = ort.get_available_providers()
    status["ort-cuda-fp32"] = (
        "available"
        if "CUDAExecutionProvider" in providers and torch.cuda.is_available()
        else f"unavailable: onnxruntime {ort.__version__} providers are {providers}"
        + ("" if torch.cuda.is_available() else " and no CUDA device is visible")
    )
    try:
        from export.runtime import import_cudart, import_tensorrt

        import_tensorrt()
        import_cudart()
        trt = "available" if torch.cuda.is_available() else "unavailable: TensorRT is installed but no CUDA device"
    except Exception as error:  # noqa: BLE001 - TensorRTUnavailable, CudaUnavailable
        trt = f"unavailable: {str(error).splitlines()[0]}"
    status["tensorrt-fp32"] = status["tensorrt-fp16"] = trt
    return status


# ----------------------------------------------------------------------------------------------------------
# Backends. Each returns {"status": "ok", "total": measure, "stages": {stage: measure}, ...}.


def _numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy arrays by graph input name; nested inputs (a sparse encoder's rulebooks) by the export's names."""
    return graph_feeds(dict(tensors))


def bench_torch_cpu(
    model: nn.Module, stages: Sequence[Stage], tensors: Mapping[str, torch.Tensor], threads: int, warmup: int, runs: int
) -> dict[str, Any]:
    inputs = {k: tensors[k] for k in model.input_names}
    with torch_threads(threads), torch.inference_mode():
        result = {"status": "ok", "total": measure(lambda: model(**inputs), warmup, runs), "stages": {}}
        for stage in stages:
            result["stages"][stage.name] = measure(lambda stage=stage: stage(tensors), warmup, runs)
    result["timer"] = "perf_counter around the forward (torch.inference_mode)"
    return result


def bench_ort(
    single: Path,
    split: Mapping[str, Path],
    tensors: Mapping[str, torch.Tensor],
    threads: int,
    warmup: int,
    runs: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    arrays = _numpy(tensors)
    whole = OrtPipeline(single, threads, providers)
    chain = OrtPipeline(split, threads, providers)
    feeds = {k: arrays[k] for k in whole.input_names}
    result = {
        "status": "ok",
        "total": measure(lambda: whole(feeds), warmup, runs),
        "split_total": measure(lambda: chain(feeds), warmup, runs),
        "stages": {},
        "timer": "perf_counter around InferenceSession.run with numpy inputs and outputs"
        + (" (includes host<->device copies)" if "CUDAExecutionProvider" in providers else ""),
    }
    for name in chain.sessions:
        result["stages"][name] = measure(lambda name=name: chain.run_stage(name, arrays), warmup, runs)
    return result


def _cuda_graph(fn: Callable[[], Any], fp16: bool) -> Callable[[], None]:
    """Capture `fn` (static inputs captured by closure) into a CUDA graph; returns a synchronising replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        for _ in range(3):  # warm-up on a side stream before capture, as torch.cuda.graphs documents
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        fn()

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay


def bench_torch_cuda(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], mode: str, warmup: int, runs: int
) -> dict[str, Any]:
    """mode: "eager" (FP32), "graph" (FP32 CUDA graph), "graph-fp16" (CUDA graph under FP16 autocast)."""
    from fusion.models.stages import split_stages

    gpu_model = copy.deepcopy(model).cuda().eval()
    cuda_tensors = {k: v.cuda() for k, v in tensors.items()}
    stages = as_stages(split_stages(gpu_model, cuda_tensors))
    inputs = {k: cuda_tensors[k] for k in gpu_model.input_names}

    def timed(fn: Callable[[], Any]) -> dict[str, Any]:
        if mode == "eager":

            def call() -> None:
                fn()
                torch.cuda.synchronize()

            return measure(call, warmup, runs)
        return measure(_cuda_graph(fn, fp16=mode == "graph-fp16"), warmup, runs)

    try:
        with torch.inference_mode():
            result = {"status": "ok", "total": timed(lambda: gpu_model(**inputs)), "stages": {}}
            for stage in stages:
                result["stages"][stage.name] = timed(lambda stage=stage: stage(cuda_tensors))
        result["timer"] = "perf_counter around the call plus torch.cuda.synchronize()"
    finally:
        torch.cuda.empty_cache()
    return result


def bench_tensorrt(
    single: Path,
    split: Mapping[str, Path],
    tensors: Mapping[str, torch.Tensor],
    precision: str,
    workdir: Path,
    warmup: int,
    runs: int,
) -> dict[str, Any]:
    """Build an engine per graph (single + split stages) and time it with TensorRTRunner (CUDA events)."""
    from export.runtime import TensorRTRunner
    from export.tensorrt import EngineSpec, build_engine

    arrays = _numpy(tensors)
    workdir.mkdir(parents=True, exist_ok=True)

    def run(onnx_path: Path, tag: str) -> dict[str, Any]:
        engine = build_engine(EngineSpec(onnx_path, workdir / f"{tag}-{precision}.engine", precision=precision))
        with TensorRTRunner(engine) as runner:
            feeds = {name: arrays[name].astype(spec.dtype) for name, spec in runner.inputs.items()}
            timing = runner.time(feeds, warmup=warmup, runs=runs)
        ex = timing["execute_ms"]
        e2e = timing["end_to_end_ms"]
        return {
            "median_ms": ex["median"],
            "p90_ms": ex["p90"],
            "p99_ms": ex["p99"],
            "mean_ms": ex["mean"],
            "min_ms": ex["min"],
            "max_ms": ex["max"],
            "runs": runs,
            "warmup": warmup,
            "end_to_end_median_ms": e2e["median"],
            "timer": "CUDA events around execute_async_v3 (end_to_end adds H2D/D2H copies)",
        }

    result = {"status": "ok", "total": run(single, "model"), "stages": {}}
    for name, path in split.items():
        result["stages"][name] = run(path, name)
    return result


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def resolve_models(
    checkpoints: Sequence[str | os.PathLike] | None, preset: str | None
) -> list[tuple[str, nn.Module, str]]:
    """(label, model, source) for each checkpoint; without any, the shipped `<preset>-fusion` checkpoint,
    or a random-weight fusion model of `preset` (label says so) when none is shipped."""
    from fusion.checkpoint import load_checkpoint
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model

    models = []
    if checkpoints:
        for i, path in enumerate(checkpoints):
            if is_quantized_dir(path):  # the FP source model (for GFLOPs and stage inputs); latency from its graphs
                quantized_graphs(path)
                model, _ = load_checkpoint(Path(path) / "base", expect_preset=preset)
                label = f"{Path(path).name or path} (INT8)"
                models.append((label, model, f"quantized checkpoint {path} (its Q/DQ ONNX graphs)"))
                continue
            model, _ = load_checkpoint(path, expect_preset=preset)
            label = Path(path).name or str(path)
            if any(label == other for other, _, _ in models):
                label = f"{label}#{i}"
            models.append((label, model, f"checkpoint {path}"))
        return models
    preset = preset or "tiny"
    shipped = SHIPPED / f"{preset}-fusion"
    if (shipped / "checkpoint.json").is_file():
        model, _ = load_checkpoint(shipped, expect_preset=preset)
        return [(shipped.name, model, f"shipped checkpoint {shipped}")]
    torch.manual_seed(0)
    model = build_model(get_config(preset), "fusion").eval()
    return [(f"{preset}-fusion (random weights)", model, f"random weights: no shipped checkpoint at {shipped}")]


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """An `altermoma quantize` output folder (INT8 Q/DQ)."""
    return (Path(path) / "quantized.json").is_file()


def quantized_graphs(path: str | os.PathLike) -> tuple[Path, dict[str, Path]]:
    """The single Q/DQ graph and the split stage graphs of a quantized checkpoint (`quantize --onnx`)."""
    path = Path(path)
    single, split = path / "model.onnx", sorted((path / "split").glob("*.onnx"))
    if not single.is_file() or not split:
        raise ValueError(f"quantized checkpoint {path} has no ONNX graphs: run altermoma quantize with --onnx")
    return single, {p.stem: p for p in split}


def bench_quantized(
    label: str,
    model: nn.Module,
    source: str,
    directory: Path,
    workdir: Path,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
) -> dict[str, Any]:
    """An INT8 checkpoint: GFLOPs of its floating-point source, latency of its exported Q/DQ graphs (whole and
    per split stage) on ONNX Runtime CPU, as exported and in ONNX Runtime's CPU form, with the FP32 harness."""
    import onnx

    from export.qdq_ort import to_ort_cpu_form
    from fusion.models.bevfusion import current_pool_method, example_inputs
    from fusion.models.stages import split_stages

    model.eval()
    inputs = example_inputs(model.config, 1, model.modality)
    stages = as_stages(split_stages(model, inputs))
    single, found = quantized_graphs(directory)
    if set(found) != {stage.name for stage in stages}:
        raise ValueError(
            f"{directory}/split holds {sorted(found)}, the model's split stages are {[s.name for s in stages]}"
        )
    split = {stage.name: found[stage.name] for stage in stages}  # run order
    form = workdir / "ort_cpu"
    (form / "split").mkdir(parents=True, exist_ok=True)
    form_single = form / "model.onnx"
    onnx.save(to_ort_cpu_form(onnx.load(str(single)))[0], str(form_single))
    form_split = {}
    for name, path in split.items():
        form_split[name] = form / "split" / path.name
        onnx.save(to_ort_cpu_form(onnx.load(str(path)))[0], str(form_split[name]))
    with torch_threads(threads):
        flops = stage_flops(model, inputs, device="meta")
        split_flops = split_stage_flops(model, inputs, device="meta")
        tensors = stage_tensors(stages, inputs)  # stage inputs of the right shapes
        latency: dict[str, Any] = dict.fromkeys(
            BACKENDS, {"status": "not run: an INT8 checkpoint runs on ort-cpu-int8"}
        )
        latency["ort-cpu-int8"] = _try(lambda: bench_ort(single, split, tensors, threads, warmup, runs))
        latency["ort-cpu-int8-ort-form"] = _try(
            lambda: bench_ort(form_single, form_split, tensors, threads, warmup, runs)
        )
    return {
        "label": label,
        "source": source,
        "preset": model.config.preset,
        "modality": model.modality,
        "pool_method": current_pool_method(model),
        "params": flops["total"]["params"],
        "gflops": flops["total"]["gflops"],
        "flops": flops,
        "split_flops": split_flops,
        "onnx": {"model": {"path": str(single)}, **{n: {"path": str(p)} for n, p in split.items()}},
        "latency": latency,
    }


def _try(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a backend failure is reported, never hidden or fatal
        return {"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


def bench_model(
    label: str,
    model: nn.Module,
    source: str,
    workdir: Path,
    status: Mapping[str, str],
    threads: int = 1,
    batch_size: int = 1,
    warmup: int = 10,
    runs: int = 50,
    pool_method: str | None = None,
) -> dict[str, Any]:
    """GFLOPs, params, exports and latency on every backend for one model."""
    from fusion.models.bevfusion import current_pool_method, example_inputs, pool_method_as
    from fusion.models.stages import split_stages

    model.eval()
    inputs = example_inputs(model.config, batch_size, model.modality)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "split").mkdir(exist_ok=True)
    with pool_method_as(model, pool_method), torch_threads(threads):
        method = current_pool_method(model)
        flops = stage_flops(model, inputs, device="meta")
        split_flops = split_stage_flops(model, inputs, device="meta")
        stages = as_stages(split_stages(model, inputs))
        single = export_onnx(model, inputs, workdir / "model.onnx", check=False, threads=threads)
        split = export_split_details(stages, inputs, workdir / "split", check=False, threads=threads)
        tensors = stage_tensors(stages, inputs)
        single_path = Path(single["path"])
        split_paths = {name: Path(d["path"]) for name, d in split.items()}
        latency: dict[str, Any] = {}
        for backend in BACKENDS:
            if status[backend] != "available":
                latency[backend] = {"status": status[backend]}
            elif backend == "torch-cpu-fp32":
                latency[backend] = _try(lambda: bench_torch_cpu(model, stages, tensors, threads, warmup, runs))
            elif backend == "ort-cpu-fp32":
                latency[backend] = _try(lambda: bench_ort(single_path, split_paths, tensors, threads, warmup, runs))
            elif backend.startswith("torch-cuda"):
                mode = {"torch-cuda-fp32": "eager", "torch-cuda-graph-fp32": "graph"}.get(backend, "graph-fp16")
                latency[backend] = _try(lambda mode=mode: bench_torch_cuda(model, tensors, mode, warmup, runs))
            elif backend == "ort-cuda-fp32":
                latency[backend] = _try(
                    lambda: bench_ort(
                        single_path,
                        split_paths,
                        tensors,
                        threads,
                        warmup,
                        runs,
                        ("CUDAExecutionProvider", "CPUExecutionProvider"),
                    )
                )
            elif backend.startswith("tensorrt"):
                precision = backend.split("-")[1]
                latency[backend] = _try(
                    lambda precision=precision: bench_tensorrt(
                        single_path, split_paths, tensors, precision, workdir / "engines", warmup, runs
                    )
                )
    return {
        "label": label,
        "source": source,
        "preset": model.config.preset,
        "modality": model.modality,
        "pool_method": method,
        "params": flops["total"]["params"],
        "gflops": flops["total"]["gflops"],
        "flops": flops,
        "split_flops": split_flops,
        "onnx": {
            "model": {k: single[k] for k in ("path", "size_bytes", "nodes", "readiness_errors")},
            **{n: {k: d[k] for k in ("path", "size_bytes", "nodes", "readiness_errors")} for n, d in split.items()},
        },
        "latency": latency,
    }


def compare(models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Speed-up and speed-up efficiency of every model against the first, per backend with a total latency."""
    if not models:
        return []
    base = models[0]
    rows = []
    for backend in BACKENDS + INT8_BACKENDS:
        base_lat = base["latency"].get("ort-cpu-fp32" if backend in INT8_BACKENDS else backend, {})
        if base_lat.get("status") != "ok":
            continue
        for m in models:
            lat = m["latency"].get(backend, {})
            if lat.get("status") != "ok":
                continue
            speedup = base_lat["total"]["median_ms"] / lat["total"]["median_ms"]
            ratio = base["gflops"] / m["gflops"]
            rows.append(
                {
                    "model": m["label"],
                    "backend": backend,
                    "median_ms": lat["total"]["median_ms"],
                    "gflops": m["gflops"],
                    "speedup": speedup,
                    "gflops_ratio": ratio,
                    "efficiency": speedup / ratio,
                }
            )
    return rows


def bench(
    checkpoints: Sequence[str | os.PathLike] | None = None,
    preset: str | None = None,
    threads: int = 1,
    out_dir: str | os.PathLike = "reports/bench",
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 1,
    pool_method: str | None = None,
) -> dict[str, Any]:
    """Benchmark each model (the first is the unpruned baseline) and write bench.{md,json} and
    latency_vs_gflops.png into `out_dir` (the ONNX files go to `out_dir/onnx/`)."""
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if int(runs) < 1 or int(warmup) < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if checkpoints and any(is_quantized_dir(c) for c in checkpoints) and (batch_size != 1 or pool_method):
        raise ValueError(
            "an INT8 checkpoint is timed as exported (batch 1, its pooling): no --batch-size/--pool-method"
        )
    models = resolve_models(checkpoints, preset)  # checkpoint errors before any output is created
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status = availability()
    results = []
    for i, (label, model, source) in enumerate(models):
        workdir = out_dir / "onnx" / f"{i}-{_slug(label)}"
        if checkpoints and is_quantized_dir(checkpoints[i]):
            results.append(bench_quantized(label, model, source, Path(checkpoints[i]), workdir, threads, warmup, runs))
            continue
        results.append(
            bench_model(label, model, source, workdir, status, threads, batch_size, warmup, runs, pool_method)
        )
    report = {
        "environment": environment(threads, batch_size),
        "settings": {
            "threads": int(threads),
            "batch_size": int(batch_size),
            "warmup": int(warmup),
            "runs": int(runs),
            "precision": "fp32 unless the backend name says fp16",
            "inputs": "random tensors of the deployed static shapes (example_inputs, seed 0)",
        },
        "backends": status,
        "models": results,
        "comparison": compare(results),
    }
    atomic_write_text(out_dir / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "bench.md", bench_markdown(report))
    plot_latency_vs_gflops(report, out_dir / "latency_vs_gflops.png")
    return report


# ----------------------------------------------------------------------------------------------------------
# Reports


def bench_markdown(report: Mapping[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# Latency benchmark",
        "",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, load average {env['load_average_1_5_15']} "
        "at the end of the run)",
        f"- GPU: {env['gpu'] or 'none'}; TensorRT: {env['tensorrt'] or 'not installed'}",
        f"- torch {env['torch']}, onnxruntime {env['onnxruntime']}, Python {env['python']}",
        f"- threads {settings['threads']} (torch.set_num_threads; ORT intra_op_num_threads, inter_op 1, sequential), "
        f"batch {settings['batch_size']}, warm-up {settings['warmup']}, timed runs {settings['runs']}, "
        f"precision: {settings['precision']}",
        f"- inputs: {settings['inputs']}",
        "",
        "## Backends",
        "",
    ]
    lines += [f"- {name}: {state}" for name, state in report["backends"].items()]
    for m in report["models"]:
        lines += [
            "",
            f"## {m['label']}",
            "",
            f"{m['source']}; preset `{m['preset']}`, {m['modality']}, BEV pooling `{m['pool_method']}`, "
            f"{m['params'] / 1e6:.3f} M params, {m['gflops']:.3f} GFLOPs",
            "",
        ]
        lines += ["GFLOPs and parameters per stage (FlopCounterMode module breakdown):", ""]
        lines += [flops_table(m["flops"]), ""]
        ok = [b for b, lat in m["latency"].items() if lat.get("status") == "ok"]
        lines += [
            "Latency per CUDA-BEVFusion split stage (median / p90 / p99 ms; each stage run alone on the "
            "intermediate tensors of one forward pass; GFLOPs counted per split stage):",
            "",
            "| split stage | GFLOPs | params (M) | " + " | ".join(ok) + " |",
            "| --- | ---: | ---: |" + " ---: |" * len(ok),
        ]
        for stage, f in m["split_flops"].items():
            if stage == "total":
                continue
            cells = [_fmt(m["latency"][b]["stages"][stage]) if stage in m["latency"][b]["stages"] else "-" for b in ok]
            lines.append(f"| {stage} | {f['gflops']:.3f} | {f['params'] / 1e6:.3f} | " + " | ".join(cells) + " |")
        total = m["split_flops"]["total"]
        lines.append(
            f"| **whole model** | {total['gflops']:.3f} | {total['params'] / 1e6:.3f} | "
            + " | ".join(_fmt(m["latency"][b]["total"]) for b in ok)
            + " |"
        )
        chained = ["split graphs chained" if "split_total" in m["latency"][b] else "-" for b in ok]
        if any(c != "-" for c in chained):
            cells = [_fmt(m["latency"][b]["split_total"]) if "split_total" in m["latency"][b] else "-" for b in ok]
            lines.append("| split graphs chained | | | " + " | ".join(cells) + " |")
        failed = {b: lat["status"] for b, lat in m["latency"].items() if lat.get("status", "").startswith("failed")}
        lines += [f"- {b}: {state}" for b, state in failed.items()]
    if report["comparison"]:
        lines += [
            "",
            "## Speed-up against the first model",
            "",
            "| model | backend | median ms | GFLOPs | speed-up | GFLOPs ratio | efficiency |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in report["comparison"]:
            lines.append(
                f"| {r['model']} | {r['backend']} | {r['median_ms']:.2f} | {r['gflops']:.3f} | {r['speedup']:.2f}x "
                f"| {r['gflops_ratio']:.2f}x | {r['efficiency']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(t: Mapping[str, float]) -> str:
    return f"{t['median_ms']:.2f} / {t['p90_ms']:.2f} / {t['p99_ms']:.2f}"


def plot_latency_vs_gflops(report: Mapping[str, Any], path: Path) -> None:
    """Median total latency against GFLOPs, one series per backend that ran, points labelled by model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    plotted = False
    for backend in BACKENDS + INT8_BACKENDS:
        points = [
            (m["gflops"], m["latency"][backend]["total"]["median_ms"], m["label"])
            for m in report["models"]
            if m["latency"].get(backend, {}).get("status") == "ok"
        ]
        if not points:
            continue
        plotted = True
        xs, ys, labels = zip(*points)
        ax.plot(xs, ys, marker="o", label=backend)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not plotted:
        ax.text(0.5, 0.5, "no backend produced a latency", ha="center", va="center", transform=ax.transAxes)
    env = report["environment"]
    ax.set_xlabel("GFLOPs (FlopCounterMode, 2 x MACs)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"batch {env['batch_size']}, {env['threads']} thread(s): {env['cpu'][:48]}", fontsize=8)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="checkpoint directory, repeatable; the first is the baseline (default: the shipped "
        "fusion/weights/<preset>-fusion, else a random-weight model of --preset, labelled as such); an "
        "`altermoma quantize --onnx` folder is timed as INT8 on ONNX Runtime CPU (ort-cpu-int8, and "
        "ort-cpu-int8-ort-form for its ONNX Runtime CPU form) against the baseline's ort-cpu-fp32",
    )
    parser.add_argument("--preset", help="preset of the default model (tiny); with --checkpoint, refuse other presets")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--runs", type=positive_int, default=50, help="timed runs (default 50)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="warm-up runs (default 10)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--pool-method", choices=("scatter", "cumsum"), help="BEV pooling form (default: the config's)")
    parser.add_argument("--out", default="reports/bench", help="output directory (default reports/bench)")


def run_from_args(args: argparse.Namespace) -> None:
    """Run `bench` with parsed arguments and print one line per model."""
    report = bench(
        args.checkpoint or None,
        preset=args.preset,
        threads=args.threads,
        out_dir=args.out,
        runs=args.runs,
        warmup=args.warmup,
        batch_size=args.batch_size,
        pool_method=args.pool_method,
    )
    for model in report["models"]:
        parts = [f"{model['label']}: {model['gflops']:.2f} GFLOPs, {model['params'] / 1e6:.2f} M params"]
        for backend, lat in model["latency"].items():
            if lat.get("status") == "ok":
                parts.append(f"{backend} {lat['total']['median_ms']:.2f} ms")
        print("; ".join(parts))
    for row in report["comparison"]:
        if row["model"] != report["models"][0]["label"]:
            print(
                f"  {row['model']} on {row['backend']}: speed-up {row['speedup']:.2f}x for "
                f"{row['gflops_ratio']:.2f}x fewer GFLOPs (efficiency {row['efficiency']:.2f})"
            )
    skipped = sorted({state for state in report["backends"].values() if state != "available"})
    for state in skipped:
        print(f"  {state}")
    print(f"report: {args.out}/bench.md")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `altermoma bench` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="GFLOPs and latency per stage and backend; speed-up against the first model")
    add_arguments(p)
    p.set_defaults(run=run_from_args)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m altermoma.bench ...`: the same options as `altermoma bench`."""
    parser = argparse.ArgumentParser(prog="python -m altermoma.bench")
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
