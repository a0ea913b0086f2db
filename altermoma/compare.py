"""Method comparison on the shipped tiny fusion checkpoint: methods x targets x seeds, one harness.

Every run prunes the same checkpoint with the same scoring set (drawn per seed), the same target
(GFLOPs reduction for structured runs, sparsity for unstructured ones) and the same fine-tune budget
(IMP spreads it over its levels; see `compress.baselines`), then is evaluated on the same synthetic
val split. The seed changes the scoring set, random scores and the fine-tune data order. Each
finished run is written to `--out/runs/<key>.json` and skipped when present with the same settings,
so an interrupted comparison resumes where it stopped, and two invocations may share a folder (each
skips what the other has finished; give them different seeds or targets to split the work).

    python -m altermoma.compare --quick                # 1 seed, 50% GFLOPs, 50 fine-tune steps (~3 min)
    python -m altermoma.compare                        # the full grid, 3 seeds (about an hour on 2 cores)

Besides the methods, the full grid runs `altereva-eq13` at 50% GFLOPs: AlterEva scored exactly as the
paper's Eq. 13, without the floor our AlterEva applies (see `compress.scores`), so the departure is
measured rather than asserted.
    python -m altermoma.compare --scoring-cost         # per-method scoring time and peak memory

torch and the packages are imported inside the functions, so registering `altermoma compare` costs nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.argtypes import non_negative_int, positive_int
from common.io import check_inputs_not_outputs, check_writable_folder
from fusion.data.source import add_data_args, source_from_args

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights" / "tiny-fusion"
METHODS = ("altereva", "snip", "magnitude", "random", "synflow", "prospr", "imp")
# the peers a user would pick instead: torch-pruning's importances and NVIDIA ModelOpt's FastNAS (structured only)
PEERS = ("tp-magnitude", "tp-taylor", "tp-hessian", "fastnas")
STRUCTURED_TARGETS = (0.3, 0.5, 0.7)
SPARSITIES = (0.8, 0.85, 0.9)
BETAS = (0.0, 0.5, 1.0, 1.5, 2.0)  # AlterEva beta/alpha, alpha = 1
SWEEP_TARGET = 0.5
EQ13 = "altereva-eq13"  # AlterEva with printed Eq. 13 scores; run at SWEEP_TARGET only


PAPER_OPTIONS = {  # AlterEva as printed: Eq. 10 on D and D_B, SGD, Eq. 11-13's shares, |ReRI|, one reactivation
    "reri_data": "paper",
    "reactivation_optimizer": "sgd",
    "normalise": "partition",
    "penalty": "reri",
    "restarts": 1,
    "subtract_noise": False,
}
V2_RESTARTS = 4  # protocol v2: one restart per scoring batch (the scoring set has 4)


def _altereva_variants() -> dict[str, dict]:
    """AlterEva estimator variants, run when named in --methods. Each names its departures from the paper
    ("altereva-paper" has none) and sets every option, so a name means the same runs whatever
    AlterEvaConfig's defaults are; plain "altereva" is the toolkit default.
    Protocol v1 (issue 13): same: ReRI on D at both points; adamw: the reactivation optimiser; model: shares
    over the whole model. Protocol v2 (issue 25), ours, each on the paper form with SGD: residual, signed
    (penalties), budget (shares by masked-loss increase), restarts (4 reactivations averaged), denoised (the
    zero-step floor taken off each unit's penalty), and v2 (signed + budget + restarts + denoised); lowlr
    (exploratory, not a v2 candidate: AdamW at lr 1e-5, denoised)."""
    variants = {}
    for same in (False, True):
        for adamw in (False, True):
            for model in (False, True):
                name = "altereva" + "-same" * same + "-adamw" * adamw + "-model" * model
                variants[name if name != "altereva" else "altereva-paper"] = PAPER_OPTIONS | {
                    "reri_data": "same" if same else "paper",
                    "reactivation_optimizer": "adamw" if adamw else "sgd",
                    "normalise": "model" if model else "partition",
                }
    budget, restarts, denoised = {"normalise": "masked-loss"}, {"restarts": V2_RESTARTS}, {"subtract_noise": True}
    variants["altereva-residual"] = PAPER_OPTIONS | {"penalty": "residual"}
    variants["altereva-signed"] = PAPER_OPTIONS | {"penalty": "signed"}
    variants["altereva-budget"] = PAPER_OPTIONS | budget
    variants["altereva-restarts"] = PAPER_OPTIONS | restarts
    variants["altereva-denoised"] = PAPER_OPTIONS | denoised
    variants["altereva-v2"] = PAPER_OPTIONS | {"penalty": "signed"} | budget | restarts | denoised
    # exploratory, after protocol v2's stage A (not one of its candidates): the one reactivation setting that
    # lowered bevfusion-tiny's LiDAR-masked loss (reports/protocol-v2/reactivation-signs), with the chosen floor
    variants["altereva-lowlr"] = PAPER_OPTIONS | denoised | {"reactivation_optimizer": "adamw", "reactivation_lr": 1e-5}
    return variants


ALTEREVA_VARIANTS = _altereva_variants()
METRICS = ("mAP", "NDS", "mIoU", "mATE", "mASE", "mAOE")
PARTS = ("camera", "lidar", "fusion")


@dataclass(frozen=True)
class Settings:
    """Everything besides the run itself that changes a result; stored with every run."""

    checkpoint: str
    finetune_steps: int = 100
    train_scenes: int = 200
    val_scenes: int = 100
    threads: int = 2
    synflow_iterations: int = 100
    imp_levels: int = 3
    data: str = "synthetic"  # or "nuscenes" (then dataroot and version name the root)
    dataroot: str = ""
    version: str = ""

    def source(self):
        from fusion.data.source import DataSource

        return DataSource(self.data, Path(self.dataroot) if self.dataroot else None, self.version or "v1.0-mini")

    def stored(self) -> dict:
        """As stored with a run; the data fields only when not synthetic, so runs made before they existed stay valid."""
        values = dataclasses.asdict(self)
        if self.data == "synthetic":
            for key in ("data", "dataroot", "version"):
                values.pop(key)
        return values


@dataclass(frozen=True)
class RunSpec:
    method: str
    kind: str  # "structured" (target = GFLOPs reduction) or "unstructured" (target = sparsity)
    target: float
    seed: int
    beta: float = 1.0  # AlterEva's beta/alpha; other methods ignore it

    @property
    def key(self) -> str:
        beta = f"-beta{self.beta:g}" if self.method == "altereva" and self.beta != 1.0 else ""
        return f"{self.kind}-{self.target:g}-{self.method}{beta}-seed{self.seed}"


def plan(
    methods: tuple[str, ...],
    seeds: int | list[int],
    quick: bool,
    structured_targets: tuple[float, ...] = STRUCTURED_TARGETS,
    sparsities: tuple[float, ...] = SPARSITIES,
    sweep: bool = True,
) -> list[RunSpec]:
    """The runs of a comparison, deduplicated (the beta = 1 sweep point is the main AlterEva run).

    `seeds` is a count (seeds 0..n-1) or the seeds themselves (a protocol's development or confirmation
    seeds); `sweep` adds AlterEva's beta sweep and the printed Eq. 13 at SWEEP_TARGET."""
    runs = []
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        for target in (SWEEP_TARGET,) if quick else structured_targets:
            runs += [RunSpec(m, "structured", target, seed) for m in methods]
        if quick:
            continue
        if sweep and "altereva" in methods:  # the sweep before the long unstructured grid: it answers more per run
            runs += [RunSpec("altereva", "structured", SWEEP_TARGET, seed, beta) for beta in BETAS]
            runs.append(RunSpec(EQ13, "structured", SWEEP_TARGET, seed))
        for sparsity in sparsities:
            runs += [RunSpec(m, "unstructured", sparsity, seed) for m in methods if m not in PEERS]
    return list(dict.fromkeys(runs))


# ---- one run ------------------------------------------------------------------------------------
def prune_request(spec: RunSpec, settings: Settings):
    from compress.altereva import AlterEvaConfig
    from compress.baselines import SynFlowConfig
    from compress.request import IMPConfig, PruneRequest

    target = {"target_gflops": spec.target} if spec.kind == "structured" else {"sparsity": spec.target}
    floor = None if spec.method == EQ13 else AlterEvaConfig.floor
    variant = ALTEREVA_VARIANTS.get(spec.method, {})
    return PruneRequest(
        method="altereva" if spec.method == EQ13 or spec.method in ALTEREVA_VARIANTS else spec.method,
        seed=spec.seed,
        altereva=AlterEvaConfig(alpha=1.0, beta=spec.beta, floor=floor, **variant),
        imp=IMPConfig(levels=settings.imp_levels, finetune_steps=settings.finetune_steps),
        synflow=SynFlowConfig(iterations=settings.synflow_iterations),
        **target,
    ).validate()


def finetune_config(settings: Settings, seed: int):
    from fusion.finetune import FinetuneConfig

    return FinetuneConfig(
        steps=settings.finetune_steps, scenes=settings.train_scenes, seed=seed, threads=settings.threads
    )


def model_stats(model) -> dict:
    """GFLOPs of one sample (dense count), parameters, and non-zero prunable weights."""
    from compress.oneshot import measured_gflops
    from compress.structured import protected_layers
    from compress.unstructured import prunable_weights
    from fusion.models.bevfusion import example_inputs
    from fusion.task import reference_task

    task, example = reference_task(model), example_inputs(model.config)
    weights = prunable_weights(model, protected_layers(model, task, example))
    return {
        "gflops": measured_gflops(model, task, example),
        "params": sum(p.numel() for p in model.parameters()),
        "prunable_nonzero": sum(int((w != 0).sum()) for w in weights.values()),
        "prunable": sum(w.numel() for w in weights.values()),
    }


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(metrics[k]) for k in METRICS if k in metrics}


def run_one(spec: RunSpec, settings: Settings, base, train_set, val_set) -> dict:
    """Prune a fresh copy of `base`, fine-tune it with the shared budget, evaluate it."""
    from compress.prune import prune
    from fusion.evaluate import evaluate
    from fusion.finetune import finetune, imp_finetune_fn
    from fusion.task import first_sample, reference_task, scoring_set

    model = copy.deepcopy(base)
    request = prune_request(spec, settings)
    batches = scoring_set(
        model.config, request.scoring_batches, request.scoring_batch_size, spec.seed, settings.source()
    )
    start = time.perf_counter()
    imp_tune = imp_finetune_fn(finetune_config(settings, spec.seed), train_set, not request.structured, progress=False)
    task, example = reference_task(model), first_sample(batches[0])
    report = prune(model, task, batches, request, example_batch=example, finetune_fn=imp_tune, progress=False)
    pruned_at = time.perf_counter()
    steps = report.get("finetune_steps_remaining", settings.finetune_steps)
    if steps > 0:
        config = dataclasses.replace(finetune_config(settings, spec.seed), steps=steps)
        finetune(model, config, metadata={"pruning": report}, progress=False, train_set=train_set)
    tuned_at = time.perf_counter()
    metrics = scalar_metrics(evaluate(model, val_set, progress=False))
    return {
        "key": spec.key,
        "spec": dataclasses.asdict(spec),
        "settings": settings.stored(),
        "metrics": metrics,
        **model_stats(model),
        "gflops_reduction": report.get("gflops_reduction"),
        "sparsity": report.get("sparsity"),
        "kept_ratio": {part: r["kept_ratio"] for part, r in report["partitions"].items()},
        "seconds": {
            "prune": pruned_at - start,
            "finetune": tuned_at - pruned_at,
            "evaluate": time.perf_counter() - tuned_at,
        },
        "pruning": report,
    }


# ---- the comparison -----------------------------------------------------------------------------
def load_run(path: Path, settings: Settings) -> dict | None:
    """A stored run, if it exists and was made with the same settings."""
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return run if run.get("settings") == settings.stored() else None


def changed_options(run: dict, spec: RunSpec, settings: Settings) -> str:
    """The AlterEva options (`name stored -> now`) on which a stored run differs from what `spec` asks now
    (`AlterEvaConfig.differences`); empty for the other methods."""
    stored = run.get("pruning", {}).get("request", {}).get("altereva")
    request = prune_request(spec, settings)
    if stored is None or request.method != "altereva":
        return ""
    return ", ".join(f"{k} {old!r} -> {now!r}" for k, (old, now) in request.altereva.differences(stored).items())


def earlier_runs(runs_dir: Path, settings: Settings, planned: set[str]) -> tuple[list[dict], list[str]]:
    """The folder's stored runs outside this invocation's plan that its tables can hold (same settings, and for
    AlterEva the options its name asks today), and one line per stored run they cannot, saying why.

    A folder is one comparison: run in pieces (other methods, seeds or targets per invocation, or several
    invocations at once), its compare.json still holds all of it, not only the last invocation's plan."""
    runs, left_out = [], []
    names = (*METHODS, *PEERS, EQ13, *ALTEREVA_VARIANTS)
    for path in sorted(runs_dir.glob("*.json")):
        if path.name == "unpruned.json" or path.stem in planned:
            continue
        try:
            run = json.loads(path.read_text())
            spec = RunSpec(**run["spec"])
        except (json.JSONDecodeError, KeyError, TypeError):
            left_out.append(f"{path.name} (not a run file)")
            continue
        if run.get("settings") != settings.stored():
            left_out.append(f"{path.name} (made with other settings)")
        elif spec.method not in names:
            left_out.append(f"{path.name} (method {spec.method!r} is not known here)")
        elif changed := changed_options(run, spec, settings):
            left_out.append(f"{path.name} (other AlterEva options: {changed})")
        else:
            runs.append(run)
    return runs, left_out


def unpruned(settings: Settings, base, val_set, runs_dir: Path) -> dict | None:
    """The unpruned model's metrics, computed once per checkpoint and val split (`val_set` None: cached only)."""
    from common.io import atomic_write_text
    from fusion.evaluate import evaluate

    path = runs_dir / "unpruned.json"
    wanted = {"checkpoint": settings.checkpoint, "val_scenes": settings.val_scenes}
    if settings.data != "synthetic":
        wanted.update(data=settings.data, dataroot=settings.dataroot, version=settings.version)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") == wanted:
            return stored
    if val_set is None:
        return None
    result = {"settings": wanted, "metrics": scalar_metrics(evaluate(base, val_set, progress=False))}
    result.update(model_stats(base))
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def compare(
    out: Path,
    settings: Settings,
    methods: tuple[str, ...],
    seeds: int | list[int],
    quick: bool,
    progress: bool = True,
    **grid,
) -> dict:
    """Run (or resume) every planned run, then write compare.md, compare.json and the plots over every run the
    folder holds with these settings (`earlier_runs`: a comparison run in pieces is reported whole).

    `seeds`: a count (seeds 0..n-1) or the seeds themselves; `grid`: `plan`'s targets and sweep options."""
    import torch

    from common.io import atomic_write_text
    from fusion.checkpoint import load_checkpoint
    from fusion.data.source import check_config_fits, open_split

    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    base, _ = load_checkpoint(settings.checkpoint)  # a refused checkpoint leaves no output folder behind
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    source = settings.source()
    check_config_fits(base.config, source)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    specs = plan(methods, seed_list, quick, **grid)
    stored = {spec.key: load_run(runs_dir / f"{spec.key}.json", settings) for spec in specs}
    for spec in specs:  # a stored run is reused only if it asked for what this spec asks now (defaults move)
        if stored[spec.key] is not None and (changed := changed_options(stored[spec.key], spec, settings)):
            raise ValueError(
                f"{runs_dir / spec.key}.json was made with other AlterEva options ({changed}; AlterEva's defaults "
                f"changed since?): give --out another folder, or name the variant that made it"
            )
    todo = [spec for spec in specs if stored[spec.key] is None]
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already done", flush=True)
    reference = unpruned(settings, base, None, runs_dir)
    val_set = None
    if todo or reference is None:  # rendered once, shared by every run of this invocation
        val_set = open_split(base.config, source, "val", num_scenes=settings.val_scenes, progress=progress)
        reference = unpruned(settings, base, val_set, runs_dir)
    train_set = (
        open_split(base.config, source, "train", num_scenes=settings.train_scenes, progress=progress) if todo else None
    )
    for i, spec in enumerate(todo, 1):
        finished = load_run(runs_dir / f"{spec.key}.json", settings)  # by another invocation sharing the folder
        if finished is not None:
            stored[spec.key] = finished
            print(f"[{i}/{len(todo)}] {spec.key}: done meanwhile by another invocation", flush=True)
            continue
        run = run_one(spec, settings, base, train_set, val_set)
        atomic_write_text(runs_dir / f"{spec.key}.json", json.dumps(run, indent=2))
        stored[spec.key] = run
        m = run["metrics"]
        print(
            f"[{i}/{len(todo)}] {spec.key}: mAP {m['mAP']:.4f} NDS {m['NDS']:.4f} mIoU {m.get('mIoU', math.nan):.4f} "
            f"GFLOPs {run['gflops']:.3f} ({sum(run['seconds'].values()):.0f} s)",
            flush=True,
        )
    runs = [stored[spec.key] for spec in specs]
    others, left_out = earlier_runs(runs_dir, settings, {spec.key for spec in specs})
    if others:
        print(f"note: the tables also hold {len(others)} runs stored in {runs_dir} by earlier invocations", flush=True)
    for line in left_out:
        print(f"note: left out of the tables: {line}", flush=True)
    runs += others
    seed_list = sorted({run["spec"]["seed"] for run in runs} | set(seed_list))
    elapsed = time.perf_counter() - start
    summary = {
        "settings": dataclasses.asdict(settings),
        "seeds": len(seed_list),
        "seed_list": seed_list,
        "quick": quick,
        "unpruned": reference,
        "runs": runs,
        "seconds": elapsed,
    }
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "compare.md", markdown(summary))
    plot_map_vs_gflops(runs, reference, out / "map_vs_gflops.png")
    plot_map_vs_beta(runs, out / "map_vs_beta.png")
    print(markdown(summary))
    print(f"wrote {out / 'compare.md'} ({elapsed:.0f} s)")
    return summary


# ---- tables -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def cell(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def grouped(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped over seeds by (kind, target, method, beta), in plan order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        s = run["spec"]
        groups.setdefault((s["kind"], s["target"], s["method"], s["beta"]), []).append(run)
    return groups


def section_rows(groups: dict[tuple, list[dict]], kind: str, sweep: bool) -> list[tuple[tuple, list[dict]]]:
    """The method table of one kind (AlterEva at beta = 1 only), or the AlterEva beta sweep by beta."""
    if sweep:
        rows = [(k, v) for k, v in groups.items() if k[:3] == (kind, SWEEP_TARGET, "altereva")]
        return sorted(rows, key=lambda kv: kv[0][3])
    rows = [(k, v) for k, v in groups.items() if k[0] == kind and (k[2] != "altereva" or k[3] == 1.0)]
    return sorted(rows, key=lambda kv: kv[0][1])  # by target; methods in plan order (runs of earlier invocations last)


def _row(runs: list[dict], structured: bool) -> list[str]:
    metrics = [cell([r["metrics"].get(k, math.nan) for r in runs]) for k in ("mAP", "NDS", "mIoU")]
    if structured:
        size = [cell([r["gflops"] for r in runs], 3), cell([r["params"] / 1e6 for r in runs], 3)]
    else:
        size = [cell([r["sparsity"] for r in runs], 3), cell([r["prunable_nonzero"] / 1e6 for r in runs], 3)]
    kept = [cell([r["kept_ratio"].get(p, math.nan) for r in runs], 2) for p in PARTS]
    return metrics + size + kept


def run_seconds(runs: list[dict]) -> float:
    """Time spent in the runs themselves, however many invocations it took to finish them."""
    return sum(sum(run.get("seconds", {}).values()) for run in runs)


def target_misses(runs: list[dict]) -> dict[str, float]:
    """Per kind, the largest |achieved - target| over all runs, in percentage points."""
    misses = {"structured": 0.0, "unstructured": 0.0}
    for run in runs:
        kind = run["spec"]["kind"]
        achieved = run["gflops_reduction"] if kind == "structured" else run["sparsity"]
        misses[kind] = max(misses[kind], 100 * abs(achieved - run["spec"]["target"]))
    return misses if runs else {}


def markdown(summary: dict) -> str:
    settings, ref = summary["settings"], summary["unpruned"]
    groups = grouped(summary["runs"])
    lines = [
        "# Pruning methods compared on the tiny fusion model",
        "",
        f"Checkpoint `{settings['checkpoint']}`; synthetic val split, {settings['val_scenes']} scenes; "
        f"seeds {', '.join(map(str, summary.get('seed_list', range(summary['seeds']))))} (mean ± std over seeds); fine-tune {settings['finetune_steps']} steps for every "
        f"method (IMP: split over {settings['imp_levels']} levels), {settings['train_scenes']} training scenes; "
        f"SynFlow {settings['synflow_iterations']} iterations; {settings['threads']} thread(s). "
        f"The runs took {run_seconds(summary['runs']) / 60:.0f} min (prune + fine-tune + evaluate, summed); "
        f"this invocation {summary['seconds']:.0f} s.",
        "",
        "| model | mAP | NDS | mIoU | GFLOPs | params (M) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| unpruned | {ref['metrics']['mAP']:.4f} | {ref['metrics']['NDS']:.4f} | {ref['metrics'].get('mIoU', math.nan):.4f} "
        f"| {ref['gflops']:.3f} | {ref['params'] / 1e6:.3f} |",
    ]
    header = "| {} | method | mAP | NDS | mIoU | {} | kept camera | kept lidar | kept fusion |"
    sections = (
        ("structured", False, "Structured (target = GFLOPs reduction)", "target", "GFLOPs | params (M)"),
        (
            "unstructured",
            False,
            "Unstructured (target = sparsity of prunable weights)",
            "target",
            "sparsity | non-zero (M)",
        ),
        (
            "structured",
            True,
            f"AlterEva beta/alpha sweep ({SWEEP_TARGET:.0%} GFLOPs)",
            "beta/alpha",
            "GFLOPs | params (M)",
        ),
    )
    for kind, sweep, title, first, size in sections:
        rows = section_rows(groups, kind, sweep)
        if len(rows) < (2 if sweep else 1):
            continue
        lines += ["", f"## {title}", "", header.format(first, size), "| --- " * 10 + "|"]
        for (_, target, method, beta), runs in rows:
            label = f"{beta:g}" if sweep else f"{target:.0%}"
            lines.append(f"| {label} | {method} | " + " | ".join(_row(runs, kind == "structured")) + " |")
    lines += [
        "",
        "Kept ratios are channels (structured) or weights (unstructured) kept per partition. GFLOPs are",
        "FlopCounterMode counts of one sample; unstructured models keep their dense GFLOPs.",
    ]
    miss = target_misses(summary["runs"])
    if miss:
        lines.append(
            f"Largest miss of a target: {miss['structured']:.2f} points of GFLOPs reduction (structured), "
            f"{miss['unstructured']:.2f} points of sparsity (unstructured)."
        )
    return "\n".join(lines) + "\n"


# ---- plots --------------------------------------------------------------------------------------
def errorbar(ax, xs: list[float], stats: list[tuple[float, float]], label: str) -> None:
    """Means with one-std bars; a single seed (std NaN) draws no bar."""
    means = [mean for mean, _ in stats]
    stds = [0.0 if math.isnan(std) else std for _, std in stats]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)


def plot_map_vs_gflops(runs: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped([r for r in runs if r["spec"]["beta"] == 1.0 or r["spec"]["method"] != "altereva"])
    kinds = [k for k in ("structured", "unstructured") if any(key[0] == k for key in groups)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        x_of = (lambda r: r["gflops"]) if kind == "structured" else (lambda r: r["sparsity"])
        for method in (*METHODS, *PEERS, EQ13, *ALTEREVA_VARIANTS):
            points = sorted((k[1], v) for k, v in groups.items() if k[0] == kind and k[2] == method)
            if not points:
                continue
            xs = [mean_std([x_of(r) for r in v])[0] for _, v in points]
            errorbar(ax, xs, [mean_std([r["metrics"]["mAP"] for r in v]) for _, v in points], method)
        ref = reference["metrics"]["mAP"]
        if kind == "structured":
            ax.axhline(ref, color="black", linestyle="--", linewidth=0.8)
            ax.scatter([reference["gflops"]], [ref], marker="*", s=150, color="black", zorder=5, label="unpruned")
        else:  # the unpruned model sits at sparsity 0, far left of the grid: a line only
            ax.axhline(ref, color="black", linestyle="--", linewidth=0.8, label="unpruned")
        ax.set_xlabel("GFLOPs" if kind == "structured" else "sparsity")
        ax.set_ylabel("mAP")
        ax.set_title(f"{kind} pruning + fine-tune")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_map_vs_beta(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = {
        k[3]: v
        for k, v in grouped(runs).items()
        if k[0] == "structured" and k[1] == SWEEP_TARGET and k[2] == "altereva"
    }
    if len(sweep) < 2:
        return
    betas = sorted(sweep)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for metric in ("mAP", "NDS"):
        errorbar(ax, betas, [mean_std([r["metrics"][metric] for r in sweep[b]]) for b in betas], metric)
    ax.set_xlabel("beta / alpha")
    ax.set_title(f"AlterEva at {SWEEP_TARGET:.0%} GFLOPs reduction")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- scoring cost -------------------------------------------------------------------------------
COST_KINDS = ("magnitude", "random", "snip", "altereva", "synflow", "prospr-full", "prospr-first-order")


def _cost_child(kind: str, threads: int, synflow_iterations: int) -> dict:
    """Score the channels of a random-weight tiny model once; time and peak RSS beyond setup."""
    import torch

    from altermoma.scoring_cost import cost_of
    from compress.baselines import ProsprConfig, SynFlowConfig
    from compress.oneshot import channel_scores
    from compress.request import PruneRequest
    from compress.structured import ChannelGraph
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model
    from fusion.task import first_sample, reference_task, scoring_set

    torch.set_num_threads(threads)
    config = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(config).eval()
    method, _, mode = kind.partition("-")
    request = PruneRequest(
        method=method,
        target_gflops=0.5,
        synflow=SynFlowConfig(iterations=synflow_iterations),
        prospr=ProsprConfig(mode=mode or "full"),
    )
    batches = scoring_set(config, request.scoring_batches, request.scoring_batch_size)
    task, example = reference_task(model), first_sample(batches[0])
    graph = ChannelGraph(model, task, example)
    return cost_of(kind, lambda: channel_scores(method, model, task, graph, batches, example, request, progress=False))


def scoring_cost(out: Path, threads: int, synflow_iterations: int) -> list[dict]:
    """Each criterion in a fresh subprocess, so peak RSS belongs to that criterion alone."""
    from altermoma.scoring_cost import child_rows, write_report

    args = ["--cost-child", "--threads", str(threads), "--synflow-iterations", str(synflow_iterations)]
    rows = child_rows("altermoma.compare", COST_KINDS, args, echo=True)
    lines = [
        f"# Channel-scoring cost per criterion (tiny preset, random weights, {threads} thread(s))",
        "",
        "Scoring set 4 batches x 2 scenes; AlterEva B = 8; ProsPr M = 3; SynFlow batch 1, float64, "
        f"{synflow_iterations} iterations. Extra peak RSS = peak minus RSS after setup, in a fresh process.",
        "",
        "| criterion | seconds | extra peak RSS (MiB) | peak RSS (MiB) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['kind']} | {r['seconds']:.2f} | {r['extra_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |" for r in rows
    ]
    lines += ["", f"Measured with `python -m altermoma.compare --scoring-cost --threads {threads}`."]
    write_report(out, lines, rows)
    return rows


# ---- command line -------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    """`3,4,5` -> [3, 4, 5]: distinct whole numbers >= 0."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers >= 0, got {text!r}")
    return values


def _fraction_list(text: str) -> tuple[float, ...]:
    """`0.5,0.9` -> (0.5, 0.9); `none` -> () to skip that kind of pruning."""
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions or 'none', got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions strictly between 0 and 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        help="output directory (default: reports/compare; --quick: reports/compare-quick, never the full grid's)",
    )
    p.add_argument("--checkpoint", default=str(SHIPPED), help="unpruned fusion checkpoint (default: shipped tiny)")
    p.add_argument("--quick", action="store_true", help="1 seed, 50%% GFLOPs only, 50 fine-tune steps")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--seeds", type=positive_int, help="number of seeds, 0..n-1 (default 3; --quick: 1)")
    p.add_argument(
        "--seed-list", type=_int_list, help="the seeds themselves, e.g. 3,4,5 (a protocol's confirmation seeds)"
    )
    p.add_argument(
        "--structured-targets",
        type=_fraction_list,
        default=STRUCTURED_TARGETS,
        help="GFLOPs reductions (default 0.3,0.5,0.7; none: skip)",
    )
    p.add_argument(
        "--sparsities", type=_fraction_list, default=SPARSITIES, help="unstructured sparsities (default 0.8,0.85,0.9)"
    )
    p.add_argument("--no-sweep", action="store_true", help="skip AlterEva's beta sweep and the Eq. 13 row")
    p.add_argument(
        "--finetune-steps", type=non_negative_int, help="fine-tune budget per method (default 100; --quick: 50)"
    )
    p.add_argument(
        "--train-scenes", type=positive_int, default=200, help="training scenes for fine-tuning (default 200)"
    )
    p.add_argument("--val-scenes", type=positive_int, default=100, help="val scenes (default 100)")
    p.add_argument("--synflow-iterations", type=positive_int, default=100)
    p.add_argument("--imp-levels", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--scoring-cost", action="store_true", help="measure per-criterion scoring time and memory instead")
    p.add_argument("--cost-child", choices=COST_KINDS, help=argparse.SUPPRESS)
    add_data_args(p)


def _data_settings(args: argparse.Namespace) -> dict:
    source = source_from_args(args)
    if source.kind == "synthetic":
        return {}
    return {"data": source.kind, "dataroot": str(source.dataroot), "version": source.version}


def run_from_args(args: argparse.Namespace) -> dict | list:
    if args.cost_child:
        print(json.dumps(_cost_child(args.cost_child, args.threads, args.synflow_iterations)))
        return []
    out = Path(args.out or ("reports/compare-quick" if args.quick else "reports/compare"))
    if args.scoring_cost:
        return scoring_cost(Path(args.out or "reports/compare"), args.threads, args.synflow_iterations)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS) - set(PEERS) - set(ALTEREVA_VARIANTS))
    if unknown:
        choices = ", ".join((*METHODS, *PEERS, *ALTEREVA_VARIANTS))
        raise ValueError(f"unknown method {unknown[0]!r} (choose from {choices})")
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    quick = args.quick

    def pick(value, full, fast):
        return value if value is not None else (fast if quick else full)

    settings = Settings(
        checkpoint=str(args.checkpoint),
        finetune_steps=pick(args.finetune_steps, 100, 50),
        train_scenes=args.train_scenes,
        val_scenes=args.val_scenes,
        threads=args.threads,
        synflow_iterations=args.synflow_iterations,
        imp_levels=args.imp_levels,
        **_data_settings(args),
    )
    check_writable_folder(out)
    check_inputs_not_outputs({"--out": out}, {"--checkpoint": args.checkpoint, "--dataroot": args.dataroot})
    stored = out / "compare.json"
    if stored.is_file() and json.loads(stored.read_text()).get("quick", quick) != quick:
        raise ValueError(f"{out} holds a {'full' if quick else '--quick'} comparison; give --out another folder")
    if args.seed_list is not None and args.seeds is not None:
        raise ValueError("give --seeds (a count) or --seed-list, not both")
    seeds = args.seed_list if args.seed_list is not None else pick(args.seeds, 3, 1)
    grid = {"structured_targets": args.structured_targets, "sparsities": args.sparsities, "sweep": not args.no_sweep}
    return compare(out, settings, methods, seeds, quick, **grid)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `altermoma compare` on the CLI's subparsers."""
    p = sub.add_parser("compare", help="compare pruning methods (AlterEva and baselines) at equal GFLOPs and budget")
    add_arguments(p)
    p.set_defaults(run=run_from_args)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
