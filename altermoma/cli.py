"""The `altermoma` command: parses arguments and calls the packages, nothing more.

Errors a user can fix (a wrong path, a bad ratio, an unknown config key) are printed as one line
starting with "error:" and exit with status 2; anything else is a bug and keeps its traceback.

The compute verbs (train, prune, finetune, pipeline, evaluate) also run under
`torchrun --nproc_per_node=N -m altermoma ...`: every rank runs the same command, rank 0 alone prints
and writes, and a failing rank's messages start with "rank R/N:" (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from altermoma.cli_common import load_any_checkpoint, threads_of
from altermoma.cli_data import add_data_parsers
from altermoma.cli_deploy import add_parsers as add_deploy_parsers
from altermoma.cli_help import apply_flow
from altermoma.cli_latency import add_latency_table_parser
from altermoma.cli_quant import add_quantize_parser
from altermoma.cli_robustness import add_robustness_parser
from altermoma.compare import add_parser as add_compare_parser
from common import dist
from common.argtypes import Parser, non_negative_int, positive_float, positive_int
from common.io import check_replaceable
from compress.altereva import REACTIVATION_OPTIMIZERS, RERI_DATA, AlterEvaConfig
from compress.partition import PartitionError
from compress.scores import NORMALISE, PENALTIES
from compress.structured import PruningError
from export.runtime import TensorRTUnavailable
from fusion.checkpoint import CheckpointError
from fusion.config import ConfigError
from fusion.data.source import add_data_args, source_from_args

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"
DISTRIBUTED_VERBS = ("train", "prune", "finetune", "pipeline", "evaluate")
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    PartitionError,
    PruningError,
    TensorRTUnavailable,
    dist.RankMismatchError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def shipped_checkpoint(modality: str, preset: str = "tiny") -> Path:
    return SHIPPED / f"{preset}-{modality}"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny | small | r50 (default: tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. train.steps=500 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    from fusion.config import get_config, parse_override

    return get_config(args.preset, dict(parse_override(o) for o in args.overrides))


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from fusion.checkpoint import TRAIN_STATE_META, read_weights
    from fusion.data.source import check_config_fits, open_split
    from fusion.models.bevfusion import build_model
    from fusion.train import check_resumable, fit, load_pretrained

    config = config_from_args(args)
    source = source_from_args(args)
    check_config_fits(config, source)
    if dist.is_distributed() and not any(o.split("=", 1)[0].strip() == "train.threads" for o in args.overrides):
        config.train.threads = dist.default_threads()
    if not args.resume:
        check_replaceable(args.out, ("checkpoint",), args.overwrite)
    sources = {name: path for name, path in (("lidar", args.init_lidar), ("camera", args.init_camera)) if path}
    check_init_sources(sources, args.modality, config.preset)
    torch.manual_seed(config.train.seed)  # the initial weights are part of "same seed, same result"
    model = build_model(config, args.modality)
    metadata = {"command": " ".join(["altermoma", *sys.argv[1:]]), **source.describe()}
    # LiDAR first: its decoder and heads initialise the fusion model's (as in BEVFusion); the camera
    # checkpoint then contributes only what the LiDAR one lacks, the camera branch.
    if sources:
        loaded = load_pretrained(model, {name: read_weights(path) for name, path in sources.items()})
        metadata["initialised_from"] = {
            name: {"checkpoint": str(p), "tensors": loaded[name]} for name, p in sources.items()
        }
        print(f"initialised from {', '.join(f'{k}: {v} tensors' for k, v in loaded.items())}")
    if args.resume and (Path(args.out) / TRAIN_STATE_META).is_file():
        check_resumable(Path(args.out), config.train)  # before rendering: a refused resume costs nothing
    train_set = open_split(config, source, "train")
    fit(
        model,
        train_set,
        config.train,
        out_dir=args.out,
        resume=args.resume,
        metadata=metadata,
        desc=f"train {args.modality}",
        sync_bn=args.sync_bn,
    )
    print(f"saved {args.out}")


def check_init_sources(sources: dict[str, str], modality: str, preset: str) -> None:
    """--init-camera must be a camera-only checkpoint and --init-lidar a LiDAR-only one, of this preset:
    swapped, they would load the wrong half of the model without complaint."""
    from fusion.checkpoint import read_metadata

    if sources and modality != "fusion":
        raise ValueError("--init-camera/--init-lidar initialise a fusion model: use them with --modality fusion")
    for role, path in sources.items():
        meta = read_metadata(path)
        found = meta.get("modality")
        if found != role:
            raise ValueError(f"--init-{role} {path} is a {found} checkpoint, not a {role}-only one (swapped?)")
        if meta.get("config", {}).get("preset") != preset:
            raise ValueError(f"--init-{role} {path} is preset {meta.get('config', {}).get('preset')!r}, not {preset!r}")


def check_output_file(path: str | Path, what: str) -> None:
    """A file to be written later: its folder must exist and be writable, and it must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"{what} {path}: {path.parent} is not a writable directory")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from common.io import atomic_write_text
    from fusion.data.source import check_config_fits, open_split
    from fusion.evaluate import evaluate, summary_line

    if args.json:
        check_output_file(args.json, "--json")
    source = source_from_args(args)
    torch.set_num_threads(threads_of(args))
    model = load_any_checkpoint(args.checkpoint)
    check_config_fits(model.config, source)
    if source.kind == "nuscenes":
        return evaluate_nuscenes(args, model, source)
    dataset = open_split(model.config, source, args.split, num_scenes=args.scenes)
    metrics = evaluate(model, dataset)
    print(f"{args.checkpoint}: {summary_line(metrics)}")
    if args.json:
        dist.on_main(lambda: atomic_write_text(Path(args.json), json.dumps(metrics, indent=2)))


def evaluate_nuscenes(args: argparse.Namespace, model, source) -> None:
    """nuScenes: the official results JSON, our detection-challenge metric and, where the devkit is
    installed, its DetectionEval on the same file, side by side (written to --out)."""
    from common.io import atomic_write_text, check_inputs_not_outputs, staged_directory
    from fusion.data.nuscenes_tables import load_tables
    from fusion.data.source import NUSCENES_SPLITS, open_split
    from fusion.evaluate import nuscenes_detections
    from fusion.nuscenes_eval import (
        default_meta,
        devkit_cannot_score,
        devkit_evaluate,
        devkit_status,
        evaluate_results,
        results_json,
    )

    split = NUSCENES_SPLITS[source.version][args.split]
    out = Path(args.out or f"runs/evaluate-nuscenes/{source.version}-{split}")
    check_inputs_not_outputs({"--out": out}, {"--checkpoint": args.checkpoint, "--dataroot": source.dataroot})
    check_replaceable(out, ("nuscenes-evaluation",), args.overwrite)
    tables = load_tables(source.dataroot, source.version)
    if args.scenes is not None:
        raise ValueError("--scenes subsets the synthetic split; nuScenes is scored on the whole official split")
    dataset = open_split(model.config, source, args.split)
    detections = nuscenes_detections(model, dataset)
    if not dist.is_main():
        return
    modality = getattr(model, "modality", "fusion")
    results = results_json(
        detections, default_meta(modality != "lidar", modality != "camera"), model.config.data.classes
    )
    metrics = {"ours": evaluate_results(results, tables, split), "split": split, **source.describe()}
    with staged_directory(out, kind="nuscenes-evaluation") as stage:
        atomic_write_text(stage / "results_nusc.json", json.dumps(results))
        reason = devkit_status() or devkit_cannot_score(results)
        devkit = (
            None
            if reason
            else devkit_evaluate(stage / "results_nusc.json", source.dataroot, source.version, split, stage / "devkit")
        )
        metrics["devkit"] = devkit if devkit is not None else {"skipped": reason}
        atomic_write_text(stage / "metrics.json", json.dumps(metrics, indent=2, default=float))
    print(f"{args.checkpoint} on nuScenes {source.version} {split} ({len(results['results'])} samples):")
    rows = [("ours", metrics["ours"])] + ([("devkit", devkit)] if devkit is not None else [])
    for name, m in rows:
        print(
            f"  {name:<7} mAP {m['mAP']:.4f}  NDS {m['NDS']:.4f}  "
            + "  ".join(f"{k} {m[k]:.3f}" for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"))
        )
    if devkit is None:
        print(f"  devkit  skipped: {reason}")
    print(f"results: {out / 'results_nusc.json'}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2, default=float))


def prune_request(args: argparse.Namespace):
    from compress.altereva import AlterEvaConfig
    from compress.request import PruneRequest

    others = (args.channel_ratio, args.sparsity, args.target_latency)
    target_gflops = args.target_gflops
    if target_gflops is None and all(t is None for t in others):
        target_gflops = getattr(args, "default_target_gflops", None)
    return PruneRequest(
        method=args.method,
        target_gflops=target_gflops,
        channel_ratio=args.channel_ratio,
        sparsity=args.sparsity,
        target_latency=args.target_latency,
        latency_table=args.latency_table,
        latency_backend=args.latency_backend,
        round_to=args.round_to,
        max_group_ratio=args.max_group_ratio,
        scoring_batches=args.scoring_batches,
        seed=args.seed,
        scoring_precision=args.scoring_precision,
        altereva=AlterEvaConfig(
            reactivation_steps=args.reactivation_steps,
            reactivation_lr=args.reactivation_lr,
            reactivation_optimizer=args.reactivation_optimizer,
            reri_data=args.reri_data,
            alpha=args.alpha,
            beta=args.beta,
            mask_mode=args.mask_mode,
            floor=None if args.eq13 else args.floor,
            normalise=args.normalise,
            penalty=args.penalty,
            restarts=args.reactivation_restarts,
            subtract_noise=args.subtract_noise,
            failure_weight=args.failure_weight,
        ),
    ).validate()


def run_prune(
    checkpoint: str | Path,
    request,
    out: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    threads: int = 2,
    source=None,
) -> dict:
    """Load a reference checkpoint, prune, save; the output directory is written only once pruning has succeeded.

    Under torchrun every rank prunes its copy (scoring shared out), rank 0 saves; `threads` goes to
    IMP's fine-tunes between levels."""
    from compress.prune import prune
    from export.quantize import is_quantized_checkpoint
    from fusion.checkpoint import load_checkpoint, save_checkpoint
    from fusion.data.source import DataSource, check_config_fits
    from fusion.finetune import FinetuneConfig, imp_finetune_fn
    from fusion.task import first_sample, reference_task, scoring_set

    if is_quantized_checkpoint(checkpoint):
        raise ValueError(
            f"a quantized checkpoint cannot be pruned: {checkpoint}; prune its floating-point checkpoint "
            f"({Path(checkpoint) / 'base'}), then quantize the pruned one"
        )
    check_replaceable(out, ("checkpoint",), overwrite)
    model, meta = load_checkpoint(checkpoint)
    if meta.get("pruning"):
        raise ValueError(f"{checkpoint} is already pruned; prune the unpruned checkpoint instead")
    if meta.get("quantized"):
        raise ValueError(f"{checkpoint} is quantized; prune the floating-point checkpoint, then quantize")
    source = source or DataSource()
    check_config_fits(model.config, source)
    batches = scoring_set(model.config, request.scoring_batches, request.scoring_batch_size, request.seed, source)
    tune_config = FinetuneConfig() if not dist.is_distributed() else FinetuneConfig(threads=threads)
    imp_tune = imp_finetune_fn(tune_config, None, not request.structured, progress)
    task, example = reference_task(model), first_sample(batches[0])
    report = prune(model, task, batches, request, example_batch=example, finetune_fn=imp_tune, progress=progress)
    report["source_checkpoint"] = str(checkpoint)
    meta = {"pruning": report, "command": " ".join(["altermoma", *sys.argv[1:]])}
    dist.on_main(lambda: save_checkpoint(out, model, meta))
    return report


def run_user_prune(spec: str, request, out: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """`prune --task`: the user's model, task and scoring set; saved in the model-agnostic pruned format."""
    from altermoma.user_task import load_setup
    from compress.checkpoint import save_pruned
    from compress.prune import prune

    check_replaceable(out, ("pruned",), overwrite)
    setup = load_setup(spec)
    train = setup.train_batches if isinstance(setup.train_batches, list | tuple) else None
    report = prune(setup.model, setup.task, setup.scoring_batches, request, train_batches=train, progress=progress)
    report["task"] = spec
    dist.on_main(lambda: save_pruned(setup.model, out, report))
    return report


def print_prune_report(report: dict) -> None:
    if report["kind"] == "structured":
        print(
            f"GFLOPs {report['gflops_before']:.3f} -> {report['gflops_after']:.3f} ({report['gflops_reduction']:.1%} removed)"
        )
        print(f"{'partition':<10}{'channels':>16}{'kept':>8}{'params':>20}{'GFLOPs':>18}")
        for part, r in report["partitions"].items():
            print(
                f"{part:<10}{r['channels_before']:>7} -> {r['channels_after']:<6}{r['kept_ratio']:>8.1%}"
                f"{r['params_before']:>9} -> {r['params_after']:<8}{r['gflops_before']:>8.3f} -> {r['gflops_after']:.3f}"
            )
    else:
        print(f"sparsity {report['sparsity']:.1%}")
        for part, r in report["partitions"].items():
            print(f"{part:<10} kept {r['kept_ratio']:.1%} of {r['weights']} weights")
    if "reri_noise" in report:
        from compress.altereva import reri_line

        print(reri_line(report["reri_noise"]))
    if "scoring" in report:  # what a rerun compares (docs/reproducibility.md)
        s = report["scoring"]
        where = f"{s['precision']}, {s['threads']} thread(s), {s['ranks']} rank(s)"
        print(f"scores digest {s['digest']}, selection digest {s['selection_digest']} ({where})")


def cmd_prune(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from compress.oneshot import ZERO_THEN_PRUNE_RTOL

    request = dataclasses.replace(prune_request(args), best_effort=args.best_effort)
    if (args.task is None) == (args.checkpoint is None):
        raise ValueError("give --checkpoint (a reference checkpoint) or --task (your own model), not both")
    if args.task is not None and args.data != "synthetic":
        raise ValueError("--data is for reference checkpoints; with --task your setup function brings the data")
    threads = threads_of(args)
    torch.set_num_threads(threads)
    if args.task is not None:
        report = run_user_prune(args.task, request, args.out, overwrite=args.overwrite)
    else:
        source = source_from_args(args)
        report = run_prune(args.checkpoint, request, args.out, overwrite=args.overwrite, threads=threads, source=source)
    print_prune_report(report)
    wanted = request.target_gflops if request.target_gflops is not None else request.sparsity
    achieved = report.get("gflops_reduction") if request.target_gflops is not None else report.get("sparsity")
    if wanted is not None and achieved is not None and abs(achieved - wanted) > 0.005:
        print(f"note: {achieved:.1%} removed for the requested {wanted:.1%} (widths move in steps of --round-to)")
    if report.get("unpruned_groups"):
        print("left unpruned: " + "; ".join(f"{g['root']} ({g['reason']})" for g in report["unpruned_groups"]))
    for line in coverage_notes(report):
        print(line)
    if report.get("zero_then_prune_error", 0.0) > ZERO_THEN_PRUNE_RTOL:
        print(
            f"warning: the pruned model differs from the zeroed one by {report['zero_then_prune_error']:.2e} "
            "(relative): an op mixes channels (a LayerNorm over channels, a channel mean); fine-tune before use"
        )
    if "finetune_steps_remaining" in report:
        print(
            f"IMP fine-tuned between its levels: give `altermoma finetune` --steps {report['finetune_steps_remaining']}"
        )
    print(f"saved {args.out}")


def coverage_notes(report: dict) -> list[str]:
    """The `note:` lines naming what the prune left whole (no pruner knows it) and what GFLOPs leave out."""
    lines = []
    left = report.get("left_whole") or {}
    if left.get("modules"):
        names = "; ".join(f"{m['module']} ({m['reason']}, {m['share']:.1%})" for m in left["modules"][:6])
        more = f"; and {len(left['modules']) - 6} more" if len(left["modules"]) > 6 else ""
        lines.append(f"left whole, {left['share']:.1%} of the parameters: {names}{more}")
    counting = report.get("flop_counting") or {}
    if counting.get("uncounted"):
        names = "; ".join(f"{u['module']} ({u['reason']})" for u in counting["uncounted"][:6])
        lines.append(f"not in the GFLOPs count: {names}")
    lines = ["note: " + "; ".join(lines)] if lines else []
    if counting.get("sparse_convolutions"):
        lines.append(f"note: sparse convolutions counted as {counting['sparse_convolutions']}")
    return lines


def cmd_finetune(args: argparse.Namespace) -> None:
    from export.quantize import is_quantized_checkpoint

    if args.modality_dropout and (args.qat or args.task is not None or is_quantized_checkpoint(args.checkpoint)):
        raise ValueError(
            "--modality-dropout fine-tunes reference fusion checkpoints (not --task models or quantized ones): "
            "see docs/robustness.md"
        )
    if args.qat or is_quantized_checkpoint(args.checkpoint):
        from altermoma.cli_quant import cmd_finetune_qat

        return cmd_finetune_qat(args)
    if args.task is not None:
        if args.data != "synthetic":
            raise ValueError("--data is for reference checkpoints; with --task your setup function brings the data")
        return finetune_user(args)
    from fusion.checkpoint import load_checkpoint, read_metadata
    from fusion.data.source import check_config_fits, open_split
    from fusion.finetune import FinetuneConfig, finetune

    source = source_from_args(args)
    if not args.resume:
        check_replaceable(args.out, ("checkpoint",), args.overwrite)
    model, meta = load_checkpoint(args.checkpoint)
    check_config_fits(model.config, source)
    meta = {k: v for k, v in meta.items() if k in ("pruning", "command")}
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        scenes=args.scenes,
        threads=threads_of(args),
        modality_dropout=args.modality_dropout,
        seed=args.seed,
    )
    start = time.perf_counter()
    train_set = None if source.kind == "synthetic" else open_split(model.config, source, "train")
    finetune(model, config, args.out, metadata=meta, resume=args.resume, sync_bn=args.sync_bn, train_set=train_set)
    losses = read_metadata(args.out).get("last_loss")
    loss = f", last loss {losses:.4f}" if isinstance(losses, float) else ""
    print(f"fine-tuned {args.steps} steps in {time.perf_counter() - start:.0f} s{loss}; saved {args.out}")


def finetune_user(args: argparse.Namespace) -> None:
    """`finetune --task`: load the pruned checkpoint into the user's freshly built model, fine-tune, save."""
    import torch

    from altermoma.user_task import load_setup
    from compress.checkpoint import load_pruned, read_pruned_metadata, save_pruned
    from compress.finetune import finetune

    if args.resume:
        raise ValueError("--resume is for reference checkpoints; with --task, fine-tune again from the checkpoint")
    check_replaceable(args.out, ("pruned",), args.overwrite)
    meta = read_pruned_metadata(args.checkpoint)
    setup = load_setup(args.task)
    model = load_pruned(setup.model, args.checkpoint)
    torch.set_num_threads(threads_of(args))
    batches = setup.train_batches if setup.train_batches is not None else setup.scoring_batches
    result = finetune(model, setup.task, batches, steps=args.steps, lr=args.lr, sync_bn=args.sync_bn, seed=args.seed)
    dist.on_main(lambda: save_pruned(model, args.out, {**meta.get("report", {}), "finetune": result}))
    print(
        f"fine-tuned {result['steps']} steps in {result['seconds']:.1f} s: loss {result['first_loss']:.4f} -> "
        f"{result['final_loss']:.4f}" + (" (zeros kept)" if result["kept_zeros"] else "")
    )
    print(f"saved {args.out}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from altermoma.pipeline import run_pipeline

    run_pipeline(
        out=Path(args.out),
        from_scratch=args.from_scratch,
        request=prune_request(args),
        finetune_steps=args.finetune_steps,
        modality_dropout=args.modality_dropout,
        val_scenes=args.val_scenes,
        threads=threads_of(args),
        sync_bn=args.sync_bn,
        preset=args.preset,
        source=source_from_args(args),
        int8=_pipeline_int8() if args.int8 else None,
    )


def _pipeline_int8():
    from altermoma.cli_quant import pipeline_int8

    return pipeline_int8


def add_prune_args(p: argparse.ArgumentParser, default_target: float | None = None) -> None:
    p.add_argument(
        "--method",
        default="altereva",
        help="altereva | snip | magnitude | random | synflow | prospr | imp, or torch-pruning's own importances "
        "tp-magnitude | tp-taylor | tp-hessian, or NVIDIA ModelOpt's fastnas (GFLOPs targets; needs the quant "
        "extra) (structured only) (default: altereva)",
    )
    p.add_argument(
        "--target-gflops",
        type=float,
        help="fraction of GFLOPs to remove (structured)"
        + (f"; default {default_target} without another target" if default_target else ""),
    )
    p.set_defaults(default_target_gflops=default_target)  # applies only when no other target is given
    p.add_argument("--channel-ratio", type=float, help="fraction of channels to remove (structured)")
    p.add_argument("--sparsity", type=float, help="fraction of weights to remove (unstructured)")
    p.add_argument(
        "--target-latency",
        type=float,
        help="fraction of the unpruned model's PREDICTED latency to keep, e.g. 0.5 for 2x (needs --latency-table)",
    )
    p.add_argument(
        "--latency-table",
        metavar="T.json",
        help="per-layer latency table (`altermoma latency-table`); with another target, only reported",
    )
    p.add_argument("--latency-backend", help="refuse a latency table measured on another backend (e.g. ort-cpu)")
    p.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (default 8)")
    p.add_argument("--max-group-ratio", type=float, default=0.9, help="never prune more of one group (default 0.9)")
    p.add_argument("--scoring-batches", type=int, default=4, help="batches (of 2 scenes) in the scoring set")
    p.add_argument(
        "--scoring-precision",
        default="float64",
        choices=("float64", "model"),
        help="gradient scores on a float64 copy (default: the same channels at any thread count) or in the model's "
        "own dtype (faster, half the memory, for GPUs with slow FP64; the selection may vary with thread count)",
    )
    p.add_argument("--reactivation-steps", type=int, default=8, help="AlterEva's B (default 8; 0: the noise control)")
    p.add_argument("--reactivation-lr", type=float, default=1e-3, help="AlterEva's reactivation lr (default 1e-3)")
    defaults = AlterEvaConfig()
    p.add_argument(
        "--reactivation-optimizer",
        default=defaults.reactivation_optimizer,
        choices=REACTIVATION_OPTIMIZERS,
        help=f"AlterEva's reactivation optimiser (default {defaults.reactivation_optimizer}, chosen by "
        "reports/protocol-v2/PROTOCOL.md; adamw: protocol v1's choice)",
    )
    p.add_argument(
        "--reri-data",
        default=defaults.reri_data,
        choices=RERI_DATA,
        help="ReRI gradients: paper = D at theta_0 vs D_B at theta_B (Eq. 10); same = D at both "
        f"(default {defaults.reri_data})",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="DeCI weight")
    p.add_argument("--beta", type=float, default=1.0, help="ReRI weight")
    p.add_argument("--mask-mode", default="parameters", choices=("parameters", "feature"))
    p.add_argument(
        "--floor", type=float, default=1e-3, help="ReRI lowers a score to no less than floor x DeCI (default 1e-3)"
    )
    p.add_argument("--eq13", action="store_true", help="AlterEva scores exactly as the paper's Eq. 13 (no floor)")
    p.add_argument(
        "--normalise",
        default=defaults.normalise,
        choices=NORMALISE,
        help="AlterEva shares: per partition (Eq. 11-13), over the whole model, or per partition sized by the loss "
        f"increase when it is masked (masked-loss, ours) (default {defaults.normalise})",
    )
    p.add_argument(
        "--penalty",
        default=defaults.penalty,
        choices=PENALTIES,
        help="AlterEva's penalty per unit: reri = |ReRI| (Eq. 10); ours: residual = ReRI beyond what DeCI predicts, "
        f"signed = only units reactivation grew (default {defaults.penalty})",
    )
    p.add_argument(
        "--reactivation-restarts",
        type=int,
        default=defaults.restarts,
        help=f"AlterEva: average ReRI over this many reactivations from theta_0 (ours; default {defaults.restarts})",
    )
    p.add_argument(
        "--subtract-noise",
        action=argparse.BooleanOptionalAction,
        default=defaults.subtract_noise,
        help="AlterEva: take the zero-step noise floor off every unit's penalty (ours; chosen by protocol v2; "
        f"a no-op with --reri-data same, whose floor is 0) (default {'on' if defaults.subtract_noise else 'off'})",
    )
    p.add_argument(
        "--failure-weight",
        type=float,
        default=defaults.failure_weight,
        help="AlterEva, fail-safety (ours): add this much of each unit's contribution while the other sensor is "
        f"masked, so what carries the model through a sensor failure is kept (default {defaults.failure_weight:g})",
    )
    p.add_argument("--seed", type=int, default=0)


THREADS_HELP = "torch threads (default 2; under torchrun: the node's cores / its processes)"
SYNC_BN_HELP = "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)"


def dropout_probability(text: str) -> float:
    """--modality-dropout: a probability in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_modality_dropout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--modality-dropout",
        type=dropout_probability,
        default=0.0,
        metavar="P",
        help="fine-tune with modality dropout: each sample at each step loses its cameras (P/2) or its LiDAR "
        "(P/2), never both (fusion checkpoints; default 0: off; docs/robustness.md)",
    )


def add_trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--best-effort", action="store_true", help="accept a result more than 2 points from the target (warned)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="altermoma",
        description="AlterMOMA pruning for camera-LiDAR fusion models: train, prune, fine-tune, evaluate, export, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a camera-only, LiDAR-only or fusion model on synthetic scenes")
    p.add_argument("--modality", choices=("camera", "lidar", "fusion"), required=True)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--init-camera", help="camera-only checkpoint to initialise a fusion model from")
    p.add_argument("--init-lidar", help="LiDAR-only checkpoint to initialise a fusion model from")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    p.add_argument("--sync-bn", action="store_true", help=SYNC_BN_HELP)
    add_config_args(p)
    add_data_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="detection mAP/NDS and map mIoU of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--scenes", type=positive_int, help="number of scenes (default: the config's split size)")
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument(
        "--out", help="nuScenes: folder for results_nusc.json and metrics (default runs/evaluate-nuscenes/...)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    add_data_args(p)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("prune", help="score channels (or weights) and remove them")
    p.add_argument("--checkpoint", help="a reference-model checkpoint to prune")
    p.add_argument("--task", metavar="FILE.py:FUNCTION", help="your own model, task and data (see README)")
    p.add_argument("--out", required=True)
    add_prune_args(p)
    add_trust_args(p)
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    add_data_args(p)
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pruned checkpoint with the task loss")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", metavar="FILE.py:FUNCTION", help="your own model, task and data (see README)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--scenes", type=positive_int, default=500, help="training scenes to render for fine-tuning")
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="data order, modality-dropout draws and torch's RNG of the fine-tune (default 0)",
    )
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    p.add_argument("--sync-bn", action="store_true", help=SYNC_BN_HELP)
    add_modality_dropout_arg(p)
    add_data_args(p)
    p.add_argument(
        "--qat", action="store_true", help="quantization-aware: fine-tune a quantized checkpoint, quantizers in place"
    )
    p.add_argument(
        "--val-scenes",
        type=non_negative_int,
        default=0,
        help="with --qat: mAP of the FP32 and INT8 graphs through ONNX Runtime on N val scenes",
    )
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("pipeline", help="the main job: shipped checkpoints -> prune -> fine-tune -> evaluate")
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--from-scratch", action="store_true", help="retrain the camera, LiDAR and fusion models first")
    p.add_argument("--finetune-steps", type=non_negative_int, default=300)
    add_modality_dropout_arg(p)
    p.add_argument("--val-scenes", type=positive_int, default=200)
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--sync-bn", action="store_true", help=SYNC_BN_HELP)
    p.add_argument(
        "--preset", default="tiny", help="model size with --from-scratch (default tiny; nuscenes-tiny for nuScenes)"
    )
    add_data_args(p)
    add_prune_args(p, default_target=0.5)
    add_trust_args(p)
    p.add_argument(
        "--int8",
        action="store_true",
        help="also quantize the fine-tuned pruned model (INT8 PTQ, needs the quant extra) and report its ONNX "
        "Runtime mAP and CPU latency next to FP32",
    )
    p.set_defaults(run=cmd_pipeline)

    add_compare_parser(sub)
    add_deploy_parsers(sub)
    add_data_parsers(sub)
    add_latency_table_parser(sub)
    add_quantize_parser(sub)
    add_robustness_parser(sub)
    return apply_flow(parser, sub)  # --help in the order of a user's flow, an example per verb


OUTPUT_OPTIONS = ("out", "json")
INPUT_OPTIONS = (
    "checkpoint", "task", "dataroot", "latency_table", "init_camera", "init_lidar", "reference", "onnx_dir",
    "parse_trtexec",
)  # fmt: skip


def check_inputs_are_not_outputs(args: argparse.Namespace) -> None:
    """Every verb: no --out/--json is, contains or lies inside one of its inputs (`common.io`), before any work."""
    from common.io import check_inputs_not_outputs

    def named(attributes: tuple[str, ...]) -> dict:
        return {f"--{a.replace('_', '-')}": getattr(args, a) for a in attributes if getattr(args, a, None)}

    inputs = named(INPUT_OPTIONS)
    if "--task" in inputs:  # FILE.py:FUNCTION names a file; module:function names none
        where = inputs["--task"].rpartition(":")[0]
        inputs["--task"] = where if where.endswith(".py") or "/" in where else None
    check_inputs_not_outputs(named(OUTPUT_OPTIONS), inputs)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad option (one `error:` line, status 2) or --help (status 0)
        return int(stop.code or 0)
    if dist.env_world() > 1 and args.command not in DISTRIBUTED_VERBS:
        print(f"error: `{args.command}` runs in one process: launch it without torchrun", file=sys.stderr)
        return 2
    dist.init_from_env()
    try:
        check_inputs_are_not_outputs(args)
        with _quiet_unless_main(), _one_line_warnings():
            args.run(args)
    except USER_ERRORS as error:
        print(f"{dist.rank_prefix()}error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        if dist.is_distributed():  # the traceback follows; torchrun then stops the other ranks
            print(f"{dist.rank_prefix()}failed: {type(error).__name__}: {error}", file=sys.stderr)
        raise
    dist.shutdown()
    return 0


@contextlib.contextmanager
def _one_line_warnings():
    """The toolkit's own warnings as one `warning:` line each (a library's keep Python's form: their file
    and line are what a user reports upstream)."""
    original = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if category is UserWarning and _ours(filename):
            return f"{dist.rank_prefix()}warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def _ours(filename: str) -> bool:
    root = Path(__file__).resolve().parent.parent
    try:
        Path(filename).resolve().relative_to(root)
    except ValueError:
        return False
    return ".venv" not in Path(filename).parts and "site-packages" not in Path(filename).parts


@contextlib.contextmanager
def _quiet_unless_main():
    """Ranks other than 0 print nothing to stdout (N copies of every line would interleave); errors
    still reach stderr, prefixed with the rank."""
    if dist.is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


if __name__ == "__main__":
    sys.exit(main())
