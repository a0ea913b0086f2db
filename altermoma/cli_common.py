"""What several verb modules need from the command line: the thread count and any checkpoint kind.

Kept apart from altermoma/cli.py so that verb modules (cli_robustness, ...) can use them without importing the
module that imports them.
"""

from __future__ import annotations

import argparse

from common import dist


def threads_of(args: argparse.Namespace) -> int:
    """--threads, or its default: 2 in one process, the node's cores over its processes under torchrun."""
    return args.threads if args.threads is not None else dist.default_threads()


def load_any_checkpoint(directory: str):
    """A reference checkpoint, pruned or not, or an `altermoma quantize` folder (its PyTorch fake-quant
    model: the INT8 arithmetic ONNX Runtime and TensorRT run, simulated)."""
    from export.quantize import is_quantized_checkpoint
    from fusion.checkpoint import load_checkpoint

    if is_quantized_checkpoint(directory):
        from altermoma.cli_quant import load_quantized_checkpoint

        return load_quantized_checkpoint(directory)[0]
    return load_checkpoint(directory)[0]
