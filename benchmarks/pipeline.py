"""The main job: shipped (or retrained) tiny checkpoints -> AlterEva prune -> fine-tune -> evaluate.

Writes `report.md` and `report.json` into the output directory and prints the before/after table.
Under torchrun every step runs on every rank (evaluation and scoring shared out, fine-tuning under
DDP) and rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from common import dist
from common.io import atomic_write_text, check_writable_folder
from compress.oneshot import measured_gflops
from compress.prune import prune
from compress.request import PruneRequest
from fusion.checkpoint import load_checkpoint, read_weights, save_checkpoint
from fusion.config import get_config
from fusion.data.source import DataSource, check_config_fits, open_split
from fusion.evaluate import evaluate
from fusion.finetune import FinetuneConfig, finetune, imp_finetune_fn
from fusion.models.bevfusion import build_model, example_inputs
from fusion.task import first_sample, reference_task, scoring_set
from fusion.train import fit, load_pretrained

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"


def train_from_scratch(
    out: Path, threads: int, sync_bn: bool = False, preset: str = "tiny", source: DataSource | None = None
) -> dict[str, Path]:
    """Retrain the three models with the same recipe as the shipped ones (see the model card)."""
    source = source or DataSource()
    config = get_config(preset, {"train.threads": threads})
    check_config_fits(config, source)
    train_set = open_split(config, source, "train")
    paths = {}
    for modality in ("camera", "lidar", "fusion"):
        torch.manual_seed(config.train.seed)
        model = build_model(config, modality)
        train = config.train
        if modality == "fusion":
            load_pretrained(model, {m: read_weights(paths[m]) for m in ("lidar", "camera")})
            fusion_recipe = {"train.threads": threads, "train.steps": config.train.steps * 3 // 4, "train.lr": 1e-3}
            train = get_config(preset, fusion_recipe).train
        paths[modality] = out / f"{preset}-{modality}"
        fit(model, train_set, train, out_dir=paths[modality], desc=f"train {modality}", sync_bn=sync_bn)
    return paths


def _row(name: str, metrics: dict, gflops: float | None, params: int) -> dict:
    return {
        "model": name,
        "mAP": metrics["mAP"],
        "NDS": metrics["NDS"],
        "mIoU": metrics.get("mIoU", float("nan")),
        "GFLOPs": gflops,
        "params_M": params / 1e6,
    }


def format_table(rows: list[dict]) -> str:
    lines = ["| model | mAP | NDS | mIoU | GFLOPs | params (M) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gflops = f"{r['GFLOPs']:.3f}" if r["GFLOPs"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['mAP']:.4f} | {r['NDS']:.4f} | {r['mIoU']:.4f} | {gflops} | {r['params_M']:.3f} |"
        )
    return "\n".join(lines)


def format_partitions(report: dict) -> str:
    """Where the pruning cut: channels kept, params and GFLOPs per partition."""
    lines = ["| partition | channels kept | params | GFLOPs |", "| --- | --- | --- | --- |"]
    for part, r in report["partitions"].items():
        lines.append(
            f"| {part} | {r['channels_after']}/{r['channels_before']} ({r['kept_ratio']:.0%}) | "
            f"{r['params_before']:,} -> {r['params_after']:,} | {r['gflops_before']:.3f} -> {r['gflops_after']:.3f} |"
        )
    return "\n".join(lines)


INT8_CALIB_SCENES = 64


def int8_report(
    out: Path, unpruned, finetuned: Path, name: str, val_scenes: int, threads: int, runs: int = 50
) -> tuple[dict, str]:
    """`--int8`: INT8 PTQ of the fine-tuned pruned model (`altermoma quantize --onnx --ort-cpu`, calibration on
    training scenes), mAP/NDS through ONNX Runtime on the val scenes, and ONNX Runtime CPU latency of the
    unpruned FP32 graph, the pruned FP32 graph and the pruned INT8 graphs with the `bench` harness."""
    from altermoma.cli_quant import ort_map, quantize_checkpoint
    from benchmarks.latency import measure
    from export.onnx import OrtPipeline, export_onnx, torch_threads
    from export.qdq_ort import ORT_CPU_FILE

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


def run_pipeline(
    out: Path,
    from_scratch: bool,
    request: PruneRequest,
    finetune_steps: int,
    val_scenes: int,
    threads: int,
    sync_bn: bool = False,
    preset: str = "tiny",
    source: DataSource | None = None,
    int8: bool = False,
) -> dict:
    source = (source or DataSource()).check()
    if int8:
        from export.quantize import modelopt_missing

        if source.kind != "synthetic" or dist.is_distributed():
            raise ValueError("--int8 calibrates on synthetic training scenes in one process: no --data/torchrun")
        if modelopt_missing():
            raise ValueError(modelopt_missing())
    if not from_scratch and (preset != "tiny" or source.kind != "synthetic"):
        raise ValueError(
            "the shipped checkpoints are tiny models trained on synthetic scenes: "
            "add --from-scratch to train for another --preset or --data"
        )
    check_config_fits(get_config(preset), source)
    check_writable_folder(out)
    start = time.time()
    torch.set_num_threads(threads)
    dist.on_main(lambda: out.mkdir(parents=True, exist_ok=True))
    if from_scratch:
        paths = train_from_scratch(out / "trained", threads, sync_bn, preset, source)
    else:
        paths = {m: SHIPPED / f"tiny-{m}" for m in ("camera", "lidar", "fusion")}
    models = {m: load_checkpoint(p)[0] for m, p in paths.items()}
    config = models["fusion"].config
    val = open_split(config, source, "val", num_scenes=val_scenes)
    val_scenes = len(val)

    rows = []
    for modality, model in models.items():
        gflops = measured_gflops(model, reference_task(model), example_inputs(config, modality=modality))
        rows.append(
            _row(f"{modality} (unpruned)", evaluate(model, val), gflops, sum(p.numel() for p in model.parameters()))
        )

    fusion_model = models["fusion"]
    request.imp.finetune_steps = finetune_steps  # IMP's total budget
    tune_config = FinetuneConfig(steps=finetune_steps, threads=threads)
    train_set = None if source.kind == "synthetic" else open_split(config, source, "train")
    imp_tune = imp_finetune_fn(tune_config, train_set, not request.structured, sync_bn=sync_bn)
    batches = scoring_set(config, request.scoring_batches, request.scoring_batch_size, request.seed, source)
    task = reference_task(fusion_model)
    report = prune(fusion_model, task, batches, request, example_batch=first_sample(batches[0]), finetune_fn=imp_tune)
    dist.on_main(lambda: save_checkpoint(out / "pruned", fusion_model, {"pruning": report}))
    target = f"{request.target_gflops:.0%} GFLOPs" if request.target_gflops else "target"
    params = sum(p.numel() for p in fusion_model.parameters())
    gflops_after = report.get("gflops_after")
    rows.append(
        _row(f"fusion, {request.method} {target}, no fine-tune", evaluate(fusion_model, val), gflops_after, params)
    )

    # IMP already spent part of the budget between its levels: every method gets the same total.
    steps = report.get("finetune_steps_remaining", finetune_steps)
    finetune(
        fusion_model,
        FinetuneConfig(steps=steps, threads=threads),
        out / "finetuned",
        metadata={"pruning": report},
        sync_bn=sync_bn,
        train_set=train_set,
    )
    rows.append(
        _row(
            f"fusion, {request.method} {target}, fine-tuned {finetune_steps} steps",
            evaluate(fusion_model, val),
            gflops_after,
            params,
        )
    )

    int8_summary, int8_markdown = None, ""
    if int8:
        name = f"fusion, {request.method} {target}, fine-tuned {finetune_steps} steps"
        unpruned = load_checkpoint(paths["fusion"])[0]  # models["fusion"] was pruned in place
        int8_summary, int8_markdown = int8_report(out, unpruned, out / "finetuned", name, val_scenes, threads)
        for row in int8_summary["rows"][2:]:
            rows.append({**_row(row["model"], row, gflops_after, params), "backend": "onnxruntime"})
    table = format_table(rows)
    elapsed = time.time() - start
    summary = {
        "rows": rows,
        "pruning": report,
        "val_scenes": val_scenes,
        "seconds": elapsed,
        "threads": threads,
        **source.describe(),
    }
    if int8_summary is not None:
        summary["int8"] = int8_summary
    processes = f" x {dist.world()} processes" if dist.is_distributed() else ""
    markdown = (
        f"# altermoma pipeline\n\n{table}\n\n{_split_name(source)}, {val_scenes} scenes; {elapsed:.0f} s with {threads} threads{processes}.\n"
        + (f"\n## Where the pruning cut\n\n{format_partitions(report)}\n" if report["kind"] == "structured" else "")
        + (f"\n{int8_markdown}" if int8_markdown else "")
    )

    def write_reports() -> None:
        atomic_write_text(out / "report.json", json.dumps(summary, indent=2))
        atomic_write_text(out / "report.md", markdown)

    dist.on_main(write_reports)
    print(table)
    if int8_markdown:
        print(int8_markdown)
    print(f"report: {out / 'report.md'} ({elapsed:.0f} s)")
    return summary


def _split_name(source: DataSource) -> str:
    if source.kind == "synthetic":
        return "Synthetic val split"
    return f"nuScenes {source.version} val split (in-loop metric; `altermoma evaluate --data nuscenes` gives the official one)"
