"""Pruning and fail-safety (issue 27): at 50% GFLOPs, how much of the unpruned model's robustness to sensor
failures does each pruning method keep, and does modality dropout during fine-tuning keep it?

    python -m benchmarks.robustness_compare --seeds 0 1 2 --out reports/robustness/full \\
        [--models tiny-fusion tiny-balanced-fusion] [--methods altereva snip magnitude] [--target 0.5]
        [--steps 300] [--dropout 0.3] [--scenes 100] [--severity 3] [--corruptions sensor_failures,extrinsic]
        [--work runs/robustness-compare] [--threads 1] [--label TEXT]

For every shipped fusion model, seed and method: `altermoma prune --target-gflops T --seed S`, then
`altermoma finetune --steps N` plain and with `--modality-dropout P`, then `altermoma robustness` of each
fine-tuned model, of the unpruned model and of the camera-only model (LiDAR off only: the issue's bar for a
fusion model without its LiDAR is 80% of the camera-only model), all on the same val scenes and corruptions.
Each step is the CLI run in this process (its exact command is recorded). Steps write under --work and are
resumable: a step whose output exists, verifies against its manifest and matches the request is skipped (an
interrupted fine-tune resumes from its last checkpoint). --out gets `robustness_compare.md` (a table per
method: clean mAP, each failure's mAP and its ratio to the unpruned model's, the kept ratio of each
partition; the checks of issue 27 computed) and `robustness_compare.json` (everything).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from altermoma.cli import main as altermoma
from common.io import OutputError, atomic_write_text, staged_directory, verify_manifest
from common.progress import progress_bar
from compress.altereva import AlterEvaConfig
from fusion.checkpoint import META, TRAIN_STATE_META, WEIGHTS, CheckpointError, read_metadata, verify_files

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = Path(os.path.relpath(ROOT / "fusion" / "weights"))  # relative: the recorded commands run anywhere
CAMERA_ONLY = {"tiny-fusion": "tiny-camera", "tiny-balanced-fusion": "tiny-balanced-camera"}
KIND = "robustness-compare"
SURVIVED = 0.5  # a failure the unpruned model survives: it keeps at least half of its clean mAP
KEEP = 0.9  # issue 27: with the option, at least 90% of the unpruned model's mAP under those failures
CLEAN_COST = 0.01  # ... at no more than 1 point of clean mAP (against the plain fine-tune)
CAMERA_SHARE = 0.8  # ... and with LiDAR off at least 80% of the camera-only model's mAP


@dataclass
class Step:
    """One CLI command with the folder it writes and how to tell that folder is already done."""

    name: str
    out: Path
    argv: list[str]
    done: Callable[[], bool]
    resume: Callable[[], list[str]] = field(default=lambda: ["--overwrite"])  # extra flags when not done


# ---- steps -------------------------------------------------------------------------------------------------


# methods beyond `prune --method`'s names: AlterEva with the fail-safe option (issue 27), by its failure weight
FAILURE_WEIGHTS = {"altereva-failsafe": 1.0}


def prune_step(checkpoint: Path, method: str, seed: int, target: float, out: Path, threads: int) -> Step:
    weight = FAILURE_WEIGHTS.get(method, 0.0)
    prune_method = "altereva" if method in FAILURE_WEIGHTS else method
    argv = ["prune", "--checkpoint", str(checkpoint), "--method", prune_method, "--target-gflops", f"{target:g}"]
    argv += ["--failure-weight", f"{weight:g}"] if weight else []
    argv += ["--seed", str(seed), "--threads", str(threads), "--out", str(out)]
    wanted = (prune_method, seed, target, weight)
    # AlterEva's options as `prune` resolves them today: a model pruned under other defaults is not this step
    options = AlterEvaConfig(failure_weight=weight) if prune_method == "altereva" else None

    def done() -> bool:
        meta = checkpoint_meta(out)
        request = (meta or {}).get("pruning", {}).get("request", {})
        stored = request.get("altereva", {})
        failure = float(stored.get("failure_weight", 0.0))
        same_options = options is None or not options.differences(stored)
        return (
            bool(meta)
            and (request.get("method"), request.get("seed"), request.get("target_gflops"), failure) == wanted
            and same_options
        )

    return Step(f"prune {out.parent.name}", out, argv, done)


def finetune_step(pruned: Path, steps: int, dropout: float, out: Path, threads: int) -> Step:
    argv = ["finetune", "--checkpoint", str(pruned), "--steps", str(steps), "--threads", str(threads)]
    argv += ["--modality-dropout", f"{dropout:g}", "--out", str(out)]

    def same_run(meta: dict) -> bool:
        tune = meta.get("finetune") or {}
        source = checkpoint_meta(pruned) or {}
        return (
            tune.get("steps") == steps
            and float(tune.get("modality_dropout", 0.0)) == dropout
            and meta.get("pruning") == source.get("pruning")  # fine-tuned from this very pruned model
        )

    def done() -> bool:
        meta = checkpoint_meta(out)
        return bool(meta) and same_run(meta) and meta.get("step") == steps and newer(out, pruned)

    def resume() -> list[str]:
        meta = checkpoint_meta(out)
        partial = meta and (out / TRAIN_STATE_META).is_file() and same_run(meta) and newer(out, pruned)
        return ["--resume"] if partial and meta.get("step", 0) < steps else ["--overwrite"]

    return Step(f"fine-tune {out.parent.name} {out.name}", out, argv, done, resume)


def robustness_step(
    checkpoint: Path, corruptions: str, scenes: int, severity: int, seed: int, out: Path, threads: int
) -> Step:
    argv = ["robustness", "--checkpoint", str(checkpoint), "--corruptions", corruptions, "--scenes", str(scenes)]
    argv += ["--severity", str(severity), "--seed", str(seed), "--threads", str(threads), "--out", str(out)]

    def done() -> bool:
        try:
            verify_manifest(out, ["robustness.json", "robustness.md"])
            result = json.loads((out / "robustness.json").read_text())
        except (OutputError, OSError, ValueError):
            return False
        return (
            (out / "manifest.json").is_file()
            and result.get("checkpoints") == [str(checkpoint)]
            and result.get("scenes") == scenes
            and result.get("severities") == [severity]
            and result.get("seed") == seed
            and {row["corruption"] for row in result["rows"]} == set(expected_corruptions(checkpoint, corruptions))
            and newer(out, checkpoint)
        )

    return Step(f"robustness {out.parent.name} {out.name}", out, argv, done)


def expected_corruptions(checkpoint: Path, corruptions: str) -> list[str]:
    """The corruption names a robustness run of `checkpoint` evaluates (camera_off expands per camera)."""
    from fusion.data.corruptions import parse_names

    return parse_names(corruptions, read_metadata(checkpoint)["config"]["rig"]["num_cameras"])


def checkpoint_meta(folder: Path) -> dict | None:
    """A checkpoint's metadata if its files are whole and its own (the manifest), else None."""
    try:
        verify_files(folder, [WEIGHTS, META])
        return read_metadata(folder)
    except (CheckpointError, OSError, ValueError):
        return None


def newer(output: Path, source: Path) -> bool:
    """The output was written after its input (a pruned model redone makes its fine-tunes stale)."""
    mine, theirs = output / "manifest.json", source / "manifest.json"
    return mine.is_file() and (not theirs.is_file() or mine.stat().st_mtime >= theirs.stat().st_mtime)


@contextlib.contextmanager
def command_line(argv: list[str]) -> Iterator[None]:
    """sys.argv as the command's own, so that the checkpoint and report record `altermoma <argv>`."""
    saved = sys.argv
    sys.argv = ["altermoma", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def run_step(step: Step, timings: Path) -> bool:
    """Run a step unless its output is done (True: it ran). What it took is added to `timings` (JSON,
    {output folder: seconds}), so a report of a run resumed over several invocations still says what each
    step cost."""
    if step.done():
        return False
    extra = step.resume()
    argv = [*step.argv, *extra]
    start = time.perf_counter()
    with command_line(argv):
        status = altermoma(argv)
    if status != 0:
        raise RuntimeError(f"`altermoma {shlex.join(argv)}` failed with status {status}")
    if not step.done():
        raise RuntimeError(f"{step.out} does not verify after `altermoma {shlex.join(argv)}`")
    record = json.loads(timings.read_text()) if timings.is_file() else {}
    earlier = record.get(str(step.out), 0.0) if "--resume" in extra else 0.0  # a resumed fine-tune's first part
    record[str(step.out)] = earlier + time.perf_counter() - start
    atomic_write_text(timings, json.dumps(record, indent=1))
    return True


# ---- plan --------------------------------------------------------------------------------------------------


def tag(dropout: float) -> str:
    return "plain" if dropout == 0 else f"dropout {dropout:g}"


def plan(args: argparse.Namespace) -> tuple[list[Step], dict]:
    """Every step, and where each result lands: {model: {"unpruned", "camera", "runs": [...]}}."""
    steps: list[Step] = []
    layout: dict = {}
    robust_name = f"robust-{args.scenes}s-sev{args.severity}-seed{args.corruption_seed}"
    for model in args.models:
        checkpoint = SHIPPED / model
        work = args.work / model
        robust = lambda ckpt, out, names=args.corruptions: robustness_step(  # noqa: E731
            ckpt, names, args.scenes, args.severity, args.corruption_seed, out, args.threads
        )
        entry = {"checkpoint": str(checkpoint), "unpruned": work / f"unpruned-{robust_name}", "runs": []}
        steps.append(robust(checkpoint, entry["unpruned"]))
        camera = SHIPPED / CAMERA_ONLY[model]
        entry["camera"] = work / f"camera-only-{robust_name}"
        steps.append(robust(camera, entry["camera"], "lidar_off"))
        for seed in args.seeds:
            for method in args.methods:
                folder = work / f"{method}-{args.target:g}-seed{seed}"
                pruned = folder / "pruned"
                steps.append(prune_step(checkpoint, method, seed, args.target, pruned, args.threads))
                for dropout in (0.0, args.dropout):
                    tuned = folder / f"finetune-{args.steps}-p{dropout:g}"
                    report = folder / f"{tuned.name}-{robust_name}"
                    steps.append(finetune_step(pruned, args.steps, dropout, tuned, args.threads))
                    steps.append(robust(tuned, report))
                    entry["runs"].append(
                        {
                            "seed": seed,
                            "method": method,
                            "dropout": dropout,
                            "pruned": pruned,
                            "checkpoint": tuned,
                            "report": report,
                        }
                    )
        layout[model] = entry
    return steps, layout


# ---- results -----------------------------------------------------------------------------------------------


def maps(report: Path) -> dict[str, float]:
    """{"clean": mAP, corruption: mAP} of a one-checkpoint robustness report."""
    result = json.loads((report / "robustness.json").read_text())
    (label,) = result["models"]
    values = {"clean": result["clean"][label]["mAP"]}
    values.update({row["corruption"]: row["metrics"]["mAP"] for row in result["rows"]})
    return values


def collect(layout: dict) -> dict:
    """Per model: the unpruned and camera-only mAPs, and per run its mAPs, ratios to the unpruned model and
    the pruning's kept ratios and GFLOPs."""
    results = {}
    for model, entry in layout.items():
        unpruned = maps(entry["unpruned"])
        camera = maps(entry["camera"])
        runs = []
        for run in entry["runs"]:
            values = maps(run["report"])
            pruning = read_metadata(run["pruned"])["pruning"]
            runs.append(
                {
                    "seed": run["seed"],
                    "method": run["method"],
                    "dropout": run["dropout"],
                    "mAP": values,
                    "ratio_to_unpruned": {k: v / unpruned[k] if unpruned[k] else math.nan for k, v in values.items()},
                    "kept_ratio": {p: r["kept_ratio"] for p, r in pruning["partitions"].items()},
                    "gflops": [pruning["gflops_before"], pruning["gflops_after"]],
                    "checkpoint": str(run["checkpoint"]),
                }
            )
        results[model] = {
            "checkpoint": entry["checkpoint"],
            "unpruned": unpruned,
            "camera_only": {"clean": camera["clean"], "lidar_off": camera.get("lidar_off")},
            "runs": runs,
        }
    return results


def mean_of(runs: list[dict], key: str, item: str) -> tuple[float, float]:
    values = [r[key][item] for r in runs]
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else math.nan


def columns(unpruned: dict[str, float]) -> list[str]:
    """The table's failure columns: every corruption, the cameras one by one folded into their mean."""
    names = [k for k in unpruned if k != "clean" and not k.startswith("camera_off_")]
    cameras = [k for k in unpruned if k.startswith("camera_off_")]
    if cameras:
        names.insert(1 if "cameras_off" in names else 0, "camera_off (mean)")
    return names


def value(values: dict[str, float], column: str) -> float:
    if column == "camera_off (mean)":
        return float(np.mean([v for k, v in values.items() if k.startswith("camera_off_")]))
    return values[column]


def checks(result: dict, methods: list[str], dropout: float) -> dict:
    """Issue 27's bar per method and fine-tune (mean over seeds): under every failure the unpruned model
    survives (>= 50% of its clean mAP), >= 90% of the unpruned model's mAP; clean mAP within 1 point of the
    plain fine-tune; with LiDAR off, >= 80% of the camera-only model's mAP."""
    unpruned, camera = result["unpruned"], result["camera_only"]["clean"]
    survived = [k for k in unpruned if k != "clean" and unpruned[k] >= SURVIVED * unpruned["clean"]]
    out = {"survived_by_unpruned": survived, "camera_only_clean": camera, "methods": {}}
    for method in methods:
        for p in sorted({0.0, dropout}):
            runs = [r for r in result["runs"] if r["method"] == method and r["dropout"] == p]
            plain = [r for r in result["runs"] if r["method"] == method and r["dropout"] == 0.0]
            if not runs:
                continue
            kept = {k: float(np.mean([r["mAP"][k] for r in runs])) / unpruned[k] for k in survived}
            lost = {k: v for k, v in kept.items() if v < KEEP}
            clean = float(np.mean([r["mAP"]["clean"] for r in runs]))
            cost = float(np.mean([r["mAP"]["clean"] for r in plain])) - clean
            lidar_off = float(np.mean([r["mAP"].get("lidar_off", math.nan) for r in runs]))
            out["methods"][f"{method}, {tag(p)}"] = {
                "kept_under_survived": kept,
                "below_90_percent": lost,
                "keeps_90_percent": not lost,
                "clean": clean,
                "clean_cost_vs_plain": cost,
                "clean_within_1_point": cost <= CLEAN_COST,
                "lidar_off_share_of_camera_only": lidar_off / camera if camera else math.nan,
                "lidar_off_80_percent": bool(camera and lidar_off >= CAMERA_SHARE * camera),
            }
    return out


def cell(mean: float, std: float) -> str:
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def markdown(summary: dict) -> str:
    config = summary["config"]
    lines = [f"# Pruning and fail-safety: {config['label']}", ""]
    lines += ["Command:", "", "```bash", summary["command"], "```", ""]
    lines.append(
        f"{', '.join(config['models'])}; methods {', '.join(config['methods'])}, structured, "
        f"{config['target']:.0%} of the GFLOPs removed; seeds {', '.join(map(str, config['seeds']))}; fine-tune "
        f"{config['steps']} steps plain and with `--modality-dropout {config['dropout']:g}`; robustness on the "
        f"first {config['scenes']} val scenes, corruptions `{config['corruptions']}` at severity "
        f"{config['severity']}. Commit {summary['commit']}; the {summary['steps']} steps took "
        f"{summary['seconds_of_steps'] / 60:.0f} min at {config['threads']} thread(s) on a shared 2-core machine "
        "(per step: the JSON)."
    )
    lines += ["", "The steps, as run (the references, then one seed and method; paths under `--work`):", ""]
    for argv in summary["example_commands"]:
        lines.append(f"- `altermoma {shlex.join(argv)}`")
    for model, result in summary["results"].items():
        unpruned = result["unpruned"]
        names = columns(unpruned)
        parts = sorted({p for r in result["runs"] for p in r["kept_ratio"]})
        lines += ["", f"## {model}", ""]
        lines.append(
            "mAP (mean over seeds ± std where several); in brackets the ratio to the unpruned model's mAP under "
            "the same failure. `camera_off (mean)`: one camera black, mean over the cameras. Kept: the share of "
            "each partition's channels the pruning kept."
        )
        header = ["model", "clean", *names, *(f"kept {p}" for p in parts)]
        for method in summary["config"]["methods"]:
            lines += ["", f"### {method}", ""]
            lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
            lines.append(
                "| unpruned | "
                + " | ".join(f"{value(unpruned, c):.3f}" for c in ["clean", *names])
                + " |"
                + " 1.00 |" * len(parts)
            )
            for p in sorted({0.0, summary["config"]["dropout"]}):
                runs = [r for r in result["runs"] if r["method"] == method and r["dropout"] == p]
                if not runs:
                    continue
                row = [f"{method}, {tag(p)}"]
                for c in ["clean", *names]:
                    vals = [value(r["mAP"], c) for r in runs]
                    mean, std = float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else math.nan
                    row.append(f"{cell(mean, std)} ({mean / value(unpruned, c):.2f})")
                row += [f"{mean_of(runs, 'kept_ratio', part)[0]:.2f}" for part in parts]
                lines.append("| " + " | ".join(row) + " |")
        verdict = result["checks"]
        lines += ["", f"### Issue 27's bar ({model})", ""]
        lines.append(
            f"Failures the unpruned model survives (>= {SURVIVED:.0%} of its clean mAP): "
            f"{', '.join(verdict['survived_by_unpruned'])}. Camera-only model, clean: "
            f"{verdict['camera_only_clean']:.3f}."
        )
        lines += [
            "",
            "| model | worst ratio to unpruned under those | below 90% | clean cost vs plain | LiDAR off / camera-only |",
            "| --- | ---: | --- | ---: | ---: |",
        ]
        for name, c in verdict["methods"].items():
            worst = min(c["kept_under_survived"].values()) if c["kept_under_survived"] else math.nan
            below = ", ".join(f"{k} {v:.2f}" for k, v in c["below_90_percent"].items()) or "none"
            lines.append(
                f"| {name} | {worst:.2f} | {below} | {c['clean_cost_vs_plain'] * 100:+.1f} points | "
                f"{c['lidar_off_share_of_camera_only']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- command -----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness_compare", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for robustness_compare.md and .json")
    p.add_argument("--models", nargs="+", default=["tiny-fusion"], choices=sorted(CAMERA_ONLY))
    p.add_argument("--methods", nargs="+", default=["altereva", "snip", "magnitude"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--target", type=float, default=0.5, help="fraction of GFLOPs removed (default 0.5)")
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps (default 300)")
    p.add_argument("--dropout", type=float, default=0.3, help="modality dropout of the second fine-tune")
    p.add_argument("--scenes", type=int, default=100, help="val scenes (default 100)")
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--corruptions", default="sensor_failures,extrinsic")
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruptions' draws (default 0)")
    p.add_argument("--work", type=Path, default=Path("runs/robustness-compare"), help="checkpoints and reports")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="measured run", help="the report's title")
    args = p.parse_args(argv)
    if any(s >= 6 or s < 0 for s in args.seeds):
        p.error("seeds are 0..5 (method-comparison seeds 6 and above are held out)")
    if not 0 < args.dropout < 1:
        p.error(f"--dropout must be in (0, 1), got {args.dropout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    steps, layout = plan(args)
    args.work.mkdir(parents=True, exist_ok=True)
    record = args.work / "timings.json"
    start, ran = time.perf_counter(), 0
    bar = progress_bar(steps, desc="robustness-compare", unit="step")
    for step in bar:
        bar.set_postfix_str(step.name)
        ran += run_step(step, record)
    bar.close()
    seconds = json.loads(record.read_text()) if record.is_file() else {}
    timings = [{"step": s.name, "out": str(s.out), "seconds": seconds.get(str(s.out))} for s in steps]
    results = collect(layout)
    for result in results.values():
        result["checks"] = checks(result, args.methods, args.dropout)
    summary = {
        "command": shlex.join(["python", "-m", "benchmarks.robustness_compare", *(argv or sys.argv[1:])]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "commit": commit(),
        "machine": platform.platform(),
        "seconds_this_invocation": time.perf_counter() - start,
        "seconds_of_steps": sum(t["seconds"] or 0.0 for t in timings),
        "steps": len(steps),
        "steps_run_now": ran,
        "timings": timings,
        "example_commands": [s.argv for s in steps[:7]],  # the references, then one seed and method's steps
        "results": results,
    }
    with staged_directory(args.out, kind=KIND) as stage:
        (stage / "robustness_compare.json").write_text(json.dumps(summary, indent=2, default=float))
        (stage / "robustness_compare.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {args.out}/robustness_compare.md and robustness_compare.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
