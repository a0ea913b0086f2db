"""The `altermoma` command: parses arguments and calls the packages, nothing more.

Errors a user can fix (a wrong path, a bad ratio, an unknown config key) are printed as one line
starting with "error:" and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion.checkpoint import CheckpointError
from fusion.config import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, ValueError)


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
    from fusion.checkpoint import read_weights
    from fusion.data.dataset import SyntheticScenes
    from fusion.models.bevfusion import build_model
    from fusion.train import fit, load_pretrained

    config = config_from_args(args)
    model = build_model(config, args.modality)
    metadata = {"command": " ".join(["altermoma", *sys.argv[1:]])}
    # LiDAR first: its decoder and heads initialise the fusion model's (as in BEVFusion); the camera
    # checkpoint then contributes only what the LiDAR one lacks, the camera branch.
    sources = {name: path for name, path in (("lidar", args.init_lidar), ("camera", args.init_camera)) if path}
    if sources:
        loaded = load_pretrained(model, {name: read_weights(path) for name, path in sources.items()})
        metadata["initialised_from"] = {
            name: {"checkpoint": str(p), "tensors": loaded[name]} for name, p in sources.items()
        }
        print(f"initialised from {', '.join(f'{k}: {v} tensors' for k, v in loaded.items())}")
    train_set = SyntheticScenes(config, "train")
    fit(
        model,
        train_set,
        config.train,
        out_dir=args.out,
        resume=args.resume,
        metadata=metadata,
        desc=f"train {args.modality}",
    )
    print(f"saved {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fusion.checkpoint import atomic_write_text, load_checkpoint
    from fusion.data.dataset import SyntheticScenes
    from fusion.evaluate import evaluate, summary_line

    model, _ = load_checkpoint(args.checkpoint)
    dataset = SyntheticScenes(model.config, args.split, num_scenes=args.scenes)
    metrics = evaluate(model, dataset)
    print(f"{args.checkpoint}: {summary_line(metrics)}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altermoma", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a camera-only, LiDAR-only or fusion model on synthetic scenes")
    p.add_argument("--modality", choices=("camera", "lidar", "fusion"), required=True)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--init-camera", help="camera-only checkpoint to initialise a fusion model from")
    p.add_argument("--init-lidar", help="LiDAR-only checkpoint to initialise a fusion model from")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    add_config_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="detection mAP/NDS and map mIoU of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--scenes", type=int, help="number of scenes (default: the config's split size)")
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(run=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
