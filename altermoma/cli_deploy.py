"""Deployment subcommands of `altermoma`: `export onnx`, `export trt` and `bench`.

Wired into the main parser by `add_parsers(sub)`; `bench` is defined next to its code in `altermoma.bench`
(which never imports this package) and only registered here. Handlers raise ValueError / FileNotFoundError /
CheckpointError for user errors, which the main CLI prints as one line.

    altermoma export onnx --checkpoint DIR --out DIR [--preset P] [--pool-method scatter|cumsum]
                          [--opset 17] [--samples 8] [--no-simplify] [--threads 1] [--batch-size 1]
    altermoma export trt --onnx-dir DIR --out DIR [--precision fp32|fp16 ...] [--workspace-mib 4096]
    altermoma bench [--checkpoint DIR ...] [--preset tiny] [--threads 1] [--runs 50] [--out reports/bench]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from altermoma.bench import add_parser as add_bench_parser
from common.argtypes import positive_int
from fusion.data.source import add_data_args, source_from_args


def cmd_export_onnx(args: argparse.Namespace) -> None:
    if args.task is not None:
        return export_user(args)
    if args.checkpoint is None:
        raise ValueError("give --checkpoint (a reference checkpoint) or --task with an optional --checkpoint")
    from export.quantize import is_quantized_checkpoint

    if is_quantized_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint} is quantized: its Q/DQ graphs come from `altermoma quantize --onnx`")
    from altermoma.export_reference import export_checkpoint

    report = export_checkpoint(
        args.checkpoint,
        args.out,
        preset=args.preset,
        pool_method=args.pool_method,
        opset=args.opset,
        samples=args.samples,
        simplify=not args.no_simplify,
        threads=args.threads,
        batch_size=args.batch_size,
        force=args.force,
        overwrite=args.overwrite,
        source=source_from_args(args),
    )
    single, parity = report["single"], report["parity"]
    print(
        f"wrote {single['path']} ({single['size_bytes'] / 2**20:.2f} MiB, {single['nodes']} nodes, "
        f"pooling {single['pool_method']}) and {len(report['split'])} split graphs in {args.out}/split"
    )
    print(
        f"parity on {parity['samples']} val scenes (atol {parity['atol']:.0e}): {'OK' if parity['ok'] else 'FAILED'}; "
        + ", ".join(f"{k} max abs {v:.2e}" for k, v in parity["max_abs"].items())
        + f"; fp32 target 1e-4 {'met' if parity['meets_fp32_target'] else 'NOT met'}"
    )
    if "metrics" in parity:
        print("mAP " + ", ".join(f"{k} {m['mAP']:.4f}" for k, m in parity["metrics"].items()))
    print(f"report: {args.out}/export_report.md")


def user_model(spec: str, checkpoint: str | None):
    """The user's setup and its model, with a pruned checkpoint loaded if one is given."""
    from altermoma.user_task import load_setup
    from compress.checkpoint import load_pruned

    setup = load_setup(spec)
    model = load_pruned(setup.model, checkpoint) if checkpoint is not None else setup.model.eval()
    return setup, model


def export_user(args: argparse.Namespace) -> None:
    """`export onnx --task`: `model.onnx` of the user's (pruned) model and `export_report.json`, staged and swapped in."""
    import json
    from pathlib import Path

    from altermoma.export_reference import EXPORT_KIND
    from common.io import check_replaceable, staged_directory
    from export.onnx import ExportError, export_onnx, left_out_lines

    if args.batch_size != 1 or args.pool_method is not None or args.preset is not None:
        raise ValueError("--batch-size, --pool-method and --preset are for reference checkpoints, not --task")
    check_replaceable(args.out, (EXPORT_KIND,), args.overwrite)
    setup, model = user_model(args.task, args.checkpoint)
    positional, keywords = setup.task.arguments(setup.scoring_batches[0])
    example = keywords if keywords else positional
    out = Path(args.out)
    with staged_directory(out, kind=EXPORT_KIND) as staging:
        report = export_onnx(
            model,
            example,
            staging / "model.onnx",
            opset=args.opset,
            simplify=not args.no_simplify,
            threads=args.threads,
        )
        report["path"] = str(out / "model.onnx")
        report["task"], report["checkpoint"] = args.task, args.checkpoint
        ok = report["max_abs_error"] <= 1e-4 and report["readiness_errors"] == 0
        if not ok:
            raise ExportError(
                f"export failed its checks (max abs error {report['max_abs_error']:.2e}, "
                f"{report['readiness_errors']} readiness errors); {out} was left as it was"
            )
        (staging / "export_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(
        f"wrote {out / 'model.onnx'} (inputs {', '.join(report['input_names'])}; outputs "
        f"{', '.join(report['output_names'])}); ONNX Runtime vs PyTorch max abs error {report['max_abs_error']:.2e}"
    )
    for line in left_out_lines(report):
        print(line)
    print(f"report: {out / 'export_report.json'}")


def check_writable_folder(out) -> None:
    from common.io import check_writable_folder as check

    check(out)


def check_comparable(checkpoints: list[str], allow_mixed: bool) -> None:
    """A speed-up between a camera-only and a fusion model, or two presets, means nothing: refused
    unless --allow-mixed."""
    from fusion.checkpoint import read_metadata

    if allow_mixed or len(checkpoints) < 2:
        return
    # an INT8 checkpoint of `altermoma quantize` is described by its floating-point source, base/
    sources = [Path(c) / "base" if (Path(c) / "quantized.json").is_file() else c for c in checkpoints]
    kinds = [(read_metadata(c).get("modality"), read_metadata(c).get("config", {}).get("preset")) for c in sources]
    for checkpoint, kind in zip(checkpoints[1:], kinds[1:]):
        if kind != kinds[0]:
            raise ValueError(
                f"{checkpoint} is {kind[0]} / preset {kind[1]}, the baseline {checkpoints[0]} is {kinds[0][0]} / "
                f"preset {kinds[0][1]}: their speed-up would compare different models (--allow-mixed to do it anyway)"
            )


def cmd_bench(args: argparse.Namespace) -> None:
    from altermoma.bench import run_from_args

    check_writable_folder(args.out)
    if args.task is None:
        check_comparable(args.checkpoint, args.allow_mixed)
        return run_from_args(args)
    from altermoma.user_bench import bench_models

    if args.batch_size != 1 or args.pool_method is not None or args.preset is not None:
        raise ValueError("--batch-size, --pool-method and --preset are for reference checkpoints, not --task")
    setup, _ = user_model(args.task, None)
    models = [("unpruned", setup.model.eval())]
    for checkpoint in args.checkpoint:
        models.append((str(checkpoint), user_model(args.task, checkpoint)[1]))
    report = bench_models(models, setup.task, setup.scoring_batches[0], args.out, args.threads, args.runs, args.warmup)
    for row in report["models"]:
        t, o = row["torch_cpu"], row["ort_cpu"]
        print(
            f"{row['model']}: {row['gflops']:.4f} GFLOPs, torch CPU {t['median_ms']:.3f} ms ({t['speedup']:.2f}x), "
            f"ONNX Runtime CPU {o['median_ms']:.3f} ms ({o['speedup']:.2f}x), {args.threads} thread(s)"
        )
    print(f"report: {args.out}/bench.md")


def cmd_export_trt(args: argparse.Namespace) -> None:
    from export.engines import build_engines

    report = build_engines(
        args.onnx_dir, args.out, tuple(args.precision or ["fp16"]), args.workspace_mib, args.samples, args.threads
    )
    if not report["built"]:
        print(f"no engine built here ({report['reason']}); wrote {report['script']}: run it on the target device")
        return
    for name, result in report["engines"].items():
        print(f"{name}: parity vs ONNX Runtime {'OK' if result['ok'] else 'FAILED'}")
    print(f"engines, build_engines.sh and trt_report.json in {args.out}")
    if not report["ok"]:
        raise ValueError("an engine's parity against ONNX Runtime FAILED (see trt_report.json)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `export` (with `onnx` and `trt`) and `bench` to the main CLI's subparsers."""
    p = sub.add_parser("export", help="export a checkpoint for deployment")
    formats = p.add_subparsers(dest="export_format", required=True)
    o = formats.add_parser(
        "onnx",
        help="ONNX export (one graph + the CUDA-BEVFusion split), TensorRT-readiness check, parity report",
    )
    o.add_argument("--checkpoint", help="checkpoint directory (pruned or not; with --task: a pruned checkpoint)")
    o.add_argument("--task", metavar="FILE.py:FUNCTION", help="your own model, task and data (see README)")
    o.add_argument("--out", required=True, help="output directory (created if missing)")
    o.add_argument("--preset", help="refuse a checkpoint of another preset")
    o.add_argument("--pool-method", choices=("scatter", "cumsum"), help="BEV pooling form (default: the config's)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--samples", type=positive_int, default=8, help="val samples for parity (default 8)")
    o.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    o.add_argument("--threads", type=positive_int, default=1, help="torch and ONNX Runtime threads (default 1)")
    o.add_argument("--batch-size", type=positive_int, default=1, help="static batch size of the graphs (default 1)")
    o.add_argument("--force", action="store_true", help="keep an export that fails its checks, in <out>-failed")
    o.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    add_data_args(o)
    o.set_defaults(run=cmd_export_onnx)

    t = formats.add_parser(
        "trt",
        help="TensorRT engines from an `export onnx` directory (needs TensorRT; always writes build_engines.sh)",
    )
    t.add_argument("--onnx-dir", required=True, help="output directory of `altermoma export onnx`")
    t.add_argument("--out", required=True, help="engine directory (created if missing)")
    t.add_argument("--precision", action="append", choices=("fp32", "fp16"), help="repeatable (default fp16)")
    t.add_argument("--workspace-mib", type=positive_int, default=4096)
    t.add_argument("--samples", type=positive_int, default=2, help="seeded inputs for the parity check")
    t.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads for the parity check")
    t.set_defaults(run=cmd_export_trt)

    b = add_bench_parser(sub)
    b.add_argument(
        "--task",
        metavar="FILE.py:FUNCTION",
        help="your own model: the unpruned model against each --checkpoint (pruned checkpoints of it)",
    )
    b.add_argument("--allow-mixed", action="store_true", help="compare checkpoints of other modalities or presets")
    b.set_defaults(run=cmd_bench)
