"""NVIDIA ModelOpt's structured pruning (FastNAS) behind our `prune`, as a peer on the same harness.

FastNAS converts the model into a search space by tracing it with torch.fx, measures each searchable
width's effect on `score_func` (here: minus the task loss on the scoring set), and keeps the subnet
that best meets a FLOPs constraint, counted by ModelOpt itself. It prunes in place; widths move in
steps of `round_to` (ModelOpt's default is 32). What the tracer cannot follow (data-dependent control
flow, spconv, optional inputs) stays out of the search space, so a target can be out of its reach:
that is refused in one line naming the reachable reduction, before the search starts.

Requires the `quant` extra (nvidia-modelopt 0.47, torchprofile 0.0.4). GFLOPs targets only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.task import Task
from compress.partition import Partition
from compress.structured import PruningError, is_layer


def modelopt_input(model: nn.Module, task: Task, batch: Any) -> tuple:
    """The forward's arguments as one positional tuple, in signature order (None where not given)."""
    args, kwargs = task.arguments(batch)
    if not kwargs:
        return tuple(args)
    names = list(inspect.signature(model.forward).parameters)
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise PruningError(f"FastNAS needs named forward arguments; {unknown[0]!r} is not one of {names}")
    last = max(names.index(k) for k in kwargs)
    positional = list(args) + [kwargs.get(name) for name in names[len(args) : last + 1]]
    return tuple(positional) if not isinstance(positional[-1], dict) else (*positional, {})


def fastnas_rules(divisor: int) -> dict:
    """FastNAS's default rules with `divisor` as the channel step of every conv, linear and norm."""
    from modelopt.torch.prune.fastnas import _get_fastnas_default_rules

    rules = _get_fastnas_default_rules()
    for rule in rules.values():
        for key in ("channel_divisor", "feature_divisor"):
            if key in rule:
                rule[key] = divisor
    return rules


def _out_channels(model: nn.Module, partition: Partition) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if is_layer(module):
            width = getattr(module, "out_channels", getattr(module, "out_features", 0))
            part = partition.part_of(name) or "fusion"
            counts[part] = counts.get(part, 0) + int(width)
    return counts


def prune_fastnas(
    model: nn.Module, task: Task, batches: list, target_gflops: float, round_to: int, example_batch: Any = None
) -> dict:
    """Run FastNAS to keep at most (1 - target_gflops) of the FLOPs; the model is pruned in place."""
    try:
        import modelopt.torch.nas as mtn
        import modelopt.torch.prune as mtp
        from modelopt.torch.opt.conversion import ApplyModeError
        from modelopt.torch.prune.pruning import PruneModeRegistry
    except ImportError as error:
        raise PruningError(f"FastNAS needs NVIDIA ModelOpt (pip install -e '.[quant]'): {error}") from None
    from compress.oneshot import measured_gflops

    example_batch = batches[0] if example_batch is None else example_batch
    dummy = modelopt_input(model, task, example_batch)
    partition = Partition.of(model, task.partition)
    keep = f"{100 * (1.0 - target_gflops):.6g}%"
    rules = [("fastnas", fastnas_rules(round_to))]
    before = {"gflops": measured_gflops(model, task, example_batch), "channels": _out_channels(model, partition)}
    log = io.StringIO()  # ModelOpt prints its search-space tables; what matters goes into the report
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        for message in ("Per-rank checkpoint", "Checkpoint .* does not exist"):  # our temporary search state
            warnings.filterwarnings("ignore", message=message)
        try:
            probe = mtn.convert(copy.deepcopy(model), rules, registry=PruneModeRegistry)
        except ApplyModeError as error:  # nothing it can trace has a smaller width to try
            raise PruningError(
                f"FastNAS cannot reach a {target_gflops:.0%} FLOPs reduction on this model: its traced search space "
                f"has no searchable width in steps of {round_to} ({str(error).splitlines()[0]})"
            ) from None
        satisfiable, stats = mtn.profile(probe, dummy, constraints={"flops": keep}, verbose=False)
        del probe
        if not satisfiable:
            reachable = 1.0 - stats["min"]["flops"] / stats["max"]["flops"]
            raise PruningError(
                f"FastNAS cannot reach a {target_gflops:.0%} FLOPs reduction on this model: its traced search space "
                f"({int(stats.get('number of configurable hparams', 0))} searchable widths in steps of {round_to}) "
                f"reaches at most {reachable:.1%} by ModelOpt's count"
            )

        def score(net: nn.Module) -> float:
            with torch.no_grad():
                return -sum(float(task.loss_of(task.forward(net, b), b)) for b in batches) / len(batches)

        with tempfile.TemporaryDirectory() as work:
            config = {
                "data_loader": [modelopt_input(model, task, b) for b in batches],
                "collect_func": lambda inputs: inputs,
                "score_func": score,
                "checkpoint": str(Path(work) / "search.pth"),
                "verbose": False,
            }
            pruned, _ = mtp.prune(model, rules, {"flops": keep}, dummy, config)
    if pruned is not model:  # ModelOpt documents in-place pruning; hold it to that
        raise PruningError("FastNAS returned a new model instead of pruning in place")
    model.eval()
    after = {"gflops": measured_gflops(model, task, example_batch), "channels": _out_channels(model, partition)}
    return {
        "kind": "structured",
        "method": "fastnas",
        "gflops_before": before["gflops"],
        "gflops_after": after["gflops"],
        "gflops_reduction": 1.0 - after["gflops"] / before["gflops"],
        "partitions": {
            part: {
                "channels_before": n,
                "channels_after": after["channels"].get(part, 0),
                "kept_ratio": after["channels"].get(part, 0) / n,
            }
            for part, n in before["channels"].items()
            if n
        },
        "fastnas": {
            "channel_divisor": round_to,
            "flops_limit": keep,
            "search_space": {k: stats[k] for k in ("min", "max") if k in stats},
            "configurable_hparams": int(stats.get("number of configurable hparams", 0)),
        },
    }
