"""The main job: shipped (or retrained) tiny checkpoints -> AlterEva prune -> fine-tune -> evaluate.

Writes `report.md` and `report.json` into the output directory and prints the before/after table.
Under torchrun every step runs on every rank (evaluation and scoring shared out, fine-tuning under
DDP) and rank 0 alone writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
from fusion.finetune import FinetuneConfig, check_modality_dropout, finetune, imp_finetune_fn
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
    int8: Callable[..., tuple[dict, str]] | None = None,
    modality_dropout: float = 0.0,
) -> dict:
    """The main job (module docstring). `int8` (opt-in, `altermoma pipeline --int8` passes
    `altermoma.cli_quant.pipeline_int8`): called as int8(out, unpruned fusion model, fine-tuned checkpoint, row
    name, val scenes, threads) after the fine-tuning row; returns (summary, markdown section) and its INT8 rows
    are added to the table. None: the pipeline is exactly the FP32 one."""
    source = (source or DataSource()).check()
    check_modality_dropout(modality_dropout)
    if int8 is not None:
        from export.quantize import modelopt_missing

        if source.kind != "synthetic" or dist.is_distributed():
            raise ValueError("--int8 calibrates on synthetic training scenes in one process: no --data/torchrun")
        if modelopt_missing():
            raise ValueError(modelopt_missing())
    shipped = {m: SHIPPED / f"{preset}-{m}" for m in ("camera", "lidar", "fusion")}
    if not from_scratch and (source.kind != "synthetic" or not all(p.is_dir() for p in shipped.values())):
        have = sorted(p.name.removesuffix("-fusion") for p in SHIPPED.glob("*-fusion") if p.is_dir())
        raise ValueError(
            f"shipped checkpoints (trained on synthetic scenes) exist for --preset {', '.join(have)}: "
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
        paths = shipped
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
    tune_config = FinetuneConfig(steps=finetune_steps, threads=threads, modality_dropout=modality_dropout)
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
    tuned = f"fusion, {request.method} {target}, fine-tuned {finetune_steps} steps" + (
        f", modality dropout {modality_dropout:g}" if modality_dropout else ""
    )
    finetune(
        fusion_model,
        FinetuneConfig(steps=steps, threads=threads, modality_dropout=modality_dropout),
        out / "finetuned",
        metadata={"pruning": report},
        sync_bn=sync_bn,
        train_set=train_set,
    )
    rows.append(_row(tuned, evaluate(fusion_model, val), gflops_after, params))

    int8_summary, int8_markdown = None, ""
    if int8 is not None:
        unpruned = load_checkpoint(paths["fusion"])[0]  # models["fusion"] was pruned in place
        int8_summary, int8_markdown = int8(out, unpruned, out / "finetuned", tuned, val_scenes, threads)
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
