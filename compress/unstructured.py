"""Unstructured pruning: one global threshold over per-weight scores, masks kept during fine-tuning.

Masks are folded into the weights (pruned weights are exact zeros), so a pruned checkpoint is an
ordinary dense checkpoint that exports as is; fine-tuning re-derives the mask from the zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.structured import is_layer


def prunable_weights(model: nn.Module, protected: set[str] | frozenset[str] = frozenset()) -> dict[str, nn.Parameter]:
    """Conv, sparse conv and linear weights, except the `protected` layers (by module name: output layers, the
    task's own)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if is_layer(m) and name not in protected}


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks removing the `sparsity` fraction of weights with the lowest scores, ties broken by order."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    n_prune = int(round(sparsity * flat.numel()))
    order = torch.argsort(flat, stable=True)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_prune]] = False
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-masks of a folded unstructured checkpoint (every conv/linear weight's non-zeros)."""
    return {name: w.detach() != 0 for name, w in prunable_weights(model).items()}


def sparsity_of(model: nn.Module, protected: set[str] | frozenset[str] = frozenset()) -> float:
    weights = list(prunable_weights(model, protected).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)
