"""Fine-tuning after pruning: a plain loop over any iterable of batches, with the task's loss.

AdamW by default (any `torch.optim` optimizer can be passed instead), batches cycled as long as
`steps` needs, gradient-norm clipping, and unstructured masks kept: weights that are exact zeros
when fine-tuning starts are held at zero after every step, so a sparse model stays sparse. Models
with their own trainer (the reference pipeline's is resumable and checkpoints) need not use this.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from common import ddp, dist
from common.finite import NonFiniteLossError, describe, non_finite_tensors
from common.progress import progress_bar
from common.task import Task
from compress.unstructured import apply_masks, masks_from_zeros

MASK_THRESHOLD = 0.01  # keep zeros automatically when at least this share of conv/linear weights is exactly zero


def finetune(
    model: nn.Module,
    task: Task,
    batches: Iterable,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    max_grad_norm: float | None = 10.0,
    keep_zeros: bool | None = None,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    sync_bn: bool = False,
    split_batches: bool | Callable[[Any, int, int], Any] = True,
) -> dict[str, Any]:
    """Fine-tune `model` in place for `steps` optimizer steps; returns what happened.

    `keep_zeros`: True holds every exactly-zero conv/linear weight at zero (unstructured pruning),
    False does not, None decides from the model (zeros held when at least 1% of those weights are
    exactly zero, which dense training never produces). `seed` seeds torch before the loop (dropout).
    `optimizer` must be built on the model's current (pruned) parameters.

    Distributed only: `sync_bn` synchronises BatchNorm statistics over the global batch;
    `split_batches` True cuts every batch into this rank's slice (dim 0 of every tensor), a callable
    `split(batch, rank, world)` does it your way, False means `batches` already yields this rank's
    share (a DistributedSampler). Losses are logged as their mean over the ranks.

    A loss, gradient norm (when clipping) or final weights that become NaN/Inf raise `NonFiniteLossError`
    with the step (counted from 1); the loop writes nothing, so a caller that saves afterwards saves nothing.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if optimizer is not None:
        check_optimizer(optimizer, model)
    home = next(model.parameters()).device
    net = ddp.wrap(model, sync_bn)  # the model itself in one process
    masks = masks_from_zeros(model)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    if keep_zeros is None:
        keep_zeros = total > 0 and zeros / total >= MASK_THRESHOLD
    if not keep_zeros:
        masks = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    stream = _cycle(batches)
    share = _sharer(split_batches)
    net.train()
    start, losses = time.perf_counter(), []
    bar = progress_bar(range(steps), desc="fine-tune", enabled=progress)
    completed = False
    try:
        for step in bar:
            batch = share(next(stream))
            loss = task.loss_of(task.forward(net, batch), batch)
            logged = ddp.mean_over_ranks(loss.detach())  # the same value on every rank: they stop together
            if not torch.isfinite(logged):
                raise _stopped(f"the loss became {float(logged)}", step + 1, steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
                if not math.isfinite(norm):
                    raise _stopped(f"the gradient norm became {norm}", step + 1, steps)
            optimizer.step()
            if masks is not None:
                apply_masks(model, masks)
            losses.append(float(logged))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if on_step is not None:
                on_step(step, losses[-1])
        found = non_finite_tensors(model.state_dict()) if steps else []
        if found:
            raise _stopped(f"the weights became NaN/Inf ({describe(found)})", steps, steps)
        completed = True
    finally:
        bar.close()
        ddp.release(model, home, completed)
    model.eval()
    return {
        "steps": steps,
        "lr": lr,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "kept_zeros": bool(keep_zeros),
        "seconds": time.perf_counter() - start,
    }


def _stopped(what: str, step: int, steps: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{what} at fine-tuning step {step} of {steps} (lower the learning rate?); stopped, nothing was saved", step
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer holding parameters the model no longer has: pruning replaces the pruned
    layers' parameters, and such an optimizer would step the old ones while the model trains nothing."""
    own = {id(p) for p in model.parameters()}
    stale = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in own)
    if stale:
        raise ValueError(
            f"the optimizer holds {stale} parameter(s) the model no longer has (built before pruning?): "
            "build it on the pruned model's parameters, or pass none"
        )


def _sharer(split_batches: bool | Callable[[Any, int, int], Any]) -> Callable[[Any], Any]:
    """batch -> what this rank trains on: its slice, on its device (the batch itself in one process)."""
    if not dist.is_distributed():
        return lambda batch: batch
    split = ddp.split_batch if split_batches is True else split_batches
    target = dist.device()
    if split is False:
        return lambda batch: ddp.to_device(batch, target)
    return lambda batch: ddp.to_device(split(batch, dist.rank(), dist.world()), target)


def _cycle(batches: Iterable) -> Iterator:
    """Cycle a list or any re-iterable (a DataLoader starts a new epoch each pass); a one-pass iterator
    is used once. Running out of batches is an error, not a silent early stop."""
    one_pass = iter(batches) is batches
    count = 0
    while True:
        for batch in batches:
            count += 1
            yield batch
        if count == 0 or one_pass:
            raise ValueError(f"fine-tuning ran out of batches after {count} (pass a list or a re-iterable)")
