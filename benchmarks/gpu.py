"""First GPU figures in one command, for the few minutes a GPU machine is lent (docs/gpu.md).

    PYTHONPATH=gpu-bundle python -m benchmarks.gpu --out runs/gpu               # on the GPU, <= 8 minutes
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu-check          # the same code paths on CPU

Sections, each independent (a failure is recorded as "failed: <error>" and the others go on), in this order:

- environment: GPU, driver, torch/CUDA/cuDNN versions, thread counts, TF32 flags;
- cuda-python: the buffer code of `export.runtime` (DeviceBuffer round trip and copy times), only where
  cuda-python imports ("not importable: <reason>" otherwise);
- latency-<preset>: batch 1, random weights (latency depends on widths, not values), the unpruned model
  and a copy pruned to -50% GFLOPs by magnitude through `altermoma.prune` (data-free scores; pruning runs
  on the CPU); per CUDA-BEVFusion split stage and in total, with `altermoma.bench`'s own timers: eager FP32
  and CUDA graphs FP16 are its `bench_torch_cuda` modes, eager FP16 is its eager mode under
  `torch.autocast` (the autocast the graph mode uses); speed-up and efficiency (speed-up / GFLOPs ratio)
  per stage;
- altereva: AlterEva scoring time and peak GPU memory (`torch.cuda.max_memory_allocated`) on `r50`,
  scoring set of the project's default size (4 batches of 2 scenes), B = 8, against one forward/backward;
- latency-table: a `torch-cuda` latency table built by `altermoma.latency_table.build_table` on `small`,
  then a latency-targeted prune (50% of the predicted latency) predicted against measured.

A time budget (`--budget-s`, default 480) is checked before each section: one that would not fit is
skipped with the reason in the report. The report (gpu.json, gpu.md) is rewritten after every section,
so a run cut short still leaves what it measured. `--device cpu` runs the same sections on the CPU
(torch-cpu timers, a torch-cpu table); what only CUDA has (FP16 autocast timings, CUDA graphs, GPU memory,
cuda-python buffers) is reported as unavailable with the reason. `--quick` shrinks everything (a
tiny model, a few runs) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.argtypes import Parser, positive_float, positive_int
from common.io import OutputError, atomic_write_text, check_writable_folder

REPORT_KIND = "gpu-figures"
# The GPU-only latency modes: (mode, altermoma.bench's cuda mode, autocast around it).
CUDA_MODES = {
    "eager-fp32": ("eager", False),
    "eager-fp16-autocast": ("eager", True),
    "graph-fp16-autocast": ("graph-fp16", False),  # bench's graph mode captures under FP16 autocast itself
}
MODES = tuple(CUDA_MODES)
# Quick runs shrink the tiny preset further: the CPU check must take seconds, not minutes.
QUICK_OVERRIDES = {
    "grid.cell": 3.2,
    "rig.num_cameras": 2,
    "rig.image_height": 32,
    "rig.image_width": 64,
    "lidar.num_beams": 8,
    "lidar.azimuth_steps": 128,
    "lidar.max_pillars": 128,
    "lidar.max_points_per_pillar": 8,
    "model.depth_bins": [1.0, 33.0, 4.0],
    "model.decoder_layers": [1, 1],
    "model.lidar_blocks": 1,
}


@dataclass(frozen=True)
class Plan:
    """The sizes of one run. `needs_s`: about how long each section takes on the GPU machine (the budget
    skips a section with less time left than that)."""

    presets: tuple[str, ...]
    overrides: Mapping[str, Any]
    warmup: int
    runs: int
    method: str
    target_gflops: float
    table_preset: str
    table_grid_points: int
    table_runs: int
    table_warmup: int
    table_check_points: int
    table_end_to_end_runs: int
    table_rest_terms: bool
    target_latency: float
    altereva_preset: str
    scoring_batches: int
    scoring_batch_size: int
    reactivation_steps: int
    needs_s: Mapping[str, float] = field(default_factory=dict)


def full_plan() -> Plan:
    """What the GPU run measures: medians over 100 runs after 20 warm-up runs, the paper-sized scoring set."""
    from compress.altereva import AlterEvaConfig
    from compress.request import PruneRequest

    request = PruneRequest()
    return Plan(
        presets=default_presets(),
        overrides={},
        warmup=20,
        runs=100,
        method="magnitude",
        target_gflops=0.5,
        table_preset="small",
        table_grid_points=8,
        table_runs=10,
        table_warmup=3,
        table_check_points=8,
        table_end_to_end_runs=50,
        table_rest_terms=True,
        target_latency=0.5,
        altereva_preset="r50",
        scoring_batches=request.scoring_batches,
        scoring_batch_size=request.scoring_batch_size,
        reactivation_steps=AlterEvaConfig().reactivation_steps,
        needs_s={
            "cuda-python": 5,
            "latency-small": 45,
            "latency-r50": 150,
            "latency": 150,
            "altereva": 60,
            "latency-table": 150,
        },
    )


def quick_plan() -> Plan:
    """A check of every code path in seconds: a shrunken tiny model, 1 warm-up and 2 timed runs."""
    return Plan(
        presets=("tiny",),
        overrides=dict(QUICK_OVERRIDES),
        warmup=1,
        runs=2,
        method="magnitude",
        target_gflops=0.5,
        table_preset="tiny",
        table_grid_points=2,
        table_runs=3,
        table_warmup=1,
        table_check_points=2,
        table_end_to_end_runs=3,
        table_rest_terms=False,
        target_latency=0.5,
        altereva_preset="tiny",
        scoring_batches=1,
        scoring_batch_size=2,
        reactivation_steps=1,
        needs_s={"cuda-python": 1, "latency": 2, "altereva": 2, "latency-table": 2},
    )


def default_presets() -> tuple[str, ...]:
    """small and r50, plus the deployed-BEVFusion presets once fusion/config.py has them."""
    from fusion.config import PRESETS

    return ("small", "r50", *(p for p in ("bevfusion-r50", "bevfusion-swint") if p in PRESETS))


# ----------------------------------------------------------------------------------------------------------
# Budget and sections


class Budget:
    """Seconds left of `--budget-s`; a section starts only if about as much time as it needs is left."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def refusal(self, needs: float) -> str | None:
        """None if a part needing `needs` seconds fits, else why it is skipped."""
        left = self.left()
        if left >= needs:
            return None
        return (
            f"skipped: time budget: {max(left, 0.0):.1f} s of --budget-s {self.seconds:g} left, "
            f"this part needs about {needs:g} s"
        )


class BudgetExceeded(BaseException):
    """Raised in the running section when the budget runs out. A BaseException, so that no `except
    Exception` on the way (a backend's own failure handler) records it as that part's failure and goes on."""


@contextmanager
def hard_stop(budget: Budget) -> Iterator[None]:
    """Interrupt the block when the budget runs out (SIGALRM; main thread on POSIX only, else no-op): the
    budget is a promise to whoever lent the machine, not an estimate."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise BudgetExceeded(f"stopped: the time budget (--budget-s {budget.seconds:g}) ran out during this section")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(budget.left(), 0.001), 5.0)  # and again every 5 s, should one be lost
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def failure(error: BaseException) -> str:
    """'failed: <type>: <first line>' for the report."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"failed: {type(error).__name__}: {text}"


def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn()'s result (status "ok" unless it says otherwise), or {"status": "failed: ..."}: a failure is
    recorded, never fatal to the other sections."""
    try:
        result = fn()
    except Exception as error:  # noqa: BLE001 - recorded in the report, the run goes on
        cause: BaseException | None = error
        while cause is not None:  # an error raised while unwinding from the budget's stop is still the stop
            if isinstance(cause, BudgetExceeded):
                raise BudgetExceeded(str(cause)) from None
            cause = cause.__context__
        return {"status": failure(error)}
    result.setdefault("status", "ok")
    return result


def free_memory() -> None:
    """Drop what a section left behind, so the next one (and its peak-memory figure) starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(text: str, budget: Budget | None = None) -> None:
    stamp = f"[{budget.elapsed():6.1f} s] " if budget is not None else ""
    print(f"{stamp}{text}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Environment


def driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi, or why it is unknown."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown: nvidia-smi not found"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown: {failure(error)}"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown: nvidia-smi printed nothing"


def cuda_python_version() -> str:
    """The installed cuda-python (cuda-bindings) version, or "not importable: <reason>"."""
    from export.runtime import CudaUnavailable, import_cudart

    try:
        import_cudart()
    except CudaUnavailable as error:
        return f"not importable: {str(error).splitlines()[0]}"
    from importlib import metadata

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "importable (version unknown)"


def environment_section(device: str, threads: int) -> dict[str, Any]:
    """Versions, devices and thread counts: `altermoma.bench.environment` plus what a GPU report needs."""
    import onnx

    from altermoma.bench import environment

    env = environment(threads, 1)
    env.update(
        device=device,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        numpy=np.__version__,
        onnx=onnx.__version__,
        cuda_python=cuda_python_version(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            driver=driver_version(),
            gpu_count=torch.cuda.device_count(),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            gpu_multiprocessors=props.multi_processor_count,
        )
    else:
        env.update(driver="unavailable: --device cpu", gpu_count=torch.cuda.device_count())
    return env


# ----------------------------------------------------------------------------------------------------------
# Models


def reference_model(preset: str, overrides: Mapping[str, Any]) -> nn.Module:
    """A seeded random-weight fusion model of the preset, in eval mode, on the CPU."""
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model

    torch.manual_seed(0)
    return build_model(get_config(preset, dict(overrides))).eval()


def pruned_copy(
    model: nn.Module, plan: Plan, threads: int, target: Mapping[str, float], **options: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy pruned by `plan.method` through `altermoma.prune` to `target` (target_gflops=... or
    target_latency=...; `options` such as the latency table), on the CPU; and the pruning's figures."""
    import altermoma
    from fusion.task import first_sample, reference_task, scoring_set

    pruned = copy.deepcopy(model)
    batches = scoring_set(model.config, 1, 1)
    start = time.perf_counter()
    report = altermoma.prune(
        pruned,
        reference_task(pruned),
        batches,
        method=plan.method,
        example_batch=first_sample(batches[0]),
        progress=False,
        **target,
        **options,
    )
    info = {
        "method": plan.method,
        "target": dict(target),
        "gflops_before": report["gflops_before"],
        "gflops_after": report["gflops_after"],
        "gflops_reduction": report["gflops_reduction"],
        "seconds": time.perf_counter() - start,
        "where": f"CPU, {threads} torch thread(s)",
    }
    if "latency" in report:
        info["latency"] = {k: v for k, v in report["latency"].items() if k.startswith(("predicted", "table_"))}
    return pruned.eval(), info


# ----------------------------------------------------------------------------------------------------------
# Latency per stage


def stage_inputs(model: nn.Module, device: str) -> tuple[list, dict[str, torch.Tensor]]:
    """The split stages and every stage's input tensors from one forward pass on `device` (batch 1)."""
    from export.onnx import as_stages, stage_tensors
    from fusion.models.bevfusion import example_inputs
    from fusion.models.stages import split_stages

    inputs = {k: v.to(device) for k, v in example_inputs(model.config, 1, model.modality).items()}
    runner = model if device == "cpu" else copy.deepcopy(model).to(device).eval()
    with torch.no_grad():
        stages = as_stages(split_stages(runner, inputs))
        tensors = stage_tensors(stages, inputs)
    return stages, tensors


def time_mode(
    mode: str,
    model: nn.Module,
    stages: list,
    tensors: Mapping[str, torch.Tensor],
    device: str,
    plan: Plan,
    threads: int,
) -> dict[str, Any]:
    """One latency mode with altermoma.bench's timers; on the CPU, eager FP32 only (the rest is CUDA's)."""
    from altermoma.bench import availability, bench_torch_cpu, bench_torch_cuda

    if device == "cpu":
        if mode == "eager-fp32":
            return {
                "backend": "torch-cpu-fp32",
                **bench_torch_cpu(model, stages, tensors, threads, plan.warmup, plan.runs),
            }
        if mode == "graph-fp16-autocast":
            return {"status": availability()["torch-cuda-graph-fp16-autocast"]}
        return {"status": "unavailable: FP16 autocast is timed on CUDA only (on the CPU it runs reference kernels "
                "about 25x slower than FP32, a figure of no use)"}  # fmt: skip
    bench_mode, autocast = CUDA_MODES[mode]
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        result = bench_torch_cuda(model, tensors, bench_mode, plan.warmup, plan.runs)
    return {"backend": f"torch-cuda ({mode})", **result}


def measure_model(label: str, model: nn.Module, device: str, plan: Plan, threads: int) -> dict[str, Any]:
    """GFLOPs per split stage (meta device) and every latency mode of one model."""
    from altermoma.flops import split_stage_flops, stage_flops
    from fusion.models.bevfusion import example_inputs

    inputs = example_inputs(model.config, 1, model.modality)
    flops = stage_flops(model, inputs, device="meta")
    split = split_stage_flops(model, inputs, device="meta")
    stages, tensors = stage_inputs(model, device)
    latency = {}
    for mode in MODES:
        latency[mode] = attempt(lambda mode=mode: time_mode(mode, model, stages, tensors, device, plan, threads))
    stages = tensors = None  # the device copies of the stage inputs go before the next model's
    free_memory()
    return {
        "label": label,
        "gflops": flops["total"]["gflops"],
        "params": flops["total"]["params"],
        "split_flops": {k: {"gflops": v["gflops"], "params": v["params"]} for k, v in split.items()},
        "latency": latency,
    }


def speedups(base: Mapping[str, Any], other: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per mode and split stage (and in total): median ms of both, speed-up, GFLOPs ratio and efficiency
    (speed-up / GFLOPs ratio; None where the stage has no GFLOPs to compare)."""
    rows = []
    for mode in MODES:
        a, b = base["latency"].get(mode, {}), other["latency"].get(mode, {})
        if a.get("status") != "ok" or b.get("status") != "ok":
            continue
        for stage in [*a["stages"], "total"]:
            ta = a["total"] if stage == "total" else a["stages"].get(stage)
            tb = b["total"] if stage == "total" else b["stages"].get(stage)
            if ta is None or tb is None:
                continue
            ga, gb = base["split_flops"][stage]["gflops"], other["split_flops"][stage]["gflops"]
            speedup = ta["median_ms"] / tb["median_ms"]
            ratio = ga / gb if gb > 0 else None
            rows.append(
                {"mode": mode, "stage": stage, "base_ms": ta["median_ms"], "pruned_ms": tb["median_ms"],
                 "base_gflops": ga, "pruned_gflops": gb, "speedup": speedup, "gflops_ratio": ratio,
                 "efficiency": speedup / ratio if ratio else None}
            )  # fmt: skip
    return rows


def latency_section(preset: str, device: str, plan: Plan, threads: int) -> dict[str, Any]:
    """Unpruned and -50% GFLOPs (magnitude) models of one preset, every mode, per stage."""
    base = reference_model(preset, plan.overrides)
    pruned, pruning = pruned_copy(base, plan, threads, {"target_gflops": plan.target_gflops})
    models = [
        measure_model("unpruned", base, device, plan, threads),
        measure_model(f"{plan.method} -{plan.target_gflops:.0%} GFLOPs", pruned, device, plan, threads),
    ]
    return {
        "preset": preset,
        "overrides": dict(plan.overrides),
        "weights": "random (seed 0): latency depends on widths, not on weight values",
        "batch_size": 1,
        "warmup": plan.warmup,
        "runs": plan.runs,
        "pruning": pruning,
        "models": models,
        "speedups": speedups(models[0], models[1]),
    }


# ----------------------------------------------------------------------------------------------------------
# AlterEva scoring cost


def altereva_section(device: str, plan: Plan) -> dict[str, Any]:
    """One forward/backward at the scoring batch size, then AlterEva's saliencies on the scoring set:
    seconds and peak GPU memory of each (`torch.cuda.max_memory_allocated`, reset before each)."""
    from altermoma.bench import measure
    from common.ddp import to_device
    from compress.altereva import AlterEvaConfig, altereva_saliency
    from fusion.task import reference_task, scoring_set

    model = reference_model(plan.altereva_preset, plan.overrides).to(device)
    data = [
        to_device(b, torch.device(device))
        for b in scoring_set(model.config, plan.scoring_batches, plan.scoring_batch_size)
    ]
    task = reference_task(model)
    settings = AlterEvaConfig(reactivation_steps=plan.reactivation_steps)
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def forward_backward() -> None:
        task.loss_of(task.forward(model, data[0]), data[0]).backward()
        model.zero_grad(set_to_none=True)
        sync()

    def scoring() -> None:
        altereva_saliency(model, task, data, settings, progress=False)
        sync()

    forward_backward()  # warm-up: cuDNN initialisation and the allocator's first blocks are not the method's cost
    rows = {}
    for kind, work, runs in (("forward_backward", forward_backward, 3), ("altereva", scoring, 1)):
        if cuda:
            free_memory()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        timing = measure(work, warmup=0, runs=runs)
        row = {"seconds": timing["median_ms"] / 1e3, "runs": runs}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_gpu_mib=peak / 2**20, peak_gpu_above_setup_mib=(peak - held) / 2**20)
        else:
            row["peak_gpu_mib"] = "unavailable: --device cpu"
        rows[kind] = row
    rows["altereva"]["x_forward_backward"] = rows["altereva"]["seconds"] / rows["forward_backward"]["seconds"]
    return {
        "preset": plan.altereva_preset,
        "overrides": dict(plan.overrides),
        "scoring_set": f"{plan.scoring_batches} batches of {plan.scoring_batch_size} scenes (synthetic, seed 0)",
        "settings": asdict(settings),
        "held_before_mib": (torch.cuda.memory_allocated() / 2**20) if cuda else None,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------
# Latency table and a latency-targeted prune


def table_section(device: str, plan: Plan, threads: int, out: Path) -> dict[str, Any]:
    """Build the per-layer table on this device's torch backend (`altermoma.latency_table.build_table`), save
    it, then prune to `target_latency` of its predicted latency and measure both models."""
    from altermoma.latency_table import Subject, build_table
    from compress.latency import save_table
    from fusion.task import first_sample, reference_task, scoring_set

    backend = "torch-cuda" if device == "cuda" else "torch-cpu"
    base = reference_model(plan.table_preset, plan.overrides)
    example = first_sample(scoring_set(base.config, 1, 1)[0])
    subject = Subject(base, reference_task(base), example, f"random weights of {plan.table_preset} (seed 0)",
                      plan.table_preset)  # fmt: skip
    start = time.perf_counter()
    table = build_table(
        subject,
        backend,
        threads=threads,
        grid_points=plan.table_grid_points,
        runs=plan.table_runs,
        warmup=plan.table_warmup,
        check_points=plan.table_check_points,
        end_to_end_runs=plan.table_end_to_end_runs,
        rest_terms=plan.table_rest_terms,
    )
    build_seconds = time.perf_counter() - start
    path = save_table(table, out / f"latency-table-{plan.table_preset}-{backend}.json")
    return {
        "backend": backend,
        "preset": plan.table_preset,
        "overrides": dict(plan.overrides),
        "build_seconds": build_seconds,
        "table": table_summary(table.to_dict(), path),
        "targeted": attempt(lambda: targeted_prune(subject, table, backend, plan, threads)),
    }


def table_summary(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """What the report shows of a table (the whole table is in `path`)."""
    layers = data.get("layers", {})
    check = data.get("checks", {}).get("interpolation", {})
    quality = data.get("quality") or {}
    return {
        "path": path.name,
        "layers": len(layers),
        "end_to_end_ms": data["end_to_end_ms"],
        "rest_ms": data["rest_ms"],
        "layers_full_ms": data["end_to_end_ms"] - data["rest_ms"],
        "distinct_points_timed": data.get("settings", {}).get("distinct_points_timed"),
        "interpolation_points": len(check.get("points", [])),
        "interpolation_mean_abs_error": check.get("mean_abs_relative_error"),
        "interpolation_max_abs_error": check.get("max_abs_relative_error"),
        "rest_terms_measured": len(data.get("rest_terms") or {}),
        "rest_terms_used": sorted(r for r, t in (data.get("rest_terms") or {}).items() if t.get("used")),
        "verdict": quality.get("verdict", "unverified"),
        "verdict_reasons": quality.get("reasons", []),
        "settings": data.get("settings", {}),
    }


def prune_against(
    model: nn.Module, table: Any, backend: str, plan: Plan, threads: int
) -> tuple[nn.Module, dict[str, Any], dict[str, str | None]]:
    """The pruned copy, its figures and two notes. The prune refuses a table its builder judged bad: the
    comparison is still worth the GPU minutes, so it runs again on the same entries without the verdict
    ("forced" says why). Where the table's rest (what no layer carries: launches, gathers) makes the latency
    target unreachable, the prune aims at `plan.target_gflops` instead, the table predicting its latency
    ("fallback" says why). Best effort: a target missed by more than 2 points is reported, not refused."""
    from compress.latency import LatencyTableError
    from compress.structured import PruningError

    notes: dict[str, str | None] = {"forced": None, "fallback": None}
    target = {"target_latency": plan.target_latency}
    options = {"latency_table": table, "latency_backend": backend, "best_effort": True}
    while True:
        try:
            return (*pruned_copy(model, plan, threads, target, **options), notes)
        except LatencyTableError as error:
            if notes["forced"] or (table.quality or {}).get("verdict") != "bad":
                raise
            notes["forced"] = str(error).splitlines()[0]
            options["latency_table"] = replace(table, quality={})
        except PruningError as error:
            if notes["fallback"] or "target_latency" not in target:
                raise
            notes["fallback"] = str(error).splitlines()[0]
            target = {"target_gflops": plan.target_gflops}


def targeted_prune(subject: Any, table: Any, backend: str, plan: Plan, threads: int) -> dict[str, Any]:
    """Prune a copy to `plan.target_latency` of the table's prediction (`prune_against`); time it and the
    unpruned model the way the table timed the whole model (`model_runner`), interleaved in blocks."""
    from altermoma.latency_table import model_runner
    from benchmarks.latency_target import interleaved_medians
    from fusion.task import reference_task

    pruned, pruning, notes = prune_against(subject.model, table, backend, plan, threads)
    with tempfile.TemporaryDirectory(prefix="gpu-table-") as tmp:
        runners = [
            model_runner(m, reference_task(m), subject.example_batch, backend, threads, Path(tmp))
            for m in (subject.model, pruned)
        ]
        (base_ms, base_p90), (pruned_ms, pruned_p90) = interleaved_medians(runners, plan.warmup, plan.runs)
    predicted = pruning["latency"]
    return {
        **notes,
        "pruning": pruning,
        "measured": {
            "unpruned_ms": base_ms,
            "unpruned_p90_ms": base_p90,
            "pruned_ms": pruned_ms,
            "pruned_p90_ms": pruned_p90,
            "runs": plan.runs,
            "warmup": plan.warmup,
            "timer": "model_runner of altermoma.latency_table, both models interleaved in blocks of 3 "
            "(benchmarks.latency_target.interleaved_medians)",
        },  # fmt: skip
        "prediction_error_unpruned": predicted["predicted_before_ms"] / base_ms - 1.0,
        "prediction_error_pruned": predicted["predicted_after_ms"] / pruned_ms - 1.0,
        "predicted_speedup": predicted["predicted_speedup"],
        "measured_speedup": base_ms / pruned_ms,
    }


# ----------------------------------------------------------------------------------------------------------
# cuda-python buffers


def cuda_python_section(device: str, plan: Plan) -> dict[str, Any]:
    """export.runtime's DeviceBuffer/CudaStream: an exact round trip of the AlterEva preset's camera input,
    and host-to-device / device-to-host copy times (perf_counter around copy + stream synchronize)."""
    from altermoma.bench import measure
    from export.runtime import (
        CudaStream,
        CudaUnavailable,
        DeviceBuffer,
        cuda_device_count,
        cuda_device_name,
        import_cudart,
    )
    from fusion.config import get_config
    from fusion.models.bevfusion import example_inputs

    try:
        import_cudart()
    except CudaUnavailable as error:
        return {"status": f"not importable: {str(error).splitlines()[0]}"}
    if device != "cuda":
        return {"status": "unavailable: --device cpu (cuda-python imports; its buffers need the GPU run)"}
    if cuda_device_count() < 1:
        return {"status": "unavailable: cuda-python sees no CUDA device"}
    preset = plan.altereva_preset
    host = example_inputs(get_config(preset, dict(plan.overrides)), 1)["images"].numpy()
    back = np.empty_like(host)
    with CudaStream() as stream, DeviceBuffer.from_host(host, stream) as buffer:
        buffer.copy_to_host(back, stream)
        stream.synchronize()
        exact = bool(np.array_equal(back, host))

        def upload() -> None:
            buffer.copy_from_host(host, stream)
            stream.synchronize()

        def download() -> None:
            buffer.copy_to_host(back, stream)
            stream.synchronize()

        h2d = measure(upload, plan.warmup, plan.runs)
        d2h = measure(download, plan.warmup, plan.runs)
    gb = host.nbytes / 1e9
    return {
        "status": "ok" if exact else "failed: the round trip changed the data",
        "device": cuda_device_name(0),
        "tensor": f"{preset} images {list(host.shape)} float32, {host.nbytes / 2**20:.1f} MiB (pageable host memory)",
        "round_trip_exact": exact,
        "host_to_device": {**h2d, "gb_per_s": gb / (h2d["median_ms"] / 1e3)},
        "device_to_host": {**d2h, "gb_per_s": gb / (d2h["median_ms"] / 1e3)},
    }


# ----------------------------------------------------------------------------------------------------------
# Report


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """gpu.json and gpu.md, each replaced atomically (a run cut short leaves the last complete pair)."""
    atomic_write_text(out / "gpu.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "gpu.md", markdown(report))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def environment_lines(env: Mapping[str, Any]) -> list[str]:
    if env.get("status") != "ok":
        return [f"- environment: {env.get('status')}"]
    gpu = env.get("gpu") or "none"
    if env.get("gpu_capability"):
        gpu += f" (compute capability {env['gpu_capability']}, {env['gpu_memory_gib']} GiB, {env['gpu_count']} visible)"
    return [
        f"- GPU: {gpu}; driver {env['driver']}; CUDA (torch build) {env['torch_cuda']}; cuDNN {env['cudnn']}",
        f"- torch {env['torch']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, numpy {env['numpy']}, "
        f"Python {env['python']}; cuda-python: {env['cuda_python']}; TensorRT: {env['tensorrt'] or 'not installed'}",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, load average {env['load_average_1_5_15']}); "
        f"torch threads {env['torch_threads']} (interop {env['torch_interop_threads']}, OMP_NUM_THREADS "
        f"{env['omp_num_threads']})",
        f"- TF32: matmul {env['tf32_matmul']}, cuDNN convolutions {env['tf32_cudnn']} (torch's defaults, so "
        f"'FP32' convolutions may run in TF32); cudnn.benchmark {env['cudnn_benchmark']}",
    ]


def latency_lines(s: Mapping[str, Any]) -> list[str]:
    p = s["pruning"]
    lines = [
        f"Preset `{s['preset']}`"
        + (f" (quick overrides {s['overrides']})" if s["overrides"] else "")
        + f", batch {s['batch_size']}, {s['weights']}; medians over {s['runs']} runs after {s['warmup']} warm-up.",
        "",
        f"Pruned by {p['method']} to -{p['target']['target_gflops']:.0%} GFLOPs: {p['gflops_before']:.2f} -> "
        f"{p['gflops_after']:.2f} GFLOPs ({p['gflops_reduction']:.1%}) in {p['seconds']:.1f} s ({p['where']}).",
        "",
    ]
    for m in s["models"]:
        states = "; ".join(f"{mode} {lat['status']}" for mode, lat in m["latency"].items() if lat["status"] != "ok")
        lines.append(
            f"- {m['label']}: {m['gflops']:.2f} GFLOPs, {m['params'] / 1e6:.2f} M params"
            + (f"; {states}" if states else "")
        )
    first = s["models"][0]["latency"]
    for mode in MODES:
        rows = [r for r in s["speedups"] if r["mode"] == mode]
        if not rows:
            continue
        lines += [
            "",
            f"**{mode}** ({first[mode]['backend']}; {first[mode].get('timer', '')})",
            "",
            "| stage | GFLOPs unpruned -> pruned | unpruned ms | pruned ms | speed-up | GFLOPs ratio | efficiency |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            stage = "**total**" if r["stage"] == "total" else r["stage"]
            eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
            lines.append(
                f"| {stage} | {r['base_gflops']:.2f} -> {r['pruned_gflops']:.2f} | {_ms(r['base_ms'])} | "
                f"{_ms(r['pruned_ms'])} | {_x(r['speedup'])} | {_x(r['gflops_ratio'])} | {eff} |"
            )
    return lines


def altereva_lines(s: Mapping[str, Any]) -> list[str]:
    st = s["settings"]
    lines = [
        f"Preset `{s['preset']}`, random weights, scoring set {s['scoring_set']}, B = {st['reactivation_steps']} "
        f"({st['reactivation_optimizer']}, lr {st['reactivation_lr']:g}, ReRI data '{st['reri_data']}').",
        "",
        "| what | seconds | x one forward/backward | peak GPU memory (MiB) | above setup (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, r in s["rows"].items():
        peak = r["peak_gpu_mib"]
        peak_text = f"{peak:.0f}" if isinstance(peak, float) else peak
        above = f"{r['peak_gpu_above_setup_mib']:.0f}" if "peak_gpu_above_setup_mib" in r else "-"
        times = f"{r['x_forward_backward']:.1f}" if "x_forward_backward" in r else "1.0"
        lines.append(f"| {kind} | {r['seconds']:.3f} | {times} | {peak_text} | {above} |")
    return lines


def table_lines(s: Mapping[str, Any]) -> list[str]:
    t, g = s["table"], s["targeted"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [
        f"`{s['backend']}` table of `{s['preset']}` (random weights): {t['layers']} layers, "
        f"{t['distinct_points_timed']} points in {s['build_seconds']:.0f} s; end to end {t['end_to_end_ms']:.3f} ms "
        f"= layers {t['layers_full_ms']:.3f} ms + rest {t['rest_ms']:.3f} ms; interpolation error on "
        f"{t['interpolation_points']} off-grid widths: mean {pct(t['interpolation_mean_abs_error'])}, max "
        f"{pct(t['interpolation_max_abs_error'])}; rest terms used: {len(t['rest_terms_used'])} of "
        f"{t['rest_terms_measured']}. Quality verdict: {t['verdict']}"
        + (f" ({'; '.join(t['verdict_reasons'])})" if t["verdict_reasons"] else "")
        + f". Saved as `{t['path']}`.",
        "",
    ]
    if g["status"] != "ok":
        return [*lines, f"Latency-targeted prune: {g['status']}"]
    p, m = g["pruning"], g["measured"]
    if g["forced"]:
        lines += [f"The prune refused the table ({g['forced']}); for the comparison it ran on the same entries "
                  "without the verdict.", ""]  # fmt: skip
    if g["fallback"]:
        lines += [f"The latency target was out of reach ({g['fallback']}); the prune aimed at "
                  f"-{g['pruning']['target']['target_gflops']:.0%} GFLOPs instead, the table predicting its latency.",
                  ""]  # fmt: skip
    return [
        *lines,
        f"Pruned by {p['method']} to {target_text(p['target'])} (best effort; the prediction after is "
        f"{p['latency']['predicted_ratio']:.0%} of before) in {p['seconds']:.1f} s: {p['gflops_before']:.2f} -> "
        f"{p['gflops_after']:.2f} GFLOPs.",
        "",
        "| model | predicted ms | measured ms (median) | prediction error |",
        "| --- | ---: | ---: | ---: |",
        f"| unpruned | {p['latency']['predicted_before_ms']:.3f} | {m['unpruned_ms']:.3f} | "
        f"{g['prediction_error_unpruned']:+.1%} |",
        f"| pruned | {p['latency']['predicted_after_ms']:.3f} | {m['pruned_ms']:.3f} | "
        f"{g['prediction_error_pruned']:+.1%} |",
        "",
        f"Speed-up: predicted {_x(g['predicted_speedup'])}, measured {_x(g['measured_speedup'])} ({m['timer']}; "
        f"{m['runs']} runs each after {m['warmup']} warm-up).",
    ]


def target_text(target: Mapping[str, float]) -> str:
    if "target_latency" in target:
        return f"{target['target_latency']:.0%} of the predicted latency"
    return f"-{target['target_gflops']:.0%} GFLOPs"


def cuda_python_lines(s: Mapping[str, Any]) -> list[str]:
    return [
        f"{s['device']}: {s['tensor']}; round trip exact: {s['round_trip_exact']}.",
        f"Host to device {s['host_to_device']['median_ms']:.3f} ms ({s['host_to_device']['gb_per_s']:.1f} GB/s), "
        f"device to host {s['device_to_host']['median_ms']:.3f} ms ({s['device_to_host']['gb_per_s']:.1f} GB/s), "
        f"medians of {s['host_to_device']['runs']} copies.",
    ]


TITLES = {
    "environment": "Environment",
    "cuda-python": "cuda-python buffers (export.runtime)",
    "altereva": "AlterEva scoring cost",
    "latency-table": "Latency table and a latency-targeted prune",
}


def section_lines(name: str, s: Mapping[str, Any]) -> list[str]:
    """The body of one section that ran ("ok"); other states are in the overview table."""
    if name == "environment":
        return environment_lines(s)
    if name.startswith("latency-") and name != "latency-table":
        return latency_lines(s)
    return {"altereva": altereva_lines, "latency-table": table_lines, "cuda-python": cuda_python_lines}[name](s)


def markdown(report: Mapping[str, Any]) -> str:
    env = report["sections"].get("environment", {})
    st = report["settings"]
    lines = [
        f"# GPU figures: {env.get('gpu') or 'no GPU (' + st['device'] + ' run)'}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Status: {report['status']} after {report['elapsed_s']:.0f} s (budget {st['budget_s']:g} s); device "
        f"{st['device']}, {st['threads']} torch thread(s)"
        + (", QUICK (a check of the code paths, not a measurement)." if st["quick"] else "."),
        "",
        "| section | status | seconds |",
        "| --- | --- | ---: |",
    ]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} |")
    for name, s in report["sections"].items():
        title = TITLES.get(name, f"Latency: {name.removeprefix('latency-')}")
        lines += ["", f"## {title}", ""]
        lines += body_lines(name, s)
    return "\n".join(lines) + "\n"


def body_lines(name: str, s: Mapping[str, Any]) -> list[str]:
    """A section's markdown; a section the formatter cannot read is named, never fatal (gpu.json has it)."""
    if s["status"] != "ok":
        return [s["status"]]
    try:
        return section_lines(name, s)
    except Exception as error:  # noqa: BLE001 - the measurement is in gpu.json; the run must go on
        return [f"(this section's figures are in gpu.json; formatting them {failure(error)})"]


# ----------------------------------------------------------------------------------------------------------
# Main


def run_section(fn: Callable[[], dict[str, Any]], budget: Budget, limited: bool = True) -> dict[str, Any]:
    """One section, under the budget's hard stop when `limited`; whatever it leaves on the GPU is freed."""
    try:
        with hard_stop(budget) if limited else nullcontext():
            return attempt(fn)
    except BudgetExceeded as stop:
        return {"status": str(stop)}
    finally:
        try:
            free_memory()
        except Exception as error:  # noqa: BLE001 - a CUDA error here must not cost the report
            log(f"freeing memory after the section: {failure(error)}")


def run(out: Path, device: str, plan: Plan, threads: int, budget: Budget, command: str, quick: bool) -> dict[str, Any]:
    """Every section in turn under the budget; the report is written after each."""
    report: dict[str, Any] = {
        "kind": REPORT_KIND,
        "version": 1,
        "command": command,
        "status": "running",
        "elapsed_s": 0.0,
        "settings": {
            "device": device,
            "threads": threads,
            "budget_s": budget.seconds,
            "quick": quick,
            "plan": {k: v for k, v in asdict(plan).items() if k != "needs_s"},
        },  # fmt: skip
        "sections": {},
    }
    latency = [(f"latency-{p}", lambda p=p: latency_section(p, device, plan, threads)) for p in plan.presets]
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("environment", lambda: environment_section(device, threads)),
        ("cuda-python", lambda: cuda_python_section(device, plan)),
        *latency[:2],
        ("altereva", lambda: altereva_section(device, plan)),
        ("latency-table", lambda: table_section(device, plan, threads, out)),
        *latency[2:],  # further presets (the deployed-BEVFusion ones) only with the time that is left
    ]
    for name, fn in sections:
        needs = plan.needs_s.get(name, plan.needs_s.get(name.split("-")[0], 60.0))
        report["status"] = f"running: {name}"
        write_report(out, report)
        refusal = None if name == "environment" else budget.refusal(needs)
        if refusal is not None:
            result = {"status": refusal}
        else:
            log(f"{name} ...", budget)
            start = time.perf_counter()
            result = run_section(fn, budget, limited=name != "environment")
            result["seconds"] = time.perf_counter() - start
        report["sections"][name] = result
        report["elapsed_s"] = budget.elapsed()
        log(f"{name}: {result['status']}", budget)
    states = [s["status"] for s in report["sections"].values()]
    skipped = sum(s.startswith(("skipped", "stopped")) for s in states)
    failed = sum(s.startswith("failed") for s in states)
    report["status"] = (
        "complete" + (f", {failed} failed" if failed else "") + (f", {skipped} skipped" if skipped else "")
    )
    report["elapsed_s"] = budget.elapsed()
    write_report(out, report)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="report folder (gpu.json, gpu.md and the latency table)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (a check)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few runs: checks the code paths in seconds")
    parser.add_argument("--budget-s", type=positive_float, default=480.0, help="stop starting sections after this")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: 1 on cpu, up to 16 on cuda)")
    parser.add_argument("--presets", help="comma-separated latency presets (default: small,r50; quick: tiny)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work before anything is measured (ValueError/OutputError, one line)."""
    from fusion.config import PRESETS

    check_writable_folder(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device; "
                         "use --device cpu --quick to check the script without one")  # fmt: skip
    for preset in (args.presets or "").split(","):
        if preset and preset not in PRESETS:
            raise ValueError(f"--presets: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except (ValueError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    plan = quick_plan() if args.quick else full_plan()
    if args.presets:
        plan = replace(plan, presets=tuple(p for p in args.presets.split(",") if p))
    threads = args.threads or (1 if args.device == "cpu" else min(16, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)])
    from export.onnx import torch_threads

    with torch_threads(threads):
        report = run(out, args.device, plan, threads, budget, command, args.quick)
    log(f"{report['status']}: {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
