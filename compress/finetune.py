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
) -> dict[str, Any]:
    """Fine-tune `model` in place for `steps` optimizer steps; returns what happened.

    `keep_zeros`: True holds every exactly-zero conv/linear weight at zero (unstructured pruning),
    False does not, None decides from the model (zeros held when at least 1% of those weights are
    exactly zero, which dense training never produces). `seed` seeds torch before the loop (dropout).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
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
    model.train()
    start, losses = time.perf_counter(), []
    bar = progress_bar(range(steps), desc="fine-tune", enabled=progress)
    for step in bar:
        batch = next(stream)
        loss = task.loss_of(task.forward(model, batch), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {float(loss)} at step {step}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        if masks is not None:
            apply_masks(model, masks)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    model.eval()
    return {
        "steps": steps,
        "lr": lr,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "kept_zeros": bool(keep_zeros),
        "seconds": time.perf_counter() - start,
    }


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
