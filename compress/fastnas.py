"""NVIDIA ModelOpt's structured pruning (FastNAS) behind our `prune`, as a peer on the same harness.

FastNAS converts the model into a search space by tracing it with torch.fx, measures each searchable
width's effect on `score_func` (here: minus the task loss on the scoring set), and keeps the subnet
that best meets a FLOPs constraint, counted by ModelOpt itself. It prunes in place; widths move in
steps of `round_to` (ModelOpt's default is 32). What the tracer cannot follow (data-dependent control
flow, spconv, optional inputs) stays out of the search space, so a target can be out of its reach:
that is refused in one line naming the reachable reduction, before the search starts. The modules
it skipped are named in the report.

Requires the `quant` extra (nvidia-modelopt 0.47, torchprofile 0.0.4). GFLOPs targets only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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


@dataclasses.dataclass
class SearchSpace:
    """What FastNAS can search on a model: its widths, its FLOPs span, and the modules it could not trace."""

    round_to: int
    hparams: dict[str, list]  # searchable width -> its choices
    flops: dict[str, float]  # ModelOpt's count: "max", "centroid", "min" subnet (empty when nothing converts)
    untraceable: list[str]  # module names ModelOpt's tracer skipped ("" is the root)
    log: str  # everything ModelOpt printed
    error: str = ""  # why conversion found nothing to search, when it did not

    def reachable(self) -> float:
        """The largest FLOPs reduction the search space holds (0 when it holds nothing)."""
        return 1.0 - self.flops["min"] / self.flops["max"] if self.flops else 0.0

    def refusal(self, target_gflops: float) -> str | None:
        """The one-line reason a `target_gflops` reduction is out of reach, or None when it is in reach."""
        head = f"FastNAS cannot reach a {target_gflops:.0%} FLOPs reduction on this model: its traced search space"
        if self.error:
            return f"{head} has no searchable width in steps of {self.round_to} ({self.error})"
        if self.reachable() < target_gflops:
            return (
                f"{head} ({len(self.hparams)} searchable widths in steps of {self.round_to}) reaches at most "
                f"{self.reachable():.1%} by ModelOpt's count"
            )
        return None


def search_space(model: nn.Module, dummy: tuple, round_to: int) -> SearchSpace:
    """Convert a copy of `model` to FastNAS's search space and profile it on `dummy` (the model is untouched)."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.opt.conversion import ApplyModeError
    from modelopt.torch.prune.pruning import PruneModeRegistry

    log = io.StringIO()  # ModelOpt prints its search-space tables and warns with its untraceable-module table
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            rules = [("fastnas", fastnas_rules(round_to))]
            converted = mtn.convert(copy.deepcopy(model), rules, registry=PruneModeRegistry)
        except ApplyModeError as error:  # nothing it can trace has a smaller width to try
            text = _with_warnings(log.getvalue(), seen)
            return SearchSpace(round_to, {}, {}, untraceable_modules(text), text, str(error).splitlines()[0])
        hparams = configurable_hparams(converted)
        _, stats = mtn.profile(converted, dummy, verbose=False)
    text = _with_warnings(log.getvalue(), seen)
    flops = {k: float(stats[k]["flops"]) for k in ("max", "centroid", "min") if k in stats}
    return SearchSpace(round_to, hparams, flops, untraceable_modules(text), text)


def _with_warnings(text: str, seen: list) -> str:
    return text + "".join(f"{w.category.__name__}: {w.message}\n" for w in seen)


def configurable_hparams(model: nn.Module) -> dict[str, list]:
    """Every searchable hparam (more than one choice) of the converted modules, once each: the root of a
    model ModelOpt cannot trace stays a plain module, so its children are asked."""
    found, seen = {}, set()
    for name, module in model.named_modules():
        if not hasattr(module, "named_hparams"):
            continue
        for hname, hparam in module.named_hparams(configurable=True):
            if id(hparam) not in seen:
                seen.add(id(hparam))
                found[f"{name}.{hname}" if name else hname] = list(hparam.choices)
    return found


def untraceable_modules(text: str) -> list[str]:
    """Module names in ModelOpt's "cannot be traced" tables (first column of its boxed tables)."""
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("│"):
            first = line.split("│")[1].strip().rstrip(",")
            if first and not first.startswith(("Submodule", "flops", "params", "Constraint")):
                names.append(first)
    return list(dict.fromkeys(names))


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
        import modelopt.torch.prune as mtp
    except ImportError as error:
        raise PruningError(f"FastNAS needs NVIDIA ModelOpt (pip install -e '.[quant]'): {error}") from None
    from compress.oneshot import measured_gflops

    example_batch = batches[0] if example_batch is None else example_batch
    dummy = modelopt_input(model, task, example_batch)
    partition = Partition.of(model, task.partition)
    keep = f"{100 * (1.0 - target_gflops):.6g}%"
    before = {"gflops": measured_gflops(model, task, example_batch), "channels": _out_channels(model, partition)}
    space = search_space(model, dummy, round_to)
    refusal = space.refusal(target_gflops)
    if refusal:
        raise PruningError(refusal)

    def score(net: nn.Module) -> float:
        with torch.no_grad():
            return -sum(float(task.loss_of(task.forward(net, b), b)) for b in batches) / len(batches)

    log = io.StringIO()  # the search's own printing; what matters goes into the report
    with contextlib.redirect_stdout(log), warnings.catch_warnings(), tempfile.TemporaryDirectory() as work:
        for message in ("Per-rank checkpoint", "Checkpoint .* does not exist"):  # our temporary search state
            warnings.filterwarnings("ignore", message=message)
        config = {
            "data_loader": [modelopt_input(model, task, b) for b in batches],
            "collect_func": lambda inputs: inputs,
            "score_func": score,
            "checkpoint": str(Path(work) / "search.pth"),
            "verbose": False,
        }
        pruned, _ = mtp.prune(model, [("fastnas", fastnas_rules(round_to))], {"flops": keep}, dummy, config)
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
            "search_space": {k: {"flops": v} for k, v in space.flops.items()},
            "configurable_hparams": len(space.hparams),
            "untraceable_modules": space.untraceable,  # what it skipped, named (its children may still be searched)
        },
    }
