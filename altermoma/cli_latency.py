"""`altermoma latency-table`: build a per-layer latency table on this machine, write a trtexec folder for a
device, or parse that folder's logs into a table (see `altermoma.latency_table`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.argtypes import non_negative_int, positive_int

if TYPE_CHECKING:
    from compress.latency import LatencyTable

BACKEND_CHOICES = ("ort-cpu", "torch-cpu", "torch-cuda", "trtexec-script")


def load_subject(args: argparse.Namespace):
    """The unpruned model to time: a reference checkpoint, or the user's `--task` setup."""
    from altermoma.latency_table import Subject

    if (args.task is None) == (args.checkpoint is None):
        raise ValueError("give --checkpoint (a reference checkpoint) or --task (your own model), not both")
    if args.task is not None:
        from altermoma.user_task import load_setup

        setup = load_setup(args.task)
        return Subject(setup.model.eval(), setup.task, setup.scoring_batches[0], f"task {args.task}")
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    model, meta = load_checkpoint(args.checkpoint)
    if meta.get("pruning"):
        raise ValueError(f"{args.checkpoint} is pruned: build the table on the unpruned checkpoint you will prune")
    # The same example batch `altermoma prune` traces: one sample of the scoring set.
    example = first_sample(scoring_set(model.config, 1, 1)[0])
    return Subject(model.eval(), reference_task(model), example, f"checkpoint {args.checkpoint}", model.config.preset)


def cmd_latency_table(args: argparse.Namespace) -> None:
    from altermoma import latency_table as lt

    if args.parse_trtexec is not None:
        if args.checkpoint or args.task:
            raise ValueError("--parse-trtexec reads a folder; give no --checkpoint or --task with it")
        table = lt.parse_trtexec_folder(args.parse_trtexec)
        print(
            f"{len(table.layers)} layers from {args.parse_trtexec}: end to end {table.end_to_end_ms:.3f} ms, ", end=""
        )
        print(f"rest {table.rest_ms:.3f} ms ({table.backend}, {table.environment.get('device', 'device unknown')})")
        save_judged(table, args)
        return
    if args.backend == "torch-cuda":
        lt.require_cuda()  # before loading anything
    if args.backend != "trtexec-script" and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the table's JSON file name")
    subject = load_subject(args)
    if args.backend == "trtexec-script":
        out = lt.write_trtexec_folder(
            subject,
            args.out,
            args.round_to,
            args.grid_points,
            args.runs,
            args.trt_warmup_ms,
            args.precision,
            with_rest_terms=not args.no_rest_terms,
        )
        print(f"wrote {out}: copy it to the device, run `sh {out.name}/run_trtexec.sh` there, then")
        print(f"  altermoma latency-table --parse-trtexec {out} --out {out}.json")
        return
    table = lt.build_table(
        subject,
        backend=args.backend,
        threads=args.threads,
        round_to=args.round_to,
        grid_points=args.grid_points,
        runs=args.runs,
        warmup=args.warmup,
        check_points=args.check_points,
        rest_terms=not args.no_rest_terms,
        rest_runs=args.rest_runs,
        progress=(lambda text: print(text, file=sys.stderr)) if not args.quiet else None,
    )
    check = table.checks.get("interpolation", {})
    print(
        f"{len(table.layers)} layers, {table.settings['distinct_points_timed']} points timed in "
        f"{table.settings['seconds']:.0f} s on {table.backend} ({args.threads} thread(s)): end to end "
        f"{table.end_to_end_ms:.2f} ms = table {table.table_full_ms:.2f} ms + rest {table.rest_ms:.2f} ms"
    )
    if "mean_abs_relative_error" in check:
        print(
            f"interpolation ({check['mode']}) error on {len(check['points'])} off-grid widths: mean "
            f"{check['mean_abs_relative_error']:.1%}, max {check['max_abs_relative_error']:.1%} (bilinear: mean "
            f"{check['linear_mean_abs_relative_error']:.1%}, max {check['linear_max_abs_relative_error']:.1%})"
        )
    rest = table.checks.get("rest_terms")
    if rest is not None:
        used = ", ".join(f"{r} {table.rest_terms[r]['ms_per_channel']:.3f} ms/channel" for r in rest["used"]) or "none"
        print(f"rest terms above the noise ({rest['threshold_ms']:.2f} ms): {used}")
    save_judged(table, args)


def save_judged(table: LatencyTable, args: argparse.Namespace) -> None:
    """Print the table's quality verdict; save it unless it is bad (then one `error:` line, exit 2, and the
    file at --out, if any, is left as it was), or with --keep-bad."""
    from compress.latency import quality_line, save_table

    print(quality_line(table))
    if table.verdict == "bad" and not args.keep_bad:
        reasons = "; ".join(table.quality.get("reasons", []))
        raise ValueError(
            f"latency table not saved: judged bad ({reasons}); another process was probably busy: rebuild it on "
            f"a quieter machine (--keep-bad saves it for inspection; prune refuses it)"
        )
    if table.verdict == "noisy":
        print("warning: the table is noisy (reasons above): predictions may be off by more than usual")
    save_table(table, args.out)
    print(f"saved {args.out}")


def add_latency_table_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "latency-table",
        help="time every prunable layer over a grid of widths on a backend (for prune --target-latency)",
    )
    p.add_argument("--checkpoint", help="the UNPRUNED reference checkpoint the table is for")
    p.add_argument("--task", metavar="FILE.py:FUNCTION", help="your own model, task and data (see README)")
    p.add_argument("--parse-trtexec", metavar="DIR", help="turn the logs of a trtexec-script folder into a table")
    p.add_argument("--out", required=True, help="table JSON (a folder for --backend trtexec-script)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="ort-cpu", help="default ort-cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch / ORT intra-op), default 1")
    p.add_argument("--round-to", type=positive_int, default=8, help="grid step in channels (default 8)")
    p.add_argument("--grid-points", type=int, default=16, help="at most this many widths per dimension (default 16)")
    p.add_argument("--runs", type=positive_int, default=20, help="timed runs per point (default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="warm-up runs per point (default 5)")
    p.add_argument("--rest-runs", type=positive_int, default=20, help="alternating runs of the model per rest term, "
                   "against the unpruned one (default 20)")  # fmt: skip
    p.add_argument("--check-points", type=non_negative_int, default=8, help="off-grid widths timed to measure the "
                   "interpolation error (default 8)")  # fmt: skip
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="trtexec-script precision")
    p.add_argument("--trt-warmup-ms", type=non_negative_int, default=500, help="trtexec --warmUp (ms), default 500")
    p.add_argument(
        "--no-rest-terms",
        action="store_true",
        help="skip timing the model once per group (the rest stays one constant; faster, less accurate)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-layer progress lines")
    p.add_argument(
        "--keep-bad",
        action="store_true",
        help="save a table judged bad too (for inspection: prune refuses it); by default it is not saved (exit 2)",
    )
    p.set_defaults(run=cmd_latency_table)
    return p
