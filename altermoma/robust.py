"""Robustness of fusion models to sensor failures: the same scenes, clean and under each corruption, per model.

A fusion model is deployed because it should keep working when a sensor degrades, and pruning may remove the
cross-modal redundancy that carries that. `robustness` evaluates one or several models on the same data,
clean and under each corruption and severity, and returns every metric with its ratio to that model's clean
score; `write_report` writes the table, the plots and the JSON (`altermoma robustness` on the command line).

Two kinds of data:
- a reference data set (`fusion.data.source.open_split`, synthetic or nuScenes) with corruptions by name
  (`fusion.data.corruptions`): camera corruptions change each sample's images, LiDAR corruptions change the raw
  point cloud before pillarisation or voxelisation (synthetic scenes are rendered again with the corrupted
  sweep, nuScenes sweeps are corrupted as they are read);
- your own batches (or samples of a Dataset) with corruptions as callables `corrupt(item, severity, rng)` ->
  item, applied to each batch (each sample), with `rng` a numpy Generator seeded from (seed, corruption name,
  severity, item index).

Models are scored by `fusion.evaluate.evaluate` (synthetic), the nuScenes detection metric
(`fusion.nuscenes_eval.evaluate_results`, as `altermoma evaluate` computes it), a `Task`'s mean loss, or any
`eval_fn(model, data) -> {metric: value}`.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.progress import progress_bar
from common.task import Task
from fusion.data import corruptions as C

EvalFn = Callable[[nn.Module, Any], Mapping[str, Any]]
ItemCorruption = Callable[[Any, "int | None", np.random.Generator], Any]
KIND = "robustness"
TABLE_METRICS = ("mAP", "NDS")


class RobustnessError(ValueError):
    """Arguments that cannot describe a robustness run (an unknown corruption, models that read other data)."""


def robustness(
    model: nn.Module | Mapping[str, nn.Module],
    task_or_eval_fn: Task | EvalFn | None,
    data: Dataset | Sequence[Any],
    corruptions: Sequence[str] | Mapping[str, ItemCorruption] | str = "all",
    severities: Sequence[int] = C.SEVERITIES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Metrics of `model` (or of each model of a {label: model} mapping) on `data`, clean and corrupted.

    task_or_eval_fn: None scores a reference model on a reference data set (mAP, NDS, ...); a `Task` scores by
        its mean loss over the batches (lower is better, so its ratios rise); a callable `eval_fn(model, data)`
        returns {metric: value} for `data` as given (a Dataset or a list of batches).
    data: a reference data set (`open_split`) or any Dataset, or a list of batches.
    corruptions: names from `fusion.data.corruptions` (reference data sets only; "all", "sensor_failures" and
        "camera_off" expand), or {name: corrupt(item, severity, rng) -> item} applied to every batch of a list
        or every sample of a Dataset (your own inputs: images, points, whatever the model reads).
    severities: 1..5; on/off failures (cameras_off, camera_off_<i>, lidar_off) run once, severity None.

    Returns {"models": [labels], "seed", "severities", "clean": {label: metrics}, "rows": [{"model",
    "corruption", "severity", "parameter", "metrics", "ratios"}]}, where ratios are each scalar metric over
    the same model's clean value. The corrupted inputs are a function of (seed, corruption, severity, item
    index) alone, so a run is reproduced bit for bit, and every model sees the same corrupted inputs.
    """
    models = {"model": model} if isinstance(model, nn.Module) else dict(model)
    if not models:
        raise RobustnessError("no model to evaluate")
    severities = C.check_severities(severities)
    plan = corruption_plan(data, corruptions, severities, seed)
    score = evaluator(task_or_eval_fn, data)
    result: dict = {"models": list(models), "seed": seed, "severities": list(severities), "clean": {}, "rows": []}
    bar = progress_bar(total=len(models) * (1 + len(plan)), desc="robustness", enabled=progress)
    with bar, tempfile.TemporaryDirectory(prefix="altermoma-robustness-") as scratch:
        for label, m in models.items():
            bar.set_postfix_str(f"{label}: clean")
            result["clean"][label] = scalars(score(m, data))
            bar.update()
        for number, (name, severity, parameter, build) in enumerate(plan):
            store = Path(scratch) / str(number)
            corrupted = build(store)
            for label, m in models.items():
                bar.set_postfix_str(f"{label}: {name}" + (f" {severity}" if severity else ""))
                metrics = scalars(score(m, corrupted))
                clean = result["clean"][label]
                result["rows"].append(
                    {
                        "model": label,
                        "corruption": name,
                        "severity": severity,
                        "parameter": parameter,
                        "metrics": metrics,
                        "ratios": {k: (v / clean[k] if clean.get(k) else None) for k, v in metrics.items()},
                    }
                )
                bar.update()
            shutil.rmtree(store, ignore_errors=True)  # scenes rendered for this corruption: every model is done
    return result


def corruption_plan(
    data: Dataset | Sequence[Any],
    corruptions: Sequence[str] | Mapping[str, ItemCorruption] | str,
    severities: Sequence[int],
    seed: int,
) -> list[tuple[str, int | None, str, Callable[[Path], Any]]]:
    """(name, severity, parameter in words, build(scratch folder) -> corrupted data) for every evaluation."""
    if isinstance(corruptions, Mapping):
        for name, corrupt in corruptions.items():
            if not callable(corrupt):
                raise RobustnessError(f"corruption {name!r} is not callable: give corrupt(item, severity, rng)")
        return [
            (name, s, f"severity {s}", _builder(data, name, s, seed, corrupt))
            for name, corrupt in corruptions.items()
            for s in severities
        ]
    scenes = reference_scenes(data)
    if scenes is None:
        raise RobustnessError(
            "corruptions by name act on reference data sets (fusion.data.source.open_split); "
            "for your own batches give {name: corrupt(batch, severity, rng)}"
        )
    sensors = C.sensors_of(data.config, data_kind(scenes))
    names = C.parse_names(corruptions, sensors.num_cameras)
    return [
        (name, s, C.parameter(name, s, sensors), _builder(data, name, s, seed, None))
        for name in names
        for s in C.levels(name, severities)
    ]


def _builder(data, name: str, severity: int | None, seed: int, corrupt: ItemCorruption | None):
    def build(store: Path):
        if isinstance(data, Dataset):
            return CorruptedScenes(data, name, severity, seed, corrupt=corrupt, store=store)
        return [corrupt(batch, severity, C.sample_generator(seed, name, severity, i)) for i, batch in enumerate(data)]

    return build


class CorruptedScenes(Dataset):
    """The samples of a data set under one corruption at one severity, built as they are read.

    With `corrupt` None the corruption is a name of `fusion.data.corruptions` and `data` a reference data set:
    camera corruptions change the stored sample's images; LiDAR off replaces the LiDAR inputs by those of an
    empty sweep; other LiDAR corruptions change the raw sweep before it becomes pillars or voxels (synthetic: the scene is rendered again with `make_sample`'s points_transform,
    every other array as clean, and kept in `store` so that further models read it instead of rendering it;
    nuScenes: the sample is read again through `NuScenesDataset.points` with the corruption applied).
    With `corrupt` a callable, it is applied to each sample of `data`.
    """

    def __init__(
        self,
        data: Dataset,
        name: str,
        severity: int | None,
        seed: int = 0,
        corrupt: ItemCorruption | None = None,
        store: Path | None = None,
    ):
        self.data, self.name, self.severity, self.seed, self.corrupt = data, name, severity, seed, corrupt
        self.config = getattr(data, "config", None)
        self.scenes = reference_scenes(data)
        self.sensors = None if corrupt is not None else C.sensors_of(self.config, data_kind(self.scenes))
        self.cache = None
        if (
            corrupt is None
            and C.sensor_of(name) == "lidar"
            and name != "lidar_off"
            and data_kind(self.scenes) == "synthetic"
        ):
            from fusion.data.cache import SceneCache

            self.cache = SceneCache(self.config, self.scenes.seed, self._render, root=store) if store else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        rng = C.sample_generator(self.seed, self.name, self.severity, index)
        if self.corrupt is not None:
            return self.corrupt(self.data[index], self.severity, rng)
        if C.sensor_of(self.name) == "camera":
            sample = dict(self.data[index])
            sample["images"] = C.corrupt_images(sample["images"], self.name, self.severity, rng, self.sensors)
            return sample
        if self.name == "lidar_off":  # an empty sweep's inputs: what rendering or reading it again would give
            from fusion.data.sparse_inputs import lidar_arrays

            sample = dict(self.data[index])
            empty = np.zeros((0, self.config.lidar.point_features), dtype=np.float32)
            sample.update(lidar_arrays(empty, self.config, rng))
            return sample
        if data_kind(self.scenes) == "synthetic":
            return self.cache.get(index) if self.cache is not None else self._render(index)
        reader = copy.copy(self.scenes)  # NuScenesDataset: its points, corrupted as they are read
        read = self.scenes.points
        reader.points = lambda plan: C.corrupt_points(read(plan), self.name, self.severity, rng, self.sensors)
        return reader[index]

    def _render(self, index: int) -> dict[str, np.ndarray]:
        from fusion.data.dataset import make_sample

        rng = C.sample_generator(self.seed, self.name, self.severity, index)
        transform = lambda points: C.corrupt_points(points, self.name, self.severity, rng, self.sensors)  # noqa: E731
        return make_sample(self.config, self.scenes.seed, index, points_transform=transform)


def reference_scenes(data: Any) -> Any:
    """The SyntheticScenes or NuScenesDataset behind a reference data set (through `open_split`'s first-N
    wrapper), or None for any other data."""
    from fusion.data.dataset import SyntheticScenes
    from fusion.data.nuscenes import NuScenesDataset

    inner = getattr(data, "dataset", data)
    return inner if isinstance(inner, SyntheticScenes | NuScenesDataset) else None


def data_kind(scenes: Any) -> str:
    from fusion.data.dataset import SyntheticScenes

    return "synthetic" if isinstance(scenes, SyntheticScenes) else "nuscenes"


def evaluator(task_or_eval_fn: Task | EvalFn | None, data: Any) -> EvalFn:
    """How a model is scored: the reference metrics, a Task's mean loss or the user's eval_fn."""
    if task_or_eval_fn is None:
        scenes = reference_scenes(data)
        if scenes is None:
            raise RobustnessError("without a Task or eval_fn, data must be a reference data set (open_split)")
        return reference_evaluator(scenes)
    if isinstance(task_or_eval_fn, Task):
        return lambda model, batches: {"loss": mean_loss(model, task_or_eval_fn, batches)}
    if callable(task_or_eval_fn):
        return task_or_eval_fn
    raise RobustnessError("task_or_eval_fn must be a Task, a callable eval_fn(model, data) or None")


def reference_evaluator(scenes: Any) -> EvalFn:
    """Synthetic: `fusion.evaluate.evaluate`. nuScenes: our detection-challenge metric on the official split
    (`evaluate_results` of the results file, what `altermoma evaluate --data nuscenes` reports as "ours")."""
    from fusion.evaluate import evaluate

    if data_kind(scenes) == "synthetic":
        return lambda model, data: evaluate(model, data, progress=False)
    from fusion.data.nuscenes_tables import load_tables
    from fusion.evaluate import nuscenes_detections
    from fusion.nuscenes_eval import default_meta, evaluate_results, results_json

    tables = load_tables(scenes.dataroot, scenes.version)

    def score(model: nn.Module, data: Any) -> dict:
        modality = getattr(model, "modality", "fusion")
        meta = default_meta(modality != "lidar", modality != "camera")
        results = results_json(nuscenes_detections(model, data, progress=False), meta, model.config.data.classes)
        return evaluate_results(results, tables, scenes.split)

    return score


@torch.no_grad()
def mean_loss(model: nn.Module, task: Task, batches: Iterable) -> float:
    """The task loss averaged over batches, the model in eval mode."""
    model.eval()
    losses = [float(task.loss_of(task.forward(model, batch), batch)) for batch in batches]
    if not losses:
        raise RobustnessError("no batches to evaluate")
    return sum(losses) / len(losses)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics (mAP, NDS, mATE, ...; per-class tables left out), as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float | np.floating | np.integer) and not isinstance(v, bool)
    }


def same_inputs(configs: Mapping[str, Any]) -> None:
    """Models compared on the same scenes must read the same inputs: the data, grid, rig and LiDAR sections of
    their configs (and the LiDAR encoder's input format) must agree; the first difference is named."""
    import dataclasses

    def described(config) -> dict:
        flat = {}
        for part in ("data", "grid", "rig", "lidar"):
            for key, value in dataclasses.asdict(getattr(config, part)).items():
                flat[f"{part}.{key}"] = value
        flat["model.lidar_encoder"] = config.model.lidar_encoder
        return flat

    (first, reference), *others = [(label, described(c)) for label, c in configs.items()]
    for label, flat in others:
        for key in reference:
            if flat.get(key) != reference[key]:
                raise RobustnessError(
                    f"{label} reads other inputs than {first} ({key}: {flat.get(key)!r} vs {reference[key]!r}); "
                    "robustness compares models on the same scenes: give checkpoints of the same data"
                )


# ---- report ---------------------------------------------------------------------------------------------


def markdown_table(result: Mapping, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One table per metric: a row per (corruption, severity), a column per model, each cell the value and its
    ratio to the model's clean value."""
    models = result["models"]
    lines = []
    for metric in metrics:
        if not all(metric in result["clean"][m] for m in models):
            continue
        lines += [f"**{metric}** (in brackets: the ratio to the model's clean {metric})", ""]
        lines.append("| corruption | severity | parameter | " + " | ".join(models) + " |")
        lines.append("| --- | ---: | --- | " + " | ".join("---:" for _ in models) + " |")
        lines.append("| clean | | | " + " | ".join(f"{result['clean'][m][metric]:.4f}" for m in models) + " |")
        for (name, severity, parameter), rows in _grouped(result["rows"]).items():
            cells = []
            for m in models:
                row = rows.get(m)
                value, ratio = (row["metrics"].get(metric), row["ratios"].get(metric)) if row else (None, None)
                cells.append(
                    "-" if value is None else f"{value:.4f}" + (f" ({ratio:.2f})" if ratio is not None else "")
                )
            lines.append(f"| {name} | {severity or '-'} | {parameter} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _grouped(rows: Sequence[Mapping]) -> dict[tuple, dict[str, Mapping]]:
    grouped: dict[tuple, dict[str, Mapping]] = {}
    for row in rows:
        grouped.setdefault((row["corruption"], row["severity"], row["parameter"]), {})[row["model"]] = row
    return grouped


def write_plots(result: Mapping, folder: Path, metric: str = "mAP") -> list[str]:
    """One plot per graded corruption (metric against severity, 0 = clean, a line per model) and one bar chart
    of the on/off failures; returns the file names written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models, written = result["models"], []
    if not all(metric in result["clean"][m] for m in models):
        return written
    graded: dict[str, dict[str, list]] = {}
    on_off: dict[str, dict[str, float]] = {}
    for row in result["rows"]:
        value = row["metrics"].get(metric)
        if row["severity"] is None:
            on_off.setdefault(row["corruption"], {})[row["model"]] = value
        else:
            graded.setdefault(row["corruption"], {}).setdefault(row["model"], []).append((row["severity"], value))
    for name, lines in graded.items():
        figure = Figure(figsize=(5, 3.5))
        axes = figure.add_subplot()
        for label in models:
            points = [(0, result["clean"][label][metric]), *sorted(lines.get(label, []))]
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes.set(title=name, xlabel="severity (0: clean)", ylabel=metric, xticks=[0, *result["severities"]])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        FigureCanvasAgg(figure).print_png(folder / f"{name}.png")
        written.append(f"{name}.png")
    if on_off:
        figure = Figure(figsize=(max(5, 1.2 * (len(on_off) + 1)), 3.5))
        axes = figure.add_subplot()
        groups = ["clean", *on_off]
        width = 0.8 / len(models)
        for i, label in enumerate(models):
            values = [result["clean"][label][metric], *(on_off[g].get(label, np.nan) for g in on_off)]
            axes.bar(np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width, values, width, label=label)
        axes.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=7)
        axes.set(title="sensor failures", ylabel=metric)
        axes.legend(fontsize=7)
        figure.tight_layout()
        FigureCanvasAgg(figure).print_png(folder / "sensor_failures.png")
        written.append("sensor_failures.png")
    return written


def write_report(result: Mapping, out: str | Path, extra: Mapping | None = None) -> Path:
    """`robustness.md` (the tables), `robustness.json` (everything) and `plots/`, staged and swapped in whole."""
    import json

    from common.io import staged_directory

    out = Path(out)
    with staged_directory(out, kind=KIND) as stage:
        (stage / "plots").mkdir()
        plots = write_plots(result, stage / "plots")
        document = {**(extra or {}), **result, "plots": [f"plots/{p}" for p in plots]}
        header = [f"# Robustness ({extra.get('scenes', '?')} val scenes, seed {result['seed']})", ""] if extra else []
        (stage / "robustness.md").write_text("\n".join([*header, markdown_table(result)]))
        (stage / "robustness.json").write_text(json.dumps(document, indent=2, default=float))
    return out
