"""One entry point for every pruning method: validate the request, score, select, remove, report.

Every method shares the same harness: the same seeded scoring set, the same GFLOPs target found by
the same bisection, the same caps and rounding. Only the score differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress.altereva import AlterEvaConfig, altereva_saliency, signed_saliency
from compress.baselines import (
    PROSPR_MODES,
    IMPConfig,
    ProsprConfig,
    SynFlowConfig,
    iterative_magnitude_prune,
    magnitude_channel_scores,
    magnitude_weight_scores,
    prospr_channel_scores,
    prospr_weight_scores,
    synflow_channel_scores,
    synflow_weight_scores,
)
from compress.partition import PARTS, Partition
from compress.scores import altereva_scores
from compress.structured import ChannelGraph, PruningError
from compress.unstructured import apply_masks, global_masks, prunable_weights, sparsity_of
from fusion.config import Config
from fusion.data.dataset import collate, make_sample, model_inputs

METHODS = ("altereva", "snip", "magnitude", "random", "synflow", "prospr", "imp")
STRUCTURED_METHODS = METHODS  # every method works at channel and at weight granularity
METHOD_OPTIONS = ("altereva", "imp", "synflow", "prospr")  # PruneRequest fields that belong to one method
SCORING_STREAM = 1000  # scenes of the scoring set come from their own seeded stream


@dataclass
class PruneRequest:
    method: str = "altereva"
    target_gflops: float | None = None  # fraction of GFLOPs to remove (structured)
    channel_ratio: float | None = None  # or: fraction of channels to remove (structured)
    sparsity: float | None = None  # or: fraction of weights to remove (unstructured)
    round_to: int = 8
    max_group_ratio: float = 0.9
    scoring_batches: int = 4
    scoring_batch_size: int = 2
    seed: int = 0
    altereva: AlterEvaConfig = field(default_factory=AlterEvaConfig)
    imp: IMPConfig = field(default_factory=IMPConfig)
    synflow: SynFlowConfig = field(default_factory=SynFlowConfig)
    prospr: ProsprConfig = field(default_factory=ProsprConfig)

    @property
    def structured(self) -> bool:
        return self.sparsity is None

    def validate(self) -> PruneRequest:
        """Reject impossible requests before any work is done."""
        targets = [t for t in (self.target_gflops, self.channel_ratio, self.sparsity) if t is not None]
        if len(targets) != 1:
            raise PruningError("give exactly one of --target-gflops, --channel-ratio or --sparsity")
        if not 0.0 < targets[0] < 1.0:
            raise PruningError(f"the pruning target must be strictly between 0 and 1, got {targets[0]}")
        if self.method not in METHODS:
            raise PruningError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.round_to < 1:
            raise PruningError(f"round_to must be >= 1, got {self.round_to}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise PruningError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio}")
        if self.scoring_batches < 1 or self.scoring_batch_size < 1:
            raise PruningError("the scoring set needs at least one batch of at least one scene")
        if self.method == "imp" and (self.imp.levels < 1 or self.channel_ratio is not None):
            raise PruningError("IMP needs levels >= 1 and a GFLOPs target or a sparsity (not a channel ratio)")
        if self.altereva.floor is not None and not 0.0 <= self.altereva.floor < 1.0:
            raise PruningError(f"the AlterEva floor must be in [0, 1) or None, got {self.altereva.floor}")
        if self.synflow.iterations < 1:
            raise PruningError(f"SynFlow needs at least one iteration, got {self.synflow.iterations}")
        if self.prospr.steps < 0 or self.prospr.mode not in PROSPR_MODES:
            raise PruningError(f"ProsPr needs steps >= 0 and a mode in {PROSPR_MODES}")
        return self


def scoring_set(config: Config, num_batches: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The fixed scoring set D: the same scenes for every method, drawn from a dedicated stream."""
    samples = [make_sample(config, SCORING_STREAM + seed, i) for i in range(num_batches * batch_size)]
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def measured_gflops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """GFLOPs (2 x MACs) counted by torch's FlopCounterMode on one forward pass."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(**inputs)
    return counter.get_total_flops() / 1e9


def parameter_counts(model: nn.Module, partition: Partition) -> dict[str, int]:
    counts = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        counts[partition.part_of(name) or "fusion"] += p.numel()
    return counts


# ---- structured --------------------------------------------------------------------------------
def channel_scores(
    method: str,
    model: nn.Module,
    graph: ChannelGraph,
    partition: Partition,
    batches: list,
    request: PruneRequest,
    progress: bool,
) -> list[torch.Tensor]:
    """Per group, one score per root channel; higher means keep."""
    parts = [g.part for g in graph.groups]
    if method == "altereva":
        saliency = altereva_saliency(model, partition, batches, request.altereva, progress)
        deci = [s.abs() for s in graph.channel_saliency(saliency.deci)]
        reri = {masked: [s.abs() for s in graph.channel_saliency(sal)] for masked, sal in saliency.reri.items()}
        a = request.altereva
        return altereva_scores(deci, reri, parts, a.alpha, a.beta, a.floor)
    if method == "snip":  # |sum theta * g|: AlterEva's DeCI alone (beta = 0)
        return [s.abs() for s in graph.channel_saliency(signed_saliency(model, batches))]
    if method in ("magnitude", "imp"):  # L2 norm of every coupled weight of the channel
        return magnitude_channel_scores(model, graph)
    if method == "synflow":
        mode = "flops" if request.target_gflops is not None else "channels"
        target = request.target_gflops if mode == "flops" else request.channel_ratio
        tiebreak = magnitude_channel_scores(model, graph)
        args = (target, mode, request.round_to, request.max_group_ratio, request.synflow, tiebreak, progress)
        return synflow_channel_scores(model, graph, batches, *args)
    if method == "prospr":
        return prospr_channel_scores(model, graph, batches, request.prospr)
    generator = torch.Generator().manual_seed(request.seed)
    return [torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in graph.groups]


def prune_structured(
    model: nn.Module, request: PruneRequest, batches: list, partition: Partition | None = None, progress: bool = True
) -> dict:
    """Score, select and physically remove channels in place; returns the pruning report."""
    request.validate()
    partition = partition or Partition.of(model)
    example = {k: v[:1] for k, v in model_inputs(batches[0]).items()}
    graph = ChannelGraph(model, partition, example)
    mode, target = (
        ("flops", request.target_gflops) if request.target_gflops is not None else ("channels", request.channel_ratio)
    )
    if mode == "flops":
        reachable = graph.max_reduction(request.round_to, request.max_group_ratio)
        if target > reachable + 0.02:
            raise PruningError(
                f"a {target:.0%} GFLOPs reduction is not reachable: the per-group cap ({request.max_group_ratio:.0%}) "
                f"and round_to={request.round_to} allow at most {reachable:.1%}"
            )
    before = {"gflops": measured_gflops(model, example), "params": parameter_counts(model, partition)}
    flops_before = _flops_by_part(graph, partition, None)
    scores = channel_scores(request.method, model, graph, partition, batches, request, progress)
    tiebreak = magnitude_channel_scores(model, graph)
    pruned = graph.threshold_for(scores, target, mode, request.round_to, request.max_group_ratio, tiebreak=tiebreak)
    flops_after = _flops_by_part(graph, partition, pruned)
    kept = _kept_channels(graph, pruned)
    graph.prune(pruned)
    after = {"gflops": measured_gflops(model, example), "params": parameter_counts(model, partition)}
    return {
        "kind": "structured",
        "request": _request_dict(request),
        "gflops_before": before["gflops"],
        "gflops_after": after["gflops"],
        "gflops_reduction": 1.0 - after["gflops"] / before["gflops"],
        "partitions": {
            part: {
                "channels_before": kept[part][1],
                "channels_after": kept[part][0],
                "kept_ratio": kept[part][0] / kept[part][1] if kept[part][1] else math.nan,
                "params_before": before["params"][part],
                "params_after": after["params"][part],
                "gflops_before": flops_before[part] / 1e9,
                "gflops_after": flops_after[part] / 1e9,
            }
            for part in PARTS
            if kept[part][1] or before["params"][part]
        },
        "widths": graph.widths(),
        "score_summary": _score_summary(scores, graph),
    }


def _flops_by_part(graph: ChannelGraph, partition: Partition, pruned) -> dict[str, float]:
    totals = {part: 0.0 for part in PARTS}
    for layer, flops in graph.flops(pruned).items():
        totals[partition.part_of(layer) or "fusion"] += flops
    return totals


def _kept_channels(graph: ChannelGraph, pruned) -> dict[str, tuple[int, int]]:
    kept = {part: [0, 0] for part in PARTS}
    for group, mask in zip(graph.groups, pruned):
        kept[group.part][0] += group.channels - int(mask.sum())
        kept[group.part][1] += group.channels
    return {part: (k, n) for part, (k, n) in kept.items()}


def _score_summary(scores: list[torch.Tensor], graph: ChannelGraph) -> dict[str, dict[str, float]]:
    summary = {}
    for part in PARTS:
        values = [s for s, g in zip(scores, graph.groups) if g.part == part]
        if values:
            flat = torch.cat(values).double()
            summary[part] = {
                "mean": float(flat.mean()),
                "std": float(flat.std()),
                "min": float(flat.min()),
                "max": float(flat.max()),
            }
    return summary


def _request_dict(request: PruneRequest) -> dict:
    """The request as plain data, without the option blocks of other methods."""
    data = asdict(request)
    for method in METHOD_OPTIONS:
        if request.method != method:
            data.pop(method)
    return data


# ---- unstructured ------------------------------------------------------------------------------
def weight_scores(
    model: nn.Module, partition: Partition, batches: list, request: PruneRequest, progress: bool
) -> dict[str, torch.Tensor]:
    weights = prunable_weights(model)
    if request.method == "altereva":
        saliency = altereva_saliency(model, partition, batches, request.altereva, progress)
        names = list(weights)
        parts = [partition.part_of(n) or "fusion" for n in names]
        deci = [saliency.deci[n].abs() for n in names]
        reri = {masked: [s[n].abs() for n in names] for masked, s in saliency.reri.items()}
        a = request.altereva
        return dict(zip(names, altereva_scores(deci, reri, parts, a.alpha, a.beta, a.floor)))
    if request.method == "snip":
        saliency = signed_saliency(model, batches)
        return {n: saliency[n].abs() for n in weights}
    if request.method in ("magnitude", "imp"):
        return magnitude_weight_scores(model)
    if request.method == "synflow":
        return synflow_weight_scores(model, batches, request.sparsity, request.synflow, progress)
    if request.method == "prospr":
        return prospr_weight_scores(model, batches, request.prospr)
    generator = torch.Generator().manual_seed(request.seed)
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


def prune_unstructured(
    model: nn.Module, request: PruneRequest, batches: list, partition: Partition | None = None, progress: bool = True
) -> dict:
    """Global per-weight masks at the requested sparsity, folded into the weights in place."""
    request.validate()
    partition = partition or Partition.of(model)
    scores = weight_scores(model, partition, batches, request, progress)
    masks = global_masks(scores, request.sparsity)
    apply_masks(model, masks)
    per_part: dict[str, list[int]] = {part: [0, 0] for part in PARTS}
    for name, mask in masks.items():
        part = partition.part_of(name) or "fusion"
        per_part[part][0] += int(mask.sum())
        per_part[part][1] += mask.numel()
    return {
        "kind": "unstructured",
        "request": _request_dict(request),
        "sparsity": sparsity_of(model),
        "partitions": {
            p: {"weights_kept": k, "weights": n, "kept_ratio": k / n} for p, (k, n) in per_part.items() if n
        },
    }


def prune(
    model: nn.Module,
    request: PruneRequest,
    batches: list,
    partition: Partition | None = None,
    progress: bool = True,
    train_set=None,
) -> dict:
    """Prune in place. IMP fine-tunes between its levels (on `train_set`, rendered if None) and leaves
    the last level's share of its budget to the caller: the report's `finetune_steps_remaining`."""
    request.validate()
    if request.method == "imp":
        return iterative_magnitude_prune(
            model, request, batches, partition=partition, progress=progress, train_set=train_set, finetune_last=False
        )
    if request.structured:
        return prune_structured(model, request, batches, partition, progress)
    return prune_unstructured(model, request, batches, partition, progress)
