"""GFLOPs and CPU latency of any model given with its Task: the `bench --task` report.

For each model (the first is the baseline): GFLOPs counted by FlopCounterMode on the example batch,
parameters, PyTorch CPU latency (eager, `torch.inference_mode`) and ONNX Runtime CPU latency of its
exported graph, each with explicit threads; speed-up and efficiency (speed-up / GFLOPs ratio)
against the baseline. Writes `bench.json` and `bench.md`.
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from altermoma.bench import measure
from common.io import atomic_write_text
from common.task import Task
from compress.oneshot import measured_gflops
from export.onnx import OrtPipeline, export_onnx, graph_feeds, torch_threads


def bench_models(
    models: list[tuple[str, nn.Module]],
    task: Task,
    example_batch: Any,
    out_dir: str | Path,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 10,
) -> dict[str, Any]:
    """Benchmark `models` (label, model) on one example batch; the first is the baseline."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args, kwargs = task.arguments(example_batch)
    example = kwargs if kwargs else args
    rows = []
    for label, model in models:
        model.eval()
        row: dict[str, Any] = {"model": label, "params": sum(p.numel() for p in model.parameters())}
        row["gflops"] = measured_gflops(model, task, example_batch)
        with torch_threads(threads), torch.inference_mode():
            row["torch_cpu"] = measure(lambda model=model: model(*args, **kwargs), warmup, runs)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(model, example, Path(tmp) / "model.onnx", threads=threads, check=False)
            pipeline = OrtPipeline(exported["path"], threads)
            feeds = graph_feeds(example)  # by graph input name, nested arguments included
            row["ort_cpu"] = measure(lambda pipeline=pipeline, feeds=feeds: pipeline(feeds), warmup, runs)
            row["onnx_max_abs_error"] = exported["max_abs_error"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        flops_ratio = base["gflops"] / row["gflops"] if row["gflops"] else float("nan")
        for backend in ("torch_cpu", "ort_cpu"):
            speedup = base[backend]["median_ms"] / row[backend]["median_ms"]
            row[backend]["speedup"] = speedup
            row[backend]["efficiency"] = speedup / flops_ratio
    report = {
        "threads": int(threads),
        "runs": int(runs),
        "warmup": int(warmup),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "models": rows,
    }
    atomic_write_text(out_dir / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "bench.md", markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark ({report['threads']} thread(s), median of {report['runs']} runs after {report['warmup']} "
        f"warm-up, {report['cpu']}, torch {report['torch']})",
        "",
        "| model | GFLOPs | params | torch CPU ms | speed-up | efficiency | ORT CPU ms | speed-up | efficiency |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["models"]:
        t, o = r["torch_cpu"], r["ort_cpu"]
        lines.append(
            f"| {r['model']} | {r['gflops']:.4f} | {r['params']:,} | {t['median_ms']:.3f} | {t['speedup']:.2f}x "
            f"| {t['efficiency']:.2f} | {o['median_ms']:.3f} | {o['speedup']:.2f}x | {o['efficiency']:.2f} |"
        )
    return "\n".join(lines) + "\n"
