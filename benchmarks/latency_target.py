"""Pruning to a latency budget, checked: predicted against measured latency, speed-up, and mAP at equal latency.

Three reports under `--out` (JSON + Markdown each, with the command that wrote them):

    python -m benchmarks.latency_target speedup --preset small --threads 1 --out reports/latency-target
        A seeded random-init model of the preset (latency depends on widths, not weights, as in
        `benchmarks.speedup`) pruned by AlterEva to 50% of its predicted latency and, for comparison,
        to 50% of its GFLOPs; both and the unpruned model measured end to end and per CUDA-BEVFusion
        stage on ONNX Runtime CPU (`altermoma.bench.bench_model`), next to the table's prediction.
    python -m benchmarks.latency_target accuracy --preset tiny --threads 1 --out reports/latency-target
        The shipped checkpoint pruned by AlterEva to 50% of its predicted latency, and by AlterEva to the
        GFLOPs reduction whose MEASURED latency matches it (bisection on measured latency); both
        fine-tuned the usual way (300 steps) and evaluated on 200 validation scenes.
    python -m benchmarks.latency_target rest-ablation --report reports/latency-target/speedup-small.json
        The speedup report's models predicted with no rest terms, the table's, and all measured ones.
    python -m benchmarks.latency_target selection --out reports/latency-target
        The greedy selection against the exact optimum (enumeration) on small random instances.

The latency table is built on the first run (`<out>/<preset>-ort-cpu.json`) and reused afterwards.
Benchmarks are scripts with reports; nothing here is asserted in the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from altermoma.bench import BACKENDS, bench_model, compare, environment, measure
from altermoma.latency_table import Subject, build_table, model_runner
from common.io import atomic_write_text
from common.task import Task
from compress.latency import LatencyPredictor, LatencyTable, load_table, quality_line, save_table, table_from_costs
from compress.latency_select import exhaustive_selection, select_for_latency
from compress.prune import prune
from compress.request import PruneRequest
from compress.structured import ChannelGraph, PruningError
from export.onnx import export_onnx, ort_session, torch_threads

BACKEND = "ort-cpu-fp32"  # the bench_model backend that matches the table's "ort-cpu"


def command_line() -> str:
    return " ".join(["python -m benchmarks.latency_target", *sys.argv[1:]])


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- shared pieces ---------------------------------------------------------------------------------
def reference_subject(model: nn.Module, source: str) -> Subject:
    from fusion.task import first_sample, reference_task, scoring_set

    example = first_sample(scoring_set(model.config, 1, 1)[0])
    return Subject(model.eval(), reference_task(model), example, source, model.config.preset)


def table_for(subject: Subject, path: Path, threads: int, log=print, **settings) -> LatencyTable:
    """The table at `path` if it was built for this model and thread count, else a fresh one (saved there,
    whatever its verdict: the report says it, and a bad one is refused by the prediction)."""
    if path.is_file():
        table = load_table(path)
        graph = ChannelGraph(subject.model, subject.task, subject.example_batch)
        try:
            LatencyPredictor(table, graph, backend="ort-cpu", source=str(path))
            if table.settings.get("threads") == threads:
                log(f"reusing {path} (built in {table.settings.get('seconds')} s)")
                return table
        except ValueError as error:
            log(f"rebuilding {path}: {error}")
    log(f"building {path} (ort-cpu, {threads} thread(s), {settings}); load average {loadavg()}")
    table = build_table(subject, "ort-cpu", threads=threads, progress=lambda text: log("  " + text), **settings)
    save_table(table, path)
    log(quality_line(table))
    return table


def table_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"grid_points": args.grid_points, "runs": args.table_runs, "warmup": args.table_warmup,
            "rest_runs": args.rest_runs}  # fmt: skip


def stage_of_layers(model: nn.Module) -> dict[str, str]:
    """Layer name -> CUDA-BEVFusion split stage that runs it."""
    from fusion.models.bevfusion import example_inputs
    from fusion.models.stages import split_stages

    names = {m: n for n, m in model.named_modules()}
    result = {}
    for stage, module, _, _ in split_stages(model, example_inputs(model.config, 1, model.modality)):
        for owned in module.owned_modules():
            for sub in owned.modules():
                result[names[sub]] = stage
    return result


def consumer_stages(graph: ChannelGraph, stages: dict[str, str]) -> dict[str, str]:
    """Group root -> the stage of the layers that read its channels: where its rest term (e.g. the BEV
    pooling over the context channels) is spent."""
    result = {}
    for group in graph.groups:
        readers = [item.layer for item in group.items if item.kind == "in" and item.layer in stages]
        result[group.root] = stages[readers[0]] if readers else stages.get(group.root, "unassigned")
    return result


def predicted_stages(
    latency: dict[str, Any], stages: dict[str, str], readers: dict[str, str], measured_base: dict[str, float]
) -> dict:
    """Per stage: the table's layers at the pruned widths + the stage's unpruned rest (measured unpruned stage
    minus its layers at full width) + the rest terms of the groups whose channels it reads."""
    table_before: dict[str, float] = {}
    table_after: dict[str, float] = {}
    rest_change: dict[str, float] = {}
    for name, layer in latency["layers"].items():
        stage = stages.get(name, "unassigned")
        table_before[stage] = table_before.get(stage, 0.0) + layer["before_ms"]
        table_after[stage] = table_after.get(stage, 0.0) + layer["after_ms"]
    for root, change in latency["rest_changes_ms"].items():
        rest_change[readers[root]] = rest_change.get(readers[root], 0.0) + change
    result = {}
    for stage, base in measured_base.items():
        rest_before = base - table_before.get(stage, 0.0)
        # a stage's rest cannot fall by more than there is of it (the rest terms' claim, bounded)
        change = max(rest_change.get(stage, 0.0), -max(rest_before, 0.0))
        rest = rest_before + change
        result[stage] = {"table_after_ms": table_after.get(stage, 0.0), "stage_rest_ms": rest,
                         "predicted_ms": table_after.get(stage, 0.0) + rest,
                         "rest_claim_capped_ms": change - rest_change.get(stage, 0.0)}  # fmt: skip
    return result


def interleaved_medians(runners: list, warmup: int, runs: int, block: int = 3) -> list[tuple[float, float]]:
    """(median ms, p90 ms) of each runner, timed in alternating blocks of `block` calls."""
    for run in runners:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    while len(samples[0]) < runs:
        for run, out in zip(runners, samples):
            for _ in range(block):
                start = time.perf_counter()
                run()
                out.append((time.perf_counter() - start) * 1e3)
    return [(float(np.median(x)), float(np.percentile(x, 90))) for x in samples]


def only_ort() -> dict[str, str]:
    return {
        b: "available" if b == BACKEND else "unavailable: not measured here (ONNX Runtime CPU only)" for b in BACKENDS
    }


def reference_request(method: str, table: LatencyTable, **target) -> PruneRequest:
    return PruneRequest(method=method, latency_table=table, latency_backend="ort-cpu", **target)


def prune_reference(model: nn.Module, request: PruneRequest, batches: list) -> dict:
    from fusion.task import first_sample, reference_task

    return prune(model, reference_task(model), batches, request, example_batch=first_sample(batches[0]), progress=False)


# ---- speed-up: predicted against measured ----------------------------------------------------------
def run_speedup(args: argparse.Namespace) -> dict:
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model
    from fusion.task import scoring_set

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    config = get_config(args.preset)
    torch.manual_seed(0)
    base = build_model(config).eval()
    table_path = Path(args.table) if args.table else out / f"{args.preset}-ort-cpu.json"
    load = {"before the table": loadavg()}
    subject = reference_subject(base, f"random weights of {args.preset} (seed 0)")
    table = table_for(subject, table_path, args.threads, **table_settings(args))
    load["after the table"] = loadavg()
    stem = args.name or f"speedup-{args.preset}"
    if table.verdict == "bad":  # the prediction refuses it: say why, measure nothing
        summary = refused_summary(args, table, table_path, load)
        write(out, stem, summary, refused_markdown(summary))
        print(f"refused: {quality_line(table)}")
        return summary
    batches = scoring_set(config, 1, 2)
    pruned = {}
    targets = [(f"latency-{args.target:.2f}", {"target_latency": args.target})]
    targets.append((f"gflops-{args.target:.2f}", {"target_gflops": args.target}))
    targets += [(f"latency-{t:.2f}", {"target_latency": t}) for t in args.also]  # out-of-sample checks
    for label, target in targets:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = prune_reference(model, reference_request(args.method, table, **target), batches)
        print(f"{label}: pruned in {time.perf_counter() - start:.0f} s, GFLOPs {report['gflops_before']:.2f} -> "
              f"{report['gflops_after']:.2f}, predicted {report['latency']['predicted_before_ms']:.1f} -> "
              f"{report['latency']['predicted_after_ms']:.1f} ms")  # fmt: skip
        pruned[label] = (model, report)
    stages = stage_of_layers(base)
    readers = consumer_stages(ChannelGraph(base, subject.task, subject.example_batch), stages)
    results = []
    load["before timing"] = loadavg()
    with tempfile.TemporaryDirectory(prefix="latency-target-") as tmp:
        for i, (label, model) in enumerate([("unpruned", base), *((k, m) for k, (m, _) in pruned.items())]):
            load[f"{label} start"] = loadavg()
            results.append(
                bench_model(
                    label,
                    model,
                    "random weights (seed 0)",
                    Path(tmp) / str(i),
                    only_ort(),
                    args.threads,
                    1,
                    args.warmup,
                    args.runs,
                )  # fmt: skip
            )
        # The headline numbers: all models timed in alternating blocks, so a burst of load from another
        # process falls on every model alike (the sequential per-stage runs above are more exposed).
        models = [("unpruned", base), *((k, m) for k, (m, _) in pruned.items())]
        runners = [
            model_runner(m, subject.task, subject.example_batch, "ort-cpu", args.threads, Path(tmp)) for _, m in models
        ]
        load["interleaved start"] = loadavg()
        interleaved = interleaved_medians(runners, args.warmup, args.runs)
    load["after"] = loadavg()
    base_stages = {s: t["median_ms"] for s, t in results[0]["latency"][BACKEND]["stages"].items()}
    rows = []
    for result, (measured_ms, p90_ms) in zip(results, interleaved):
        measured = result["latency"][BACKEND]
        report = pruned[result["label"]][1] if result["label"] in pruned else None
        latency = report["latency"] if report else None
        predicted = latency["predicted_after_ms"] if latency else table.table_full_ms + table.rest_ms
        row = {
            "model": result["label"],
            "gflops": result["gflops"],
            "measured_ms": measured_ms,
            "measured_p90_ms": p90_ms,
            "measured_sequential_ms": measured["total"]["median_ms"],
            "predicted_ms": predicted,
            "prediction_error": predicted / measured_ms - 1.0,
            "measured_speedup": interleaved[0][0] / measured_ms,
            "predicted_speedup": (table.table_full_ms + table.rest_ms) / predicted,
            "gflops_ratio": results[0]["gflops"] / result["gflops"],
        }
        if latency:
            row["predicted_partitions"] = latency["partitions"]
            row["stages"] = {
                stage: {**p, "measured_ms": measured["stages"][stage]["median_ms"]}
                for stage, p in predicted_stages(latency, stages, readers, base_stages).items()
            }
            row["widths"] = report["widths"]
            row["selection"] = latency.get("selection")
        else:
            row["stages"] = {s: {"measured_ms": v} for s, v in base_stages.items()}
        rows.append(row)
    summary = {
        "command": command_line(),
        "environment": {**environment(args.threads, 1), "load_average": load},
        "settings": speedup_settings(args),
        "note": args.note,
        "table": table_summary(table, table_path),
        "rows": rows,
        "verdict": speedup_verdict(rows, args.target),
        "comparison": compare(results),
    }
    write(out, stem, summary, speedup_markdown(summary))
    for row in rows:
        print(f"{row['model']}: measured {row['measured_ms']:.1f} ms ({row['measured_speedup']:.2f}x), predicted "
              f"{row['predicted_ms']:.1f} ms ({row['prediction_error']:+.1%}), GFLOPs {row['gflops']:.2f}")  # fmt: skip
    return summary


def speedup_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"preset": args.preset, "method": args.method, "target": args.target, "also": args.also, "runs": args.runs,
            "warmup": args.warmup, "threads": args.threads, "backend": BACKEND, "table": table_settings(args)}  # fmt: skip


def speedup_verdict(rows: list[dict], target: float) -> dict[str, Any]:
    """The questions the report answers: does the latency-targeted model reach 90% of the speed-up asked
    for (1.8x for 50%), and is every prediction within 10% of its measurement?"""
    latency = next(r for r in rows if r["model"] == f"latency-{target:.2f}")
    wanted = 0.9 / target
    worst = max(rows, key=lambda r: abs(r["prediction_error"]))
    return {
        "speedup_wanted": wanted,
        "speedup_measured": latency["measured_speedup"],
        "speedup_reached": latency["measured_speedup"] >= wanted,
        "worst_prediction_error": worst["prediction_error"],
        "worst_prediction_model": worst["model"],
        "predictions_within_10pct": abs(worst["prediction_error"]) <= 0.10,
    }


def refused_summary(args: argparse.Namespace, table: LatencyTable, path: Path, load: dict) -> dict[str, Any]:
    return {
        "command": command_line(),
        "environment": {**environment(args.threads, 1), "load_average": {**load, "end": loadavg()}},
        "settings": speedup_settings(args),
        "note": args.note,
        "table": table_summary(table, path),
        "refused": quality_line(table),
    }


def refused_markdown(s: dict) -> str:
    t = s["table"]
    return "\n".join(
        [
            f"# Latency-targeted pruning: predicted vs measured ({s['settings']['preset']}): table refused",
            "",
            f"Command: `{s['command']}`",
            "",
            *([f"Conditions: {s['note']}", ""] if s.get("note") else []),
            f"- load average (1/5/15 min): {s['environment']['load_average']}",
            f"- table settings: {json.dumps(s['settings'].get('table'))}",
            f"- table `{t['path']}`: {t['layers']} layers, {t['settings'].get('distinct_points_timed')} points in "
            f"{t['settings'].get('seconds')} s; settings {json.dumps(s['settings']['table'])}",
            "",
            f"The table was judged bad, so no model was pruned against it: {s['refused']}.",
            "",
            f"Reference model through the build (ms): {', '.join(f'{r:.1f}' for r in t['reference_ms'])}",
            "",
        ]
    )


def table_summary(table: LatencyTable, path: Path) -> dict[str, Any]:
    check = table.checks.get("interpolation", {})
    rest = table.checks.get("rest_terms", {})
    return {
        "path": str(path),
        "backend": table.backend,
        "layers": len(table.layers),
        "end_to_end_ms": table.end_to_end_ms,
        "table_full_ms": table.table_full_ms,
        "rest_ms": table.rest_ms,
        "settings": table.settings,
        "interpolation_mean_abs_error": check.get("mean_abs_relative_error"),
        "interpolation_max_abs_error": check.get("max_abs_relative_error"),
        "interpolation_points": len(check.get("points", [])),
        "interpolation_ms_weighted_error": check.get("ms_weighted_abs_error"),
        "interpolation_mode": check.get("mode"),
        "interpolation_linear_mean_abs_error": check.get("linear_mean_abs_relative_error"),
        "interpolation_linear_max_abs_error": check.get("linear_max_abs_relative_error"),
        "interpolation_linear_ms_weighted_error": check.get("linear_ms_weighted_abs_error"),
        "retimed_points": len(table.checks.get("retimed", {}).get("points", [])),
        "rest_terms_used": {r: table.rest_terms[r]["rest_change_ms"] for r in rest.get("used", [])},
        "rest_terms_measured": len(table.rest_terms),
        "rest_noise_ms": rest.get("noise_ms"),
        "rest_threshold_ms": rest.get("threshold_ms"),
        "unpruned_spread_while_building": rest.get("unpruned_spread"),
        "load_average_at_start": table.environment.get("load_average_at_start"),
        "built_under_load": table.environment.get("load_average_1_5_15"),
        "quality": table.verdict,
        "quality_line": quality_line(table),
        "quality_metrics": table.quality.get("metrics"),
        "reference_ms": [r["ms"] for r in table.quality.get("reference", [])],
    }


def speedup_markdown(s: dict) -> str:
    t, env = s["table"], s["environment"]
    lines = [
        f"# Latency-targeted pruning: predicted vs measured ({s['settings']['preset']})",
        "",
        f"Command: `{s['command']}`",
        "",
        f"- {env['cpu']}, {s['settings']['threads']} thread(s) (ORT intra_op_num_threads, sequential), torch "
        f"{env['torch']}, onnxruntime {env['onnxruntime']}; warm-up {s['settings']['warmup']}, {s['settings']['runs']} "
        "timed runs, medians",
        *([f"Conditions: {s['note']}", ""] if s.get("note") else []),
        f"- load average (1/5/15 min): {s['environment']['load_average']}",
        f"- table settings: {json.dumps(s['settings'].get('table'))}",
        f"- table `{t['path']}`: {t['layers']} layers, {t['settings'].get('distinct_points_timed')} points in "
        f"{t['settings'].get('seconds')} s; end to end {t['end_to_end_ms']:.2f} ms = layers {t['table_full_ms']:.2f} ms "
        f"+ rest {t['rest_ms']:.2f} ms; {t['retimed_points']} points timed again (slower than wider ones)",
        f"- interpolation error on {t['interpolation_points']} off-grid widths, {t['interpolation_mode']} (the "
        f"table's): mean {_pct(t['interpolation_mean_abs_error'])}, max {_pct(t['interpolation_max_abs_error'])}, "
        f"weighted by ms {_pct(t['interpolation_ms_weighted_error'])}; bilinear: mean "
        f"{_pct(t['interpolation_linear_mean_abs_error'])}, max {_pct(t['interpolation_linear_max_abs_error'])}, "
        f"weighted by ms {_pct(t['interpolation_linear_ms_weighted_error'])}",
        f"- rest terms: {t['rest_terms_measured']} groups measured, used (rest change at about a quarter width): "
        + (", ".join(f"`{r}` {v:+.1f} ms" for r, v in t["rest_terms_used"].items()) or "none")
        + f"; noise {t['rest_noise_ms'] or 0:.2f} ms, threshold {t['rest_threshold_ms'] or 0:.2f} ms; the unpruned model "
        f"varied by {_pct(t['unpruned_spread_while_building'])} beside the rest terms (load average at the table's start "
        f"{t['load_average_at_start']})",
        f"- table {t['quality_line']}",
        "",
        "Measured: the models timed in alternating blocks of 3 runs (so load from other processes falls "
        "on all alike); in brackets the p90 and the per-model sequential median of the per-stage run.",
        "",
        "| model | GFLOPs | measured ms (p90; sequential) | predicted ms | prediction error | measured speed-up | "
        "predicted speed-up | GFLOPs ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['model']} | {r['gflops']:.2f} | {r['measured_ms']:.1f} ({r['measured_p90_ms']:.1f}; "
            f"{r['measured_sequential_ms']:.1f}) | "
            f"{r['predicted_ms']:.1f} | {r['prediction_error']:+.1%} | {r['measured_speedup']:.2f}x | "
            f"{r['predicted_speedup']:.2f}x | {r['gflops_ratio']:.2f}x |"
        )
    v = s.get("verdict")
    if v:
        lines += [
            "",
            f"Verdict: the latency-targeted model measured {v['speedup_measured']:.2f}x (wanted at least "
            f"{v['speedup_wanted']:.2f}x: {'reached' if v['speedup_reached'] else 'NOT reached'}); the worst prediction "
            f"error is {v['worst_prediction_error']:+.1%} ({v['worst_prediction_model']}: "
            f"{'within' if v['predictions_within_10pct'] else 'NOT within'} 10%).",
        ]
    for r in s["rows"][1:]:
        lines += [
            "",
            f"## {r['model']}: per stage",
            "",
            "Predicted = the table's layers of the stage at the kept widths + the stage's rest: its unpruned "
            "measurement minus its layers at full width, plus the rest terms of the groups whose channels it reads "
            "(a stage's rest falls by at most what it has).",
            "",
            "| stage | measured ms | predicted ms | error | layers ms | stage rest ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for stage, v in r["stages"].items():
            lines.append(
                f"| {stage} | {v['measured_ms']:.1f} | {v['predicted_ms']:.1f} | "
                f"{v['predicted_ms'] / v['measured_ms'] - 1:+.1%} | {v['table_after_ms']:.1f} | {v['stage_rest_ms']:.1f} |"
            )
        parts = ", ".join(
            f"{p} {v['before_ms']:.1f} -> {v['after_ms']:.1f} ms"
            + (f" (rest {v['rest_change_ms']:+.1f} ms)" if v["rest_change_ms"] else "")
            for p, v in r["predicted_partitions"].items()
        )
        lines += ["", f"Predicted per partition (its layers; in brackets the rest its pruning saves): {parts}."]
        if r.get("selection"):
            sel = r["selection"]
            lines.append(
                f"Selection: {sel['moves']} moves, {sel['give_backs']} give-backs, {sel['seconds']} s; budget "
                f"{sel['budget_ms']:.1f} ms, predicted {sel['predicted_ms']:.1f} ms."
            )
        lines.append(f"Widths: `{json.dumps(r['widths'])}`")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def write(out: Path, stem: str, data: dict, markdown: str) -> None:
    atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=2))
    atomic_write_text(out / f"{stem}.md", markdown)
    print(f"report: {out / stem}.md")


# ---- accuracy at equal measured latency --------------------------------------------------------------
def ort_latency(model: nn.Module, threads: int, warmup: int, runs: int) -> float:
    """Median ms of the whole model in ONNX Runtime CPU (`threads` intra-op), on `example_inputs`."""
    from fusion.models.bevfusion import example_inputs

    inputs = example_inputs(model.config, 1, model.modality)
    with tempfile.TemporaryDirectory(prefix="latency-target-") as tmp:
        details = export_onnx(model.eval(), inputs, Path(tmp) / "model.onnx", check=False, threads=threads)
        session = ort_session(details["path"], threads)
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return measure(lambda: session.run(None, feeds), warmup, runs)["median_ms"]


def run_accuracy(args: argparse.Namespace) -> dict:
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes
    from fusion.evaluate import evaluate
    from fusion.finetune import FinetuneConfig, finetune
    from fusion.task import scoring_set

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(
        args.checkpoint or Path(__file__).resolve().parent.parent / "fusion/weights" / f"{args.preset}-fusion"
    )
    base, _ = load_checkpoint(checkpoint, expect_preset=args.preset)
    torch.set_num_threads(args.threads)
    table = table_for(
        reference_subject(base, f"checkpoint {checkpoint}"),
        Path(args.table) if args.table else out / f"{args.preset}-ort-cpu.json",
        args.threads,
        **table_settings(args),
    )
    batches = scoring_set(base.config, 4, 2)
    load = {"start": loadavg()}

    def latency_of(model: nn.Module) -> float:
        with torch_threads(args.threads):
            return ort_latency(model, args.threads, args.warmup, args.runs)

    base_ms = latency_of(base)
    by_latency = copy.deepcopy(base)
    report_l = prune_reference(by_latency, reference_request(args.method, table, target_latency=args.target), batches)
    ms_l = latency_of(by_latency)
    print(f"latency-targeted: {ms_l:.2f} ms measured ({report_l['latency']['predicted_after_ms']:.2f} predicted), "
          f"GFLOPs -{report_l['gflops_reduction']:.1%}")  # fmt: skip
    # The GFLOPs reduction whose measured latency equals the latency-targeted model's: bisection.
    low, high, trials = 0.05, 0.95, []
    for _ in range(args.search_steps):
        mid = (low + high) / 2
        model = copy.deepcopy(base)
        report = prune_reference(model, reference_request(args.method, table, target_gflops=mid), batches)
        ms = latency_of(model)
        trials.append({"target_gflops": mid, "measured_ms": ms, "gflops_reduction": report["gflops_reduction"],
                       "model": model, "report": report})  # fmt: skip
        print(f"  GFLOPs -{mid:.3f}: {ms:.2f} ms (target {ms_l:.2f} ms)")
        if ms > ms_l:
            low = mid
        else:
            high = mid
    best = min(trials, key=lambda t: abs(t["measured_ms"] - ms_l))
    by_gflops, report_g = best["model"], best["report"]
    # Measured again, alternating, so both numbers see the same machine state.
    final = {"latency": [], "gflops": []}
    for _ in range(3):
        final["latency"].append(latency_of(by_latency))
        final["gflops"].append(latency_of(by_gflops))
    load["after latency"] = loadavg()
    rows = {}
    val = SyntheticScenes(base.config, "val", num_scenes=args.val_scenes, progress=False)
    for label, pruned_model, report in (("latency", by_latency, report_l), ("gflops", by_gflops, report_g)):
        runs = []
        for seed in args.seeds:  # the same pruned weights, fine-tuned with each seed
            model = copy.deepcopy(pruned_model)
            start = time.perf_counter()
            config = FinetuneConfig(steps=args.finetune_steps, threads=2, seed=seed)
            finetune(model, config, metadata={"pruning": report}, progress=False)
            metrics = evaluate(model, val, progress=False)
            runs.append({"seed": seed, "mAP": metrics["mAP"], "NDS": metrics["NDS"], "mIoU": metrics.get("mIoU"),
                         "finetune_seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(f"{label} (seed {seed}): mAP {metrics['mAP']:.4f} NDS {metrics['NDS']:.4f}")
        rows[label] = {
            "target": report["request"].get("target_latency") or report["request"].get("target_gflops"),
            "gflops_after": report["gflops_after"],
            "gflops_reduction": report["gflops_reduction"],
            "measured_ms": sorted(final[label])[1],
            "measured_runs_ms": final[label],
            "predicted_ms": report["latency"]["predicted_after_ms"],
            **{k: float(np.mean([r[k] for r in runs])) for k in ("mAP", "NDS")},
            "mIoU": float(np.mean([r["mIoU"] for r in runs])) if runs[0]["mIoU"] is not None else None,
            "mAP_min": min(r["mAP"] for r in runs),
            "mAP_max": max(r["mAP"] for r in runs),
            "finetunes": runs,
            "widths": report["widths"],
        }
    unpruned = evaluate(base, val, progress=False)
    summary = {
        "command": command_line(),
        "environment": {**environment(args.threads, 1), "load_average": {**load, "end": loadavg()}},
        "settings": {
            "preset": args.preset,
            "checkpoint": str(checkpoint),
            "method": args.method,
            "target": args.target,
            "finetune": f"fusion.finetune.finetune, FinetuneConfig(steps={args.finetune_steps}, threads=2, seed=s) "
            f"for s in {args.seeds}",
            "evaluation": f"fusion.evaluate.evaluate on SyntheticScenes(config, 'val', num_scenes={args.val_scenes})",
            "runs": args.runs,
            "warmup": args.warmup,
            "threads": args.threads,
        },  # fmt: skip
        "table": table_summary(table, out / f"{args.preset}-ort-cpu.json"),
        "unpruned": {
            "measured_ms": base_ms,
            "mAP": unpruned["mAP"],
            "NDS": unpruned["NDS"],
            "mIoU": unpruned.get("mIoU"),
        },
        "search": [{k: v for k, v in t.items() if k not in ("model", "report")} for t in trials],
        "rows": rows,
    }
    write(out, args.name or f"accuracy-{args.preset}", summary, accuracy_markdown(summary))
    return summary


def accuracy_markdown(s: dict) -> str:
    u, st = s["unpruned"], s["settings"]
    lines = [
        f"# mAP at equal measured latency: latency-targeted vs GFLOPs-targeted ({st['method']}, {st['preset']})",
        "",
        f"Command: `{s['command']}`",
        "",
        f"- checkpoint `{st['checkpoint']}`; fine-tune: {st['finetune']}; evaluation: {st['evaluation']}",
        f"- latency: ONNX Runtime CPU, {st['threads']} thread(s), warm-up {st['warmup']}, {st['runs']} runs, median "
        "(final numbers: median of 3 alternating measurements); load average: "
        f"{s['environment']['load_average']}",
        f"- unpruned: {u['measured_ms']:.2f} ms, mAP {u['mAP']:.4f}, NDS {u['NDS']:.4f}, mIoU {u['mIoU'] or 0:.4f}",
        "",
        "mAP, NDS and mIoU: means over the fine-tune seeds; in brackets the lowest and highest mAP.",
        "",
        "| target | GFLOPs removed | measured ms | predicted ms | mAP (min-max) | NDS | mIoU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in s["rows"].items():
        name = f"latency {r['target']:.2f}" if label == "latency" else f"GFLOPs {r['target']:.3f} (matched latency)"
        miou = "-" if r["mIoU"] is None else f"{r['mIoU']:.4f}"
        lines.append(
            f"| {name} | {r['gflops_reduction']:.1%} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | "
            f"{r['mAP']:.4f} ({r['mAP_min']:.4f}-{r['mAP_max']:.4f}) | {r['NDS']:.4f} | {miou} |"
        )
    lines += ["", "Search for the GFLOPs target of equal measured latency:", ""]
    lines += [f"- GFLOPs -{t['target_gflops']:.3f}: {t['measured_ms']:.2f} ms" for t in s["search"]]
    return "\n".join(lines) + "\n"


# ---- the rest terms: which to use ------------------------------------------------------------------
def run_rest_ablation(args: argparse.Namespace) -> dict:
    """Predictions of the models of a `speedup` report under three rest models (no measurement: the
    report's measured latencies and widths, the table's measured rest terms): none (a constant rest),
    the table's (the outliers), and all measured terms."""
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model

    out = Path(args.out)
    report = json.loads(Path(args.report).read_text())
    table = load_table(args.table)
    torch.manual_seed(0)  # the seeded random-init model the speedup report pruned
    base = build_model(get_config(report["settings"]["preset"])).eval()
    subject = reference_subject(base, "")
    graph = ChannelGraph(base, subject.task, subject.example_batch)
    kept = {root for root, t in table.rest_terms.items() if t.get("used")}
    variants = {"none (constant rest)": set(), "outliers (the table's)": kept, "all measured": set(table.rest_terms)}
    rows = []
    for name, used in variants.items():
        for root, term in table.rest_terms.items():
            term["used"] = root in used
        predictor = LatencyPredictor(table, graph)
        for row in report["rows"]:
            widths = row.get("widths") or {}
            masks = [torch.arange(g.channels) < g.channels - widths.get(g.root, g.channels) for g in graph.groups]
            predicted = predictor.total_ms(masks)
            rows.append({"rest": name, "terms": len(used), "model": row["model"], "measured_ms": row["measured_ms"],
                         "predicted_ms": predicted, "error": predicted / row["measured_ms"] - 1.0})  # fmt: skip
    summary = {"command": command_line(), "report": str(args.report), "table": str(args.table), "rows": rows}
    md = [
        "# Which rest terms to use: predictions of the speedup report's models",
        "",
        f"Command: `{summary['command']}` (measured latencies from `{args.report}`)",
        "",
        "| rest model | terms | model | measured ms | predicted ms | error |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    md += [
        f"| {r['rest']} | {r['terms']} | {r['model']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['error']:+.1%} |"
        for r in rows
    ]
    write(out, f"rest-ablation-{report['settings']['preset']}", summary, "\n".join(md) + "\n")
    return summary


# ---- selection: greedy against the exact optimum -------------------------------------------------
class Chain(nn.Module):
    """A small conv chain: three prunable groups with coupled costs (each conv's input is the last's output)."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def chain_setup(widths: tuple[int, ...]) -> tuple[ChannelGraph, Task]:
    model = Chain(widths)
    task = Task(partition={"camera": ["body."], "lidar": [], "fusion": ["head."]}, loss=lambda out, _b: out.mean())
    return ChannelGraph(model, task, torch.zeros(1, 3, 8, 8)), task


def run_selection(args: argparse.Namespace) -> dict:
    """Greedy vs exhaustive on random instances: scores, non-monotone costs and budgets drawn at random."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    graph, _ = chain_setup((32, 32, 24))
    gaps, optimal, unreachable, failed = [], 0, 0, 0
    for _ in range(args.instances):
        bumps = {name: rng.uniform(0.0, 0.3) for name in graph.layer_shapes}

        def cost(name: str, c_in: int, c_out: int, bumps=bumps) -> float:
            # bilinear work plus a penalty for widths off a multiple of 16 (as tensor-core kernels show)
            return 0.01 * c_in * c_out / 64 + (bumps[name] if c_out % 16 else 0.0) + 0.05

        table = table_from_costs(graph, cost, round_to=8, max_points=8)
        table.rest_ms = rng.uniform(0.0, 0.3) * table.table_full_ms
        predictor = LatencyPredictor(table, graph)
        scores = [
            torch.tensor([rng.expovariate(1.0) for _ in range(g.channels)], dtype=torch.float64) for g in graph.groups
        ]
        budget = rng.uniform(0.35, 0.9) * predictor.total_ms()
        try:
            _, best = exhaustive_selection(graph, predictor, scores, budget, 8, 0.9)
        except PruningError:
            unreachable += 1
            continue
        try:
            masks, _ = select_for_latency(graph, predictor, scores, budget, 8, 0.9)
        except PruningError:
            failed += 1
            continue
        kept = sum(float(s[~m].sum()) for s, m in zip(scores, masks))
        assert predictor.total_ms(masks) <= budget + 1e-9
        gaps.append((best - kept) / best)
        optimal += gaps[-1] <= 1e-12
    summary = {
        "command": command_line(),
        "instances": len(gaps) + failed,
        "greedy_found_no_selection": failed,
        "skipped_unreachable_budgets": unreachable,
        "optimal": optimal,
        "mean_gap": sum(gaps) / len(gaps),
        "max_gap": max(gaps),
        "setup": "3 coupled conv groups (32, 32, 24 channels, round_to 8, cap 0.9); exponential scores; "
        "cost 0.01*c_in*c_out/64 + 0.05 ms + a random 0-0.3 ms penalty when c_out is not a multiple of 16; "
        "budget 35-90% of the unpruned prediction; rest 0-30% of the layers' total",
    }
    md = [
        "# Greedy latency selection against the exact optimum",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Setup: {summary['setup']}.",
        "",
        f"- instances: {summary['instances']} with a reachable budget ({unreachable} unreachable ones skipped); "
        f"greedy optimal in {optimal} ({optimal / summary['instances']:.0%}), no selection found in {failed}",
        f"- importance lost against the optimum: mean {summary['mean_gap']:.2%}, worst {summary['max_gap']:.2%}",
    ]
    write(out, "selection", summary, "\n".join(md) + "\n")
    print(f"greedy optimal in {optimal}/{len(gaps)}; gap mean {summary['mean_gap']:.2%}, max {summary['max_gap']:.2%}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_target", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, preset in (("speedup", run_speedup, "small"), ("accuracy", run_accuracy, "tiny")):
        p = sub.add_parser(name)
        p.add_argument("--preset", default=preset)
        p.add_argument("--method", default="altereva")
        p.add_argument("--target", type=float, default=0.5, help="fraction of the predicted latency to keep")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--runs", type=int, default=50)
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--out", default="reports/latency-target")
        p.add_argument("--table", help="the table's path (default <out>/<preset>-ort-cpu.json; built when missing)")
        p.add_argument("--grid-points", type=int, default=16, help="table: widths per dimension (default 16)")
        p.add_argument("--table-runs", type=int, default=20, help="table: timed rounds per point (default 20)")
        p.add_argument("--table-warmup", type=int, default=5, help="table: warm-up calls per point (default 5)")
        p.add_argument("--rest-runs", type=int, default=20, help="table: rounds per rest term (default 20)")
        p.add_argument("--name", help="report file stem (default speedup-<preset> / accuracy-<preset>)")
        p.add_argument("--note", default="", help="conditions to state in the report (e.g. what else ran)")
        p.set_defaults(run=run)
        if name == "speedup":
            p.add_argument("--also", type=float, nargs="*", default=[0.7], help="more latency targets to check")
        if name == "accuracy":
            p.add_argument("--checkpoint", help="default: the shipped fusion/weights/<preset>-fusion")
            p.add_argument("--finetune-steps", type=int, default=300)
            p.add_argument("--val-scenes", type=int, default=200)
            p.add_argument("--search-steps", type=int, default=7)
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds (default 0 1 2)")
    p = sub.add_parser("rest-ablation")
    p.add_argument("--report", default="reports/latency-target/speedup-small.json")
    p.add_argument("--table", default="reports/latency-target/small-ort-cpu.json")
    p.add_argument("--out", default="reports/latency-target")
    p.set_defaults(run=run_rest_ablation)
    p = sub.add_parser("selection")
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--out", default="reports/latency-target")
    p.set_defaults(run=run_selection)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
