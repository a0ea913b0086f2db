"""The peers a user would pick instead of AlterEva: torch-pruning's own group importances, on our harness.

`tp-magnitude` (`tp.importance.GroupMagnitudeImportance`, p = 2), `tp-taylor` (`GroupTaylorImportance`:
|w * dL/dw| summed over the group) and `tp-hessian` (`GroupHessianImportance`: Optimal Brain Damage,
w^2 times the diagonal Fisher), each with torch-pruning's defaults (mean over the group's layers, then
each group's scores divided by their mean, as its global pruning compares them). They score the very
groups `ChannelGraph` prunes, and go through the same selection, caps, rounding and removal as every
other criterion, so only the score differs.

Choices made here, and why:
- Gradients are ours: the mean gradient over the scoring set for Taylor, and for Hessian the diagonal
  Fisher as the mean over the scoring set's batches of the squared batch gradient (a task's batch cannot
  be split into samples in general). torch-pruning 1.6's own `GroupHessianImportance.accumulate_grad`
  never accumulates (it tests a parameter's name against a dict keyed by parameters, so every call
  overwrites: only the last backward counts), so it is not used; the Fisher is handed over as `.grad`,
  which its `__call__` then reads as it does after accumulation.
- Both gradient passes run on a float64 copy (`compress.scores.in_float64`), and the importances are
  computed with the model's parameters in float64 too (restored bit for bit afterwards), so the scores
  do not depend on the thread count; torch-pruning reduces them in float32, and `settled` rounds them
  to 24 bits as every other score.
- Kept as torch-pruning computes them, quirks included, since that is what its users get: 1.6's Taylor
  importance has no BatchNorm rule (its "BN" branch tests GroupNorm's handler), so BN scales add nothing
  to Taylor scores (tests/test_peers.py pins this).
- torch-pruning 1.6 sizes a group's scores by the first layer it scores; after a channels-to-BEV fold
  that layer sees more channels than the group has, and the unwritten tail is cut off before the
  normalisation (`_root_scores`; the groups are named in `tp_importance.padding_cut`).
- torch-pruning's importances know convolutions, linears, BatchNorm and LayerNorm. A group layer they do
  not know (a spconv sparse convolution, an attention's in-projection) adds nothing to its group's
  score; a group with no known layer at all gets no score from torch-pruning and is left whole, named
  in the report (`tp_importance.unscored`). Structured pruning only: these are channel-group scores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from common.task import Task
from compress.altereva import loss_gradients
from compress.structured import ChannelGraph

TP_PEERS = ("tp-magnitude", "tp-taylor", "tp-hessian")
UNSCORED = 1e12  # a group torch-pruning cannot score is kept whole: its scores are normalised to mean 1


def batch_fisher(model: nn.Module, task: Task, batches: list) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over `batches` of each batch's squared loss gradient."""
    fisher: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, g in loss_gradients(model, task, [batch]).items():
            fisher[name] = fisher[name] + g * g if name in fisher else g * g
    return {name: f / len(batches) for name, f in fisher.items()}


def _importance(kind: str):
    """torch-pruning's importance with its defaults, except the normaliser: applied by us after the
    reduction's padding is cut off (`_root_scores`), as torch-pruning's default "mean" normaliser does."""
    if kind == "tp-magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if kind == "tp-taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if kind == "tp-hessian":
        return tp.importance.GroupHessianImportance(normalizer=None)
    raise ValueError(f"unknown peer {kind!r} (choose from {', '.join(TP_PEERS)})")


def _root_scores(score: torch.Tensor, channels: int, root: str, padded: list[str]) -> torch.Tensor:
    """One score per root channel, divided by their mean (torch-pruning's default normaliser).

    torch-pruning 1.6 sizes a group's reduced importance by the FIRST layer it scores and scatters every
    layer's scores onto root indices: when that layer sees the channels expanded (the input of the conv
    after a channels-to-BEV fold: 32 channels x 2 heights = 64), the result is longer than the group and
    its tail is never written. The tail is checked to be empty and cut off before normalising, so the
    group's mean is over its own channels."""
    if score.numel() > channels:
        if torch.count_nonzero(score[channels:]):
            raise RuntimeError(f"torch-pruning scored {score.numel()} channels for {root}'s group of {channels}")
        padded.append(root)
        score = score[:channels]
    elif score.numel() < channels:
        raise RuntimeError(f"torch-pruning scored {score.numel()} channels for {root}'s group of {channels}")
    return score / score.mean()


def tp_channel_scores(
    kind: str, model: nn.Module, graph: ChannelGraph, grads: dict[str, torch.Tensor] | None, record: dict
) -> list[torch.Tensor]:
    """Per group of `graph`, torch-pruning's importance of each root channel (higher = keep).

    `grads` is what the importance reads as `.grad` (Taylor: the mean gradient; Hessian: the diagonal
    Fisher; magnitude: None). Groups torch-pruning cannot score keep every channel (`UNSCORED`) and are
    listed in `record["tp_importance"]["unscored"]`."""
    importance = _importance(kind)
    params = dict(model.named_parameters())
    dtypes = {name: p.dtype for name, p in params.items()}
    scores, unscored, padded = [], [], []
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.data = p.data.double()
                p.grad = None if grads is None else grads[name].to(device=p.device, dtype=torch.float64)
        for group, tp_group in zip(graph.groups, graph.torch_pruning_groups()):
            score = importance(tp_group)
            if score is None:
                unscored.append(group.root)
                score = torch.full((group.channels,), UNSCORED, dtype=torch.float64)
            else:
                score = _root_scores(score.detach().double().cpu(), group.channels, group.root, padded)
            if not torch.isfinite(score).all():  # an all-zero group divided by its mean (tp's normaliser): dead
                score = torch.nan_to_num(score, nan=0.0, posinf=UNSCORED, neginf=0.0)
            scores.append(score)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.grad = None
                p.data = p.data.to(dtypes[name])
    record["tp_importance"] = {"kind": kind, "unscored": unscored, "padding_cut": padded}
    return scores


def peer_gradients(kind: str, model: nn.Module, task: Task, batches: list[Any]) -> dict[str, torch.Tensor] | None:
    """What the peer's importance reads as `.grad`: nothing, the mean gradient, or the diagonal Fisher."""
    if kind == "tp-taylor":
        return loss_gradients(model, task, batches)
    if kind == "tp-hessian":
        return batch_fisher(model, task, batches)
    return None
