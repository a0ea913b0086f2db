"""Iterative magnitude pruning (IMP): prune in levels with a short fine-tune after each.

IMP splits the fine-tune budget evenly over its levels, so it gets the same total number of
fine-tune steps as every other method (whose single fine-tune follows one-shot pruning). The
fine-tune between levels is a callback: by default the generic loop of `compress.finetune` on the
task's loss; the reference pipeline passes its own resumable trainer.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from common.finite import NonFiniteLossError
from common.task import Task
from compress.finetune import finetune
from compress.oneshot import measured_gflops, prune_structured, prune_unstructured
from compress.request import PruneRequest, request_dict
from compress.structured import PruningError

FinetuneFn = Callable[[nn.Module, int, int], Any]  # (model, steps, level) -> anything


def level_steps(total: int, levels: int) -> list[int]:
    """The fine-tune budget split as evenly as possible over the levels (earlier levels get the remainder)."""
    return [total // levels + (1 if i < total % levels else 0) for i in range(levels)]


def default_finetune_fn(task: Task, batches: list, lr: float) -> FinetuneFn:
    """Fine-tune on `batches` (cycled) with the task's loss."""

    def run(model: nn.Module, steps: int, level: int) -> None:
        finetune(model, task, batches, steps=steps, lr=lr, seed=level, progress=False)

    return run


def iterative_magnitude_prune(
    model: nn.Module,
    task: Task,
    batches: list,
    request: PruneRequest,
    *,
    example_batch: Any = None,
    finetune_fn: FinetuneFn | None = None,
    train_batches: list | None = None,
    progress: bool = True,
    finetune_last: bool = True,
) -> dict:
    """Prune in `request.imp.levels` magnitude steps with a short fine-tune after each; one combined report.

    The schedule is geometric: after level i the model keeps (1 - target)^(i / levels) of the original
    GFLOPs (or weights), each level's relative target recomputed from the measured GFLOPs, so the last
    level absorbs any overshoot and the total lands on the target ("fractional last level"). The
    per-group cap is applied per level as 1 - (1 - cap)^(1 / levels), which compounds to the one-shot cap.
    Fine-tune steps per level = total / levels: IMP gets the same total budget as one-shot methods.
    With `finetune_last=False` the last level's share is left to the caller (`finetune_steps_remaining`).
    """
    request.validate()
    levels = request.imp.levels
    if levels < 1:
        raise PruningError(f"IMP needs at least one level, got {levels}")
    if request.channel_ratio is not None:
        raise PruningError("IMP prunes to a GFLOPs target or a sparsity, not a channel ratio")
    example_batch = batches[0] if example_batch is None else example_batch
    finetune_fn = finetune_fn or default_finetune_fn(task, train_batches or batches, request.imp.finetune_lr)
    steps = level_steps(request.imp.finetune_steps, levels)
    gflops0 = measured_gflops(model, task, example_batch)
    cap = 1.0 - (1.0 - request.max_group_ratio) ** (1.0 / levels)
    reports, used = [], 0
    for level in range(levels):
        keep = (1.0 - (request.target_gflops or request.sparsity)) ** ((level + 1) / levels)
        if request.structured:
            relative = 1.0 - gflops0 * keep / measured_gflops(model, task, example_batch)
            if relative < 1e-3:  # an earlier level already overshot this one
                continue
            # Intermediate levels take the nearest reachable width: the last level absorbs any miss.
            sub = dataclasses.replace(
                request, method="magnitude", target_gflops=relative, max_group_ratio=cap, best_effort=True
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = prune_structured(model, task, batches, sub, example_batch, progress=False)
        else:
            sub = dataclasses.replace(request, method="magnitude", sparsity=1.0 - keep)
            report = prune_unstructured(model, task, batches, sub, example_batch, progress=False)
        report["level"] = level + 1
        if (level < levels - 1 or finetune_last) and steps[level] > 0:
            _finetune_level(finetune_fn, model, steps[level], level, levels)
            report["finetune_steps"] = steps[level]
            used += steps[level]
        reports.append(report)
    gflops1 = measured_gflops(model, task, example_batch)
    combined = _combined_report(request, reports, gflops0, gflops1, used, request.imp.finetune_steps)
    achieved = combined["gflops_reduction"] if request.structured else combined["sparsity"]
    goal = request.target_gflops if request.structured else request.sparsity
    if abs(achieved - goal) > 0.02:  # IMP cannot undo its levels: the miss is reported, not refused
        combined["target_miss"] = achieved - goal
        warnings.warn(f"IMP reached {achieved:.1%} instead of the requested {goal:.1%}", stacklevel=2)
    return combined


def _finetune_level(finetune_fn: FinetuneFn, model: nn.Module, steps: int, level: int, levels: int) -> None:
    """One level's fine-tune; a loss that becomes NaN/Inf is reported with the level it happened in."""
    try:
        finetune_fn(model, steps, level)
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"IMP's fine-tune after level {level + 1} of {levels}: {error}", error.step) from None


def _combined_report(request, reports: list[dict], gflops0: float, gflops1: float, used: int, budget: int) -> dict:
    """One report for the whole IMP run: totals against the original model, plus each level's."""
    first, last = reports[0], reports[-1]
    combined = {**last, "request": request_dict(request), "levels": reports}
    combined["finetune_steps_used"] = used
    combined["finetune_steps_remaining"] = budget - used
    if last["kind"] != "structured":
        return combined
    combined.update(gflops_before=gflops0, gflops_after=gflops1, gflops_reduction=1.0 - gflops1 / gflops0)
    partitions = {}
    for part, after in last["partitions"].items():
        before = first["partitions"][part]
        partitions[part] = {
            **after,
            "channels_before": before["channels_before"],
            "kept_ratio": after["channels_after"] / before["channels_before"],
            "params_before": before["params_before"],
            "gflops_before": before["gflops_before"],
        }
    combined["partitions"] = partitions
    return combined
