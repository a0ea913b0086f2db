"""Baseline criteria on the shared harness: magnitude (IMP's scorer), SynFlow and ProsPr.

Every criterion returns HIGHER = keep, at two granularities:
- channels: one tensor per torch-pruning group, one score per root channel (`ChannelGraph` order), so
  the scores go through the same global thresholding, caps, rounding and physical removal as AlterEva;
- weights: a dict parameter name -> tensor for `prunable_weights`, for `global_masks`.
SNIP and random live in `compress.oneshot` (SNIP is AlterEva's DeCI term alone); IMP's loop in `compress.imp`.

Choices the papers leave open for this model, fixed here:
- SynFlow runs on a float64 copy (a BEVFusion with |theta| overflows float32 after ~30 layers), with
  BatchNorm as the fixed affine map x / sqrt(1 + eps) * |gamma| + |beta| (running mean 0, var 1).
  Its input is derived from the example inputs: floating tensors become ones, integer tensors (the
  LiDAR pillar map, point-to-cell indices) stay as given, because all-ones coordinates would put
  every point in one cell. The LSS depth softmax is not
  positively homogeneous, so its saliencies can be negative: scores use |theta * dR/dtheta|.
- ProsPr's inner loop is plain SGD (lr 1e-3, as AlterEva's reactivation) in eval mode (BatchNorm as a
  fixed affine map, as every other criterion here), on batches D_1..D_M of the scoring set; the
  meta-loss is taken on the next batch D_{M+1} (cycling). Channel masks multiply every coupled
  weight of a channel, so ProsPr with M = 0 is exactly SNIP on D_1.

Under torchrun ProsPr is one chain of single-batch steps whose loss need not decompose over samples:
every rank computes it whole (exact; no speed-up). Magnitude, SynFlow and random are data-free and
cheap next to a gradient pass over the scoring set: every rank computes them too.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from common.layers import weight_dims
from common.progress import progress_bar
from common.task import Task
from compress.scores import settled
from compress.structured import NORMS, ChannelGraph, global_ranks
from compress.unstructured import global_masks, prunable_weights

Batch = Any  # whatever the task's `inputs` and `loss` take
Arguments = tuple[tuple, dict]  # (positional, keyword) arguments of model(...)
PROSPR_MODES = ("full", "first-order")


@dataclass
class SynFlowConfig:
    iterations: int = 100  # pruning rounds on the exponential schedule (the paper's default)


@dataclass
class ProsprConfig:
    steps: int = 3  # M inner SGD steps
    lr: float = 1e-3  # inner SGD learning rate
    mode: str = "full"  # "full" differentiates through the inner gradients; "first-order" detaches them


# ---- magnitude (IMP's scorer) -------------------------------------------------------------------
def magnitude_channel_scores(model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
    """L2 norm of every coupled weight of a channel (conv out/in slices, BN affine, biases), summed in
    float64 so that the thread count cannot reorder two channels (AlterEva's and SynFlow's tie-break too)."""
    squares = {name: p.detach().double() ** 2 for name, p in model.named_parameters()}
    return [s.sqrt() for s in graph.channel_saliency(squares)]


def magnitude_weight_scores(model: nn.Module, protected: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    return {name: w.detach().abs() for name, w in prunable_weights(model, protected).items()}


# ---- SynFlow ------------------------------------------------------------------------------------
def synflow_network(model: nn.Module) -> nn.Module:
    """A float64 copy with |theta| and BatchNorm reduced to a positive affine map; the model is untouched."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return net


def synflow_inputs(example: Arguments) -> Arguments:
    """The data-free input: every floating tensor of the example arguments set to ones (float64);
    integer tensors (indices, voxel positions) kept as given, so points stay where real data puts them."""

    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.ones_like(v, dtype=torch.float64) if v.is_floating_point() else v.clone()
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(convert(x) for x in v)
        return v

    args, kwargs = example
    return tuple(convert(v) for v in args), {k: convert(v) for k, v in kwargs.items()}


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (a tensor, or dicts/lists/tuples of them), in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        return [t for o in outputs for t in output_tensors(o)]
    return []


def synflow_saliency(net: nn.Module, inputs: Arguments, absolute: bool = True) -> dict[str, torch.Tensor]:
    """theta * dR/dtheta with R the sum of every output of the linearised network."""
    params = dict(net.named_parameters())
    outputs = net(*inputs[0], **inputs[1])
    total = sum(o.sum() for o in output_tensors(outputs))
    if not torch.isfinite(total):
        raise FloatingPointError(f"SynFlow's R overflowed ({float(total)}): the network is too deep for float64")
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    saliency = {}
    for (name, p), g in zip(params.items(), grads):
        s = p.detach() * g if g is not None else torch.zeros_like(p)
        saliency[name] = s.abs() if absolute else s
    return saliency


def _removal_keys(
    scores: list[torch.Tensor], position: list[torch.Tensor], tiebreak: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Removed channels keep their removal position (0 = first); survivors follow in score order."""
    flat_pos = torch.cat(position)
    alive = flat_pos < 0
    ranks = torch.cat(global_ranks(scores, tiebreak))
    survivor_rank = torch.empty(int(alive.sum()), dtype=torch.float64)
    survivor_rank[torch.argsort(ranks[alive])] = torch.arange(len(survivor_rank), dtype=torch.float64)
    keys = flat_pos.double()
    keys[alive] = int((~alive).sum()) + survivor_rank
    return list(torch.split(keys, [len(s) for s in scores]))


def synflow_channel_schedule(
    model: nn.Module,
    graph: ChannelGraph,
    example: Arguments,
    target: float,
    mode: str = "flops",
    round_to: int = 8,
    max_group_ratio: float = 0.9,
    config: SynFlowConfig | None = None,
    tiebreak: list[torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Iterative SynFlow over channel masks: (keys, pruned masks of the last round).

    Round k of n keeps a (1 - target)^(k/n) share of the GFLOPs (or channels), chosen by the shared
    `threshold_for` on scores recomputed with the channels removed so far zeroed. The keys are the
    last round's input: removal positions (0 = removed first), then survivors in SynFlow order; the
    shared thresholding at `target` on them repeats the last round's selection exactly.
    """
    config = config or SynFlowConfig()
    net = synflow_network(model)
    inputs = synflow_inputs(example)
    masked = copy.copy(graph)
    masked.model = net
    pruned = [torch.zeros(g.channels, dtype=torch.bool) for g in graph.groups]
    position = [torch.full((g.channels,), -1, dtype=torch.long) for g in graph.groups]
    removed = 0
    for k in progress_bar(range(1, config.iterations + 1), desc="SynFlow", enabled=progress, leave=False):
        masked.zero_channels(pruned)
        saliency = settled(masked.channel_saliency(synflow_saliency(net, inputs)))  # thread-count free rounds
        keys = _removal_keys(saliency, position, tiebreak)
        goal = 1.0 - (1.0 - target) ** (k / config.iterations)
        chosen = graph.threshold_for(keys, goal, mode, round_to, max_group_ratio)
        fresh = sorted(
            (float(keys[g][c]), g, int(c))
            for g, (new, old) in enumerate(zip(chosen, pruned))
            for c in torch.nonzero(new & ~old).flatten()
        )
        for _, g, c in fresh:
            position[g][c] = removed
            removed += 1
        pruned = [new | old for new, old in zip(chosen, pruned)]  # a removed channel stays removed
    return keys, pruned


def synflow_channel_scores(
    model: nn.Module, graph: ChannelGraph, example: Arguments, *args, **kwargs
) -> list[torch.Tensor]:
    """SynFlow channel scores (higher = keep): the removal order of `synflow_channel_schedule`."""
    return synflow_channel_schedule(model, graph, example, *args, **kwargs)[0]


def synflow_weight_scores(
    model: nn.Module,
    example: Arguments,
    sparsity: float,
    config: SynFlowConfig | None = None,
    progress: bool = False,
    protected: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Iterative SynFlow over weight masks: a weight removed in round k scores k - n - 1, survivors their saliency."""
    config = config or SynFlowConfig()
    net = synflow_network(model)
    inputs = synflow_inputs(example)
    weights = prunable_weights(net, protected)
    keep = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    removed_at = {name: torch.zeros_like(w) for name, w in weights.items()}
    n = config.iterations
    for k in progress_bar(range(1, n + 1), desc="SynFlow", enabled=progress, leave=False):
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(keep[name])
        raw = synflow_saliency(net, inputs)
        saliency = dict(zip(weights, settled([raw[name] for name in weights])))  # thread-count free rounds
        scores = {name: torch.where(keep[name], saliency[name], removed_at[name] - n - 1) for name in weights}
        chosen = global_masks(scores, 1.0 - (1.0 - sparsity) ** (k / n))
        for name in weights:
            removed_at[name][keep[name] & ~chosen[name]] = k
            keep[name] &= chosen[name]
    # Survivors keep their last saliency (>= 0); removed weights sit below, in removal order, so
    # `global_masks` at `sparsity` takes exactly the weights SynFlow removed.
    return {name: torch.where(keep[name], saliency[name], removed_at[name] - n - 1) for name in weights}


# ---- ProsPr -------------------------------------------------------------------------------------
def channel_mask_scales(model: nn.Module, graph: ChannelGraph, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter, the product of every channel mask that touches it, shaped to broadcast onto it.

    A root channel's mask multiplies all its coupled weights (conv out- and in-slices, BN affine,
    biases): d loss / d mask at mask = 1 is then exactly `channel_saliency` of theta * grad.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    factors: dict[tuple[str, int], torch.Tensor] = {}
    for group, mask in zip(graph.groups, masks):
        for item in group.items:
            m = modules[item.layer]
            weight_dim = 0 if isinstance(m, NORMS) else weight_dims(m)[0 if item.kind == "out" else 1]
            targets = [(f"{item.layer}.weight", weight_dim)]
            if m.bias is not None and (item.kind == "out" or isinstance(m, NORMS)):
                targets.append((f"{item.layer}.bias", 0))
            for name, dim in targets:
                vector = factors.get((name, dim))
                if vector is None:
                    vector = torch.ones(params[name].shape[dim], dtype=mask.dtype)
                factors[(name, dim)] = vector.index_put((item.idxs,), mask[item.root_idxs])
    scales: dict[str, torch.Tensor] = {}
    for (name, dim), vector in factors.items():
        shape = [1] * params[name].dim()
        shape[dim] = -1
        scale = vector.view(shape)
        scales[name] = scales[name] * scale if name in scales else scale
    return scales


def functional_loss(task: Task) -> Callable[[nn.Module, dict[str, torch.Tensor], Batch], torch.Tensor]:
    """loss(model, params, batch): the task loss of `model` run with `params` in place of its own parameters."""

    def loss(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        args, kwargs = task.arguments(batch)
        return task.loss_of(functional_call(model, params, args, kwargs), batch)

    return loss


def prospr_mask_gradients(
    model: nn.Module,
    batches: list[Batch],
    masks: list[torch.Tensor],
    scales: dict[str, torch.Tensor],
    config: ProsprConfig,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor], Batch], torch.Tensor],
) -> list[torch.Tensor]:
    """d L(theta_M; D_{M+1}) / d masks at masks = 1, theta_M after M SGD steps on theta * mask."""
    if config.mode not in PROSPR_MODES:
        raise ValueError(f"ProsPr mode must be one of {', '.join(PROSPR_MODES)}, got {config.mode!r}")
    model.eval()
    params = {}
    for name, p in model.named_parameters():
        params[name] = p.detach() * scales[name] if name in scales else p.detach().clone().requires_grad_(True)
    for step in range(config.steps):
        loss = loss_fn(model, params, batches[step % len(batches)])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=config.mode == "full", allow_unused=True)
        params = {
            name: p if g is None else p - config.lr * (g if config.mode == "full" else g.detach())
            for (name, p), g in zip(params.items(), grads)
        }
    loss = loss_fn(model, params, batches[config.steps % len(batches)])
    return list(torch.autograd.grad(loss, masks))


def prospr_channel_scores(
    model: nn.Module,
    task: Task,
    graph: ChannelGraph,
    batches: list[Batch],
    config: ProsprConfig | None = None,
    record: dict | None = None,
) -> list[torch.Tensor]:
    """|meta-gradient| of one multiplicative mask per root channel (`record["prospr"]`: the mode it ran in)."""
    dtype = next(model.parameters()).dtype
    masks = [torch.ones(g.channels, dtype=dtype, requires_grad=True) for g in graph.groups]
    scales = channel_mask_scales(model, graph, masks)
    config = config or ProsprConfig()
    grads = _with_first_order_fallback(
        prospr_mask_gradients, model, batches, masks, scales, config, functional_loss(task), record
    )
    return [g.detach().double().abs() for g in grads]


def _with_first_order_fallback(
    fn, model, batches, masks, scales, config: ProsprConfig, loss_fn, record: dict | None = None
):
    """ProsPr's full mode differentiates through gradients; some kernels have no second derivative
    (PyTorch's CPU flash attention). There the first-order mode is used instead, with a warning, and
    `record["prospr"]` says so: the report names the mode the scores were made in, not only the one asked."""
    record = record if record is not None else {}
    try:
        grads = fn(model, batches, masks, scales, config, loss_fn)
        record["prospr"] = {"mode": config.mode}
        return grads
    except RuntimeError as error:
        if config.mode != "full" or "derivative for" not in str(error):
            raise
        reason = f"ProsPr full mode needs a second derivative the model lacks ({error})"
        warnings.warn(f"{reason}; using first-order", stacklevel=3)
        grads = fn(model, batches, masks, scales, dataclasses.replace(config, mode="first-order"), loss_fn)
        record["prospr"] = {"mode": "first-order", "asked": "full", "reason": reason}
        return grads


def prospr_weight_scores(
    model: nn.Module,
    task: Task,
    batches: list[Batch],
    config: ProsprConfig | None = None,
    protected: set[str] = frozenset(),
    record: dict | None = None,
) -> dict[str, torch.Tensor]:
    """|meta-gradient| of one multiplicative mask per prunable weight (`record["prospr"]`: the mode it ran in)."""
    weights = prunable_weights(model, protected)
    masks = [torch.ones_like(w, requires_grad=True) for w in weights.values()]
    config = config or ProsprConfig()
    scales, loss = dict(zip(weights, masks)), functional_loss(task)
    grads = _with_first_order_fallback(prospr_mask_gradients, model, batches, masks, scales, config, loss, record)
    return {name: g.detach().abs() for name, g in zip(weights, grads)}
