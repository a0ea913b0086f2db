"""`altermoma robustness`: checkpoints evaluated on the same val scenes, clean and under sensor failures.

    altermoma robustness --checkpoint C [--checkpoint P ...] --out DIR [--corruptions a,b,...]
                         [--severity 1-5 | --severities 1,3,5] [--seed S] [--scenes N] [--threads N]
                         [--data synthetic|nuscenes --dataroot DIR --version V] [--overwrite]

Writes DIR/robustness.md (mAP and NDS per corruption and severity, each with its ratio to the model's clean
score), DIR/robustness.json and DIR/plots/ (docs/robustness.md). Wired into the main parser by
`add_robustness_parser(sub)`; user errors (an unknown corruption, a severity out of range, checkpoints of other
data, --out among the inputs) are one `error:` line and exit status 2, before any evaluation.
"""

from __future__ import annotations

import argparse
import sys

from common.argtypes import non_negative_int, positive_int
from fusion.data.corruptions import SEVERITIES
from fusion.data.source import add_data_args, source_from_args


def severity(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number 1..5, got {text!r}") from None
    if value not in SEVERITIES:
        raise argparse.ArgumentTypeError(f"must be 1..5, got {value}")
    return value


def severity_list(text: str) -> tuple[int, ...]:
    values = tuple(severity(word.strip()) for word in text.split(","))
    return tuple(sorted(set(values)))


def cmd_robustness(args: argparse.Namespace) -> None:
    import torch

    from altermoma.cli_common import load_any_checkpoint, threads_of
    from altermoma.robust import KIND, markdown_table, robustness, same_inputs, write_report
    from common.io import check_replaceable
    from fusion.data import corruptions
    from fusion.data.source import check_config_fits, open_split

    source = source_from_args(args)
    check_replaceable(args.out, (KIND,), args.overwrite)
    if len(set(args.checkpoint)) != len(args.checkpoint):
        raise ValueError("the same --checkpoint is given twice")
    if source.kind == "nuscenes" and args.scenes is not None:
        raise ValueError("--scenes subsets the synthetic split; nuScenes is scored on the whole official split")
    models = {path: load_any_checkpoint(path) for path in args.checkpoint}
    same_inputs({path: model.config for path, model in models.items()})
    config = next(iter(models.values())).config
    check_config_fits(config, source)
    severities = args.severities or ((args.severity,) if args.severity else SEVERITIES)
    names = corruptions.parse_names(args.corruptions, config.rig.num_cameras)  # checked before any evaluation
    torch.set_num_threads(threads_of(args))
    data = open_split(config, source, "val", num_scenes=args.scenes)
    result = robustness(models, None, data, names, severities, seed=args.seed)
    extra = {
        "command": " ".join(["altermoma", *sys.argv[1:]]),
        "checkpoints": list(args.checkpoint),
        "scenes": len(data),
        "threads": threads_of(args),
        **source.describe(),
    }
    write_report(result, args.out, extra)
    print(markdown_table(result))
    print(f"wrote {args.out}/robustness.md, robustness.json and plots/")


def add_robustness_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "robustness", help="mAP and NDS of checkpoints on the same scenes under sensor failures and corruptions"
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint (pruned, unpruned or quantized) to evaluate; repeat to compare several on the same scenes",
    )
    p.add_argument("--out", required=True, help="folder for robustness.md, robustness.json and plots/")
    p.add_argument(
        "--corruptions",
        default="all",
        help="comma-separated: cameras_off, camera_off_<i> (camera_off: each), lidar_off, lidar_sector, lidar_beams, "
        "point_dropout, extrinsic, camera_noise, camera_blur, camera_dark, camera_occlusion; "
        "sensor_failures; all (default)",
    )
    levels = p.add_mutually_exclusive_group()
    levels.add_argument("--severity", type=severity, help="one severity 1..5 for the graded corruptions")
    levels.add_argument("--severities", type=severity_list, help="several, e.g. 1,3,5 (default: 1,2,3,4,5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the corruptions' noise (default 0)")
    p.add_argument("--scenes", type=positive_int, help="val scenes (default: the config's val split size)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    add_data_args(p)
    p.set_defaults(run=cmd_robustness)
    return p
