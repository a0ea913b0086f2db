"""`altermoma export onnx`: a BEVFusion checkpoint -> model.onnx, split/<stage>.onnx, export_report.{json,md}.

The generic export (`export.onnx`) knows nothing of the reference model; this module supplies what it
needs: the reference example inputs, the CUDA-BEVFusion split (`BEVFusion.export_stages`), the BEV pooling
form, synthetic val scenes for parity and the detection metrics (`fusion.evaluate`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.io import check_replaceable, fault_point, staged_directory, work_directory
from export.onnx import (
    FP32_ATOL,
    SINGLE,
    ExportError,
    eval_mode,
    export_onnx,
    export_split_details,
    parity_report,
    torch_threads,
    versions,
)
from fusion.data.sparse_inputs import graph_padding
from fusion.models.bevfusion import POOL_METHODS, current_pool_method, example_inputs, pool_method_as
from fusion.models.stages import split_stages

# The cumsum form of BEV pooling computes each cell as a difference of two FP32 prefix sums over all frustum
# points of a channel, so its rounding grows with the prefix, not with the cell. ONNX Runtime's CumSum is
# less accurate than PyTorch's: on trained tiny camera checkpoints (8 val scenes) ORT vs PyTorch reached
# 2.6e-4 (bev_map, |ref| 11) and 1.4e-4 (heatmap) at step 500, 1.7e-4 / 7.6e-5 at step 1500, while
# PyTorch's own cumsum is within 4.3e-5 of an FP64 reference and scatter parity stays below 1e-5.
# Cumsum parity is therefore judged at this looser gate; reports still say whether 1e-4 was met. Larger
# rigs (r50: 1.1 M frustum points in the grid instead of 7.4 k) have larger prefixes: expect larger errors.
CUMSUM_ATOL = 1e-3
MAX_OPSET = 20  # the TorchScript exporter's highest (torch.onnx ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
EXPORT_KIND = "onnx-export"
METRIC_KEYS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mIoU")


def _metric_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in METRIC_KEYS if k in metrics}


def opset_problem(opset: int, pool_method: str) -> str | None:
    """Why an opset cannot express the reference graph (None: it can). Checked before any export work:
    below opset 16 ScatterElements has no `reduction`, and the legacy exporter silently drops the
    scatter-add (the BEV map was off by 6.9 at opset 13)."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        return f"--opset must be a whole number, got {opset!r}"
    needed = {"scatter": 16, "cumsum": 11}.get(pool_method, 9)  # no camera: no BEV pooling in the graph
    if opset < needed:
        reason = "ScatterElements with reduction=add" if pool_method == "scatter" else "CumSum"
        return f"opset {opset} cannot express {pool_method} BEV pooling ({reason} needs opset >= {needed})"
    if opset > MAX_OPSET:
        return f"opset {opset} is above {MAX_OPSET}, the highest the TorchScript exporter writes"
    return None


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str | None = None,
    pool_method: str | None = None,
    opset: int = 17,
    samples: int = 8,
    simplify: bool = True,
    threads: int = 1,
    batch_size: int = 1,
    split: bool = True,
    force: bool = False,
    overwrite: bool = False,
    source=None,
) -> dict[str, Any]:
    """Load a checkpoint (pruned or not), export `model.onnx` and `split/<stage>.onnx`, check parity on
    `samples` synthetic val scenes, and write `export_report.json` + `export_report.md` in `out_dir`.

    The export is one transaction: everything is written beside `out_dir` and swapped in only when
    every graph passed the readiness check and parity passed; otherwise `ExportError` is raised and
    the previous export stays as it was (`force` keeps the failing one in `<out_dir>-failed`).
    Raises `CheckpointError` for a missing/corrupt checkpoint or one of another preset than `preset`,
    `ValueError`/`OutputError` for bad arguments, all before any export work.
    """
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import collate, model_inputs
    from fusion.data.source import DataSource, check_config_fits
    from fusion.evaluate import evaluate

    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pool_method is not None and pool_method not in POOL_METHODS:
        raise ValueError(f"pool_method must be one of {', '.join(POOL_METHODS)}, got {pool_method!r}")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, (EXPORT_KIND,), overwrite)
    model, meta = load_checkpoint(checkpoint_dir, expect_preset=preset)
    source = (source or DataSource()).check()
    check_config_fits(model.config, source)
    pooling = (pool_method or model.config.model.pool_method) if model.camera is not None else None
    problem = opset_problem(opset, pooling)
    if problem:
        raise ValueError(problem)
    dataset, calibration = parity_scenes(model, source, int(samples))
    work = work_directory(out_dir)
    try:
        report = _export_into(
            work,
            model,
            meta,
            checkpoint_dir,
            pool_method,
            opset,
            samples,
            simplify,
            threads,
            batch_size,
            split,
            load=(dataset, collate, model_inputs, evaluate),
        )
        report["data"] = {**source.describe(), "camera_calibration_of": calibration}
        ok = report["parity"]["ok"]
        target = out_dir if ok else (out_dir.with_name(out_dir.name + "-failed") if force else None)
        if target is not None:
            report = json.loads(json.dumps(report).replace(str(work), str(target)))
            (work / "export_report.json").write_text(json.dumps(report, indent=2))
            (work / "export_report.md").write_text(report_markdown(report))
            with staged_directory(target, kind=EXPORT_KIND, clean=False) as staging:
                for item in work.iterdir():
                    os.replace(item, staging / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        parity = report["parity"]
        worst = ", ".join(f"{k} {v:.2e}" for k, v in parity["max_abs"].items())
        kept = f"; the failing export is in {target}" if target is not None else " (--force keeps it in <out>-failed)"
        raise ExportError(
            f"parity FAILED (max abs error {worst}, atol {parity['atol']:.0e}): {out_dir} was left as it was{kept}"
        )
    return report


def parity_scenes(model, source, samples: int):
    """The val samples parity runs on, and where the exported camera geometry comes from.

    A graph is exported for one fixed rig. Synthetic: the preset's rig. nuScenes: the calibration of the
    first val sample is baked into the model before export (`bake_calibration`; a user exports for their
    car by pointing --dataroot at a root of that car), and the samples reach both PyTorch and ONNX
    Runtime without their per-sample geometry, so the two run the same fixed-rig graph.
    """
    from fusion.data.source import open_split

    dataset = open_split(model.config, source, "val", num_scenes=samples, progress=False)
    if source.kind == "synthetic":
        return dataset, "the preset's rig"
    from fusion.data.camera_geometry import CameraCalibration, bake_calibration

    first = dataset[0]
    if getattr(model, "camera", None) is not None:
        calibration = CameraCalibration(first["camera_intrinsics"], first["camera_to_lidar"], first["image_aug"])
        bake_calibration(model, model.config, calibration)
    return _FixedRig(dataset), f"sample {first['sample_token']}"


class _FixedRig:
    """A data set whose samples lose their per-sample camera geometry (the exported graph has its own)."""

    def __init__(self, dataset):
        self.dataset, self.config = dataset, dataset.config

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {k: v for k, v in self.dataset[index].items() if k != "frustum_cells"}


def _export_into(
    work, model, meta, checkpoint_dir, pool_method, opset, samples, simplify, threads, batch_size, split, load
):
    """The export proper, into the folder `work`; returns the report."""
    dataset, collate, model_inputs, evaluate = load
    start = time.perf_counter()
    inputs = example_inputs(model.config, batch_size, model.modality)
    sample_inputs = [_model_arguments(model, model_inputs(collate([dataset[i]]))) for i in range(len(dataset))]
    prepare, sparse_rows = graph_padding(model.config)
    sparse_rows = sparse_rows if "rulebooks" in inputs else None  # a camera-only model has no sparse encoder
    inputs, sample_inputs = prepare(inputs), [prepare(s) for s in sample_inputs]
    nested = any(isinstance(v, Mapping) for v in inputs.values())
    options = {"opset": opset, "simplify": simplify, "check": True, "threads": threads}
    with eval_mode(model), pool_method_as(model, pool_method), torch_threads(threads):
        method = current_pool_method(model)
        single = export_onnx(model, inputs, work / "model.onnx", **options)
        fault_point()
        single.update(pool_method=method, batch_size=int(batch_size))
        paths: dict[str, Any] = {SINGLE: single["path"]}
        split_details: dict[str, Any] = {}
        if split:
            (work / "split").mkdir(exist_ok=True)
            split_details = export_split_details(split_stages(model, inputs), inputs, work / "split", **options)
            fault_point()
            for details in split_details.values():
                details["pool_method"] = method
            paths.update({name: d["path"] for name, d in split_details.items()})
        parity = parity_report(
            model,
            paths,
            sample_inputs,
            threads,
            input_names=None if nested else model.input_names,  # nested: leaves named as the export names them
            atol=CUMSUM_ATOL if method == "cumsum" else FP32_ATOL,
            metrics_fn=lambda run: _metric_summary(
                evaluate(lambda batch: run(prepare(batch)), dataset, batch_size, progress=False)
            ),
        )
    parity["pool_method"] = method
    parity["mAP_equal"] = all(m["mAP"] == parity["metrics"]["torch"]["mAP"] for m in parity["metrics"].values())
    parity["metrics_scenes"] = len(dataset)
    return {
        "checkpoint": str(checkpoint_dir),
        "preset": model.config.preset,
        "modality": model.modality,
        "params": sum(p.numel() for p in model.parameters()),
        "pruned": bool(meta.get("pruning") or meta.get("pruned")),
        "opset": int(opset),
        "batch_size": int(batch_size),
        "pool_method": method,
        **({"sparse_rows": sparse_rows} if sparse_rows else {}),
        "threads": int(threads),
        "versions": versions(),
        "single": single,
        "split": split_details,
        "parity": parity,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _model_arguments(model, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs the model takes, by its input names (a batch also holds the other modality's)."""
    return {name: inputs[name] for name in model.input_names}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _data_name(report: Mapping[str, Any]) -> str:
    data = report.get("data", {})
    if data.get("data") == "nuscenes":
        return f"nuScenes {data.get('version')}, camera geometry of {data.get('camera_calibration_of')};"
    return "synthetic"


def report_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable export report."""
    lines = [
        f"# ONNX export: {report['checkpoint']}",
        "",
        f"- preset `{report['preset']}`, modality `{report['modality']}`, {report['params']:,} parameters"
        + (" (pruned)" if report.get("pruned") else ""),
        f"- opset {report['opset']}, batch {report['batch_size']}, static shapes, BEV pooling "
        f"`{report['pool_method']}`, legacy TorchScript exporter (dynamo=False)",
        f"- ONNX Runtime CPUExecutionProvider, intra_op_num_threads={report['threads']}, inter_op=1, sequential",
        *(
            [
                "- sparse sites per level (rulebooks padded to these rows; a denser cloud is refused): "
                + ", ".join(f"{k} {v}" for k, v in report["sparse_rows"]["rows"].items())
                + f" ({report['sparse_rows']['origin']})"
            ]
            if report.get("sparse_rows")
            else []
        ),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "## Graphs",
        "",
        "| graph | inputs | outputs | MiB before onnxslim | MiB after | nodes before | nodes after | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    graphs = {"model.onnx": report["single"], **{f"split/{k}.onnx": v for k, v in report["split"].items()}}
    for name, d in graphs.items():
        lines.append(
            f"| {name} | {', '.join(d['inputs'])} | {', '.join(d['outputs'])} | {_mib(d['size_bytes_unsimplified'])} "
            f"| {_mib(d['size_bytes'])} | {d['nodes_unsimplified']} | {d['nodes']} | {d['simplify_note']} |"
        )
    lines += ["", "## Op histogram (model.onnx)", "", "| op | count |", "| --- | ---: |"]
    lines += [f"| {op} | {n} |" for op, n in report["single"]["ops"].items()]
    lines += ["", "## TensorRT readiness", ""]
    for name, d in graphs.items():
        if not d["findings"]:
            lines.append(f"- {name}: no findings")
        for f in d["findings"]:
            lines.append(f"- {name}: {f['severity'].upper()} [{f['rule']}] {f['node']}: {f['message']}")
    parity = report["parity"]
    lines += [
        "",
        f"## Parity (fp32, atol {parity['atol']:.0e}, {parity['samples']} {_data_name(report)} val samples): "
        + ("OK" if parity["ok"] else "FAILED"),
        "",
        f"Largest error: {', '.join(f'{k} {v:.2e}' for k, v in parity['max_abs'].items())}; the fp32 target "
        f"1e-04 is {'met' if parity['meets_fp32_target'] else 'NOT met'}."
        + (
            " Cumsum pooling is judged at the looser CUMSUM_ATOL: its cells are differences of FP32 prefix sums, "
            "whose rounding PyTorch and ONNX Runtime accumulate differently."
            if parity["pool_method"] == "cumsum"
            else ""
        ),
        "",
        "| comparison | output | max abs | mean abs | max |ref| | ok |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    titles = {
        "single": "ORT model.onnx vs PyTorch",
        "split": "ORT split chain vs PyTorch",
        "split_vs_single": "split vs single (ORT)",
    }
    for key, title in titles.items():
        for name, out in parity.get(key, {}).get("outputs", {}).items():
            lines.append(
                f"| {title} | {name} | {out['max_abs']:.3e} | {out['mean_abs']:.3e} | {out['max_ref_abs']:.3e} "
                f"| {'yes' if out['ok'] else 'NO'} |"
            )
    if "metrics" in parity:
        lines += ["", f"## Metrics on {parity['metrics_scenes']} val scenes", ""]
        keys = list(parity["metrics"]["torch"])
        lines += ["| runtime | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for label, m in parity["metrics"].items():
            lines.append(f"| {label} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
        lines.append("")
        lines.append(f"mAP equal through PyTorch and ONNX Runtime: {'yes' if parity['mAP_equal'] else 'NO'}")
    return "\n".join(lines) + "\n"
