"""One-shot pruning: score, select, remove, report. Every method shares this harness.

The same scoring set, the same GFLOPs target found by the same bisection, the same caps and
rounding: only the score differs. The model is seen through its `Task` alone.

Under torchrun every rank prunes its own copy of the model (DDP fine-tuning needs the same shapes
everywhere). Gradient passes over the scoring set are shared out (`compress.altereva`); everything
else (tracing, sequential single-batch steps, data-free scores, selection) runs on every rank. The
scores are then broadcast from rank 0, so heterogeneous hardware cannot flip a tie, and the selected
channels are compared across ranks: a mismatch stops every rank before anything is removed.

Gradient passes run on a float64 copy and every score is rounded to 24 significant bits
(`compress.scores`), so the scores, their digest (the report's `scoring` block) and the selection are
the same at any thread count and rank count (docs/reproducibility.md).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from common import dist
from common.task import PARTS, Task
from compress.altereva import AlterEvaSaliency, altereva_saliency, reri_summary, signed_saliency
from compress.baselines import (
    magnitude_channel_scores,
    magnitude_weight_scores,
    output_tensors,
    prospr_channel_scores,
    prospr_weight_scores,
    synflow_channel_scores,
    synflow_weight_scores,
)
from compress.flops import count_flops
from compress.latency import LatencyPredictor, load_table
from compress.latency_select import select_for_latency
from compress.partition import Partition
from compress.peers import TP_PEERS, peer_gradients, tp_channel_scores
from compress.request import PruneRequest, request_dict
from compress.scores import (
    altereva_scores,
    floored_fraction,
    in_float64,
    masked_loss_budgets,
    penalty_units,
    settled,
)
from compress.sparse import needs_cuda_backward
from compress.structured import ChannelGraph, PruningError, protected_layers
from compress.unstructured import apply_masks, global_masks, prunable_weights, sparsity_of

MAX_TARGET_MISS = 0.02  # a result further than 2 points from the request is an error (or, best effort, a warning)
ZERO_THEN_PRUNE_RTOL = 1e-4  # above this, the pruned model differs from the zeroed one: the CLI warns


def measured_gflops(model: nn.Module, task: Task, example_batch: Any) -> float:
    """GFLOPs (2 x MACs) of one forward pass of the example batch: torch's FlopCounterMode, with sparse
    convolutions counted from their rulebook pairs (`compress.flops`)."""
    was_training = model.training
    try:
        model.eval()
        return count_flops(model, lambda: task.forward(model, example_batch)).total / 1e9
    finally:
        model.train(was_training)


GRADIENT_METHODS = ("altereva", "snip", "prospr", "synflow", "imp", "tp-taylor", "tp-hessian")  # imp: fine-tunes


def check_gradients_possible(model: nn.Module, method: str) -> None:
    """Refuse, before any work, a gradient method on a model whose layers have no backward here."""
    reason = needs_cuda_backward(model)
    if reason is not None and method in GRADIENT_METHODS:
        raise PruningError(f"method {method!r} needs gradients, but {reason}")


UNCOUNTED_WARN_SHARE = 0.05  # a GFLOPs count that leaves out more of the parameters than this warns


def warn_uncounted(uncounted: dict[str, str], model: nn.Module) -> float:
    """Warn when layers holding more than 5% of the parameters are missing from the GFLOPs count; returns
    their parameter share."""
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters()) or 1
    params = sum(p.numel() for name in uncounted for p in modules[name].parameters())
    if params / total > UNCOUNTED_WARN_SHARE:
        names = ", ".join(sorted(uncounted)[:5])
        warnings.warn(
            f"the GFLOPs count leaves out layers holding {params / total:.1%} of the parameters ({names}): "
            "a GFLOPs target is met on a count without them",
            stacklevel=3,
        )
    return params / total


def parameter_counts(model: nn.Module, partition: Partition) -> dict[str, int]:
    counts = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        counts[partition.part_of(name) or "fusion"] += p.numel()
    return counts


# ---- structured --------------------------------------------------------------------------------
def channel_scores(
    method: str,
    model: nn.Module,
    task: Task,
    graph: ChannelGraph,
    batches: list,
    example_batch: Any,
    request: PruneRequest,
    progress: bool,
    diagnostics: dict | None = None,
) -> list[torch.Tensor]:
    """Per group, one score per root channel; higher means keep. AlterEva puts its ReRI signal-to-noise
    summary into `diagnostics["reri_noise"]` when a dict is given."""
    parts = [g.part for g in graph.groups]
    record = diagnostics if diagnostics is not None else {}  # gradient passes in float64 (compress.scores)
    if method == "altereva":
        score = lambda m, b: altereva_saliency(m, task, b, request.altereva, progress)  # noqa: E731
        saliency = in_float64(score, model, batches, task, record, request.scoring_precision)
        return _altereva_unit_scores(saliency, graph.channel_saliency, parts, request, "channels", diagnostics)
    if method == "snip":  # |sum theta * g|: AlterEva's DeCI alone (beta = 0)
        saliency = in_float64(
            lambda m, b: signed_saliency(m, task, b), model, batches, task, record, request.scoring_precision
        )
        return settled([s.abs() for s in graph.channel_saliency(saliency)])  # as AlterEva's DeCI
    if method in ("magnitude", "imp"):  # L2 norm of every coupled weight of the channel
        return magnitude_channel_scores(model, graph)
    if method == "synflow":
        # SynFlow's rounds need a per-round target; under a latency target they run to the same share of
        # GFLOPs, and the latency selection then picks from SynFlow's order.
        mode = "channels" if request.channel_ratio is not None else "flops"
        target = request.channel_ratio if mode == "channels" else request.target_gflops
        target = 1.0 - request.target_latency if target is None else target
        tiebreak = magnitude_channel_scores(model, graph)
        args = (target, mode, request.round_to, request.max_group_ratio, request.synflow, tiebreak, progress)
        return synflow_channel_scores(model, graph, task.arguments(example_batch), *args)
    if method == "prospr":
        score = lambda m, b: prospr_channel_scores(m, task, graph, b, request.prospr, record)  # noqa: E731
        return in_float64(score, model, batches, task, record, request.scoring_precision)
    if method in TP_PEERS:  # torch-pruning's own importances, on the same groups
        grads = None  # tp-magnitude reads the weights alone
        if method != "tp-magnitude":
            gradients = lambda m, b: peer_gradients(method, m, task, b)  # noqa: E731
            grads = in_float64(gradients, model, batches, task, record, request.scoring_precision)
        return tp_channel_scores(method, model, graph, grads, record)
    generator = torch.Generator().manual_seed(request.seed)
    return [torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in graph.groups]


def prune_structured(
    model: nn.Module,
    task: Task,
    batches: list,
    request: PruneRequest,
    example_batch: Any = None,
    progress: bool = True,
    verify: bool = True,
) -> dict:
    """Score, select and physically remove channels in place; returns the pruning report.

    Targets: GFLOPs or channels (one global threshold), or a predicted latency (`target_latency` with a
    `latency_table`: greedy selection, `compress.latency_select`). A latency table given with another
    target is used for the report only: predicted latency before and after, per partition and per layer.

    With `verify`, the pruned model's outputs on the example batch are compared with the unpruned
    model's outputs after zeroing the same channels ("zero-then-prune"): they agree when the graph
    was understood. A mismatch (an op that mixes channels torch-pruning treats as element-wise) is
    recorded in the report and warned about.
    """
    request.validate()
    check_gradients_possible(model, request.method)
    example_batch = batches[0] if example_batch is None else example_batch
    graph = ChannelGraph(model, task, example_batch)
    partition = graph.partition
    mode, target = (
        ("flops", request.target_gflops) if request.target_gflops is not None else ("channels", request.channel_ratio)
    )
    if request.target_latency is not None:
        mode, target = "latency", request.target_latency
    if not graph.groups:
        raise PruningError("the model has no prunable channel group (every group is protected or unsupported)")
    predictor = latency_predictor(request, graph)  # a wrong table fails here, before any scoring
    if mode == "flops":
        reachable = graph.max_reduction(request.round_to, request.max_group_ratio)
        if target > reachable + 0.02:
            raise PruningError(
                f"a {target:.0%} GFLOPs reduction is not reachable: the per-group cap ({request.max_group_ratio:.0%}), "
                f"round_to={request.round_to}, protected output layers and unprunable groups allow at most {reachable:.1%}"
            )
    before = {"gflops": graph.flop_count.total / 1e9, "params": parameter_counts(model, partition)}
    left_whole = graph.left_whole()
    warn_uncounted(graph.flop_count.uncounted, model)
    flops_before = _flops_by_part(graph, partition, None)
    diagnostics: dict = {}
    start = time.perf_counter()
    scores = channel_scores(request.method, model, task, graph, batches, example_batch, request, progress, diagnostics)
    scores, tiebreak = settled(scores), settled(magnitude_channel_scores(model, graph))  # bit-stable (compress.scores)
    dist.broadcast_(scores + tiebreak)  # every rank selects from rank 0's numbers
    scoring = _scoring_record(scores + tiebreak, diagnostics, time.perf_counter() - start)
    pruned, selection = _select(graph, predictor, scores, tiebreak, request, mode, target)
    for _ in range(3):  # a pruned copy must run before the model itself is cut
        breaking = graph.groups_breaking_the_model(pruned)
        if not breaking:
            break
        keep = [i for i in range(len(graph.groups)) if i not in breaking]
        scores, tiebreak = [scores[i] for i in keep], [tiebreak[i] for i in keep]
        graph.leave_whole({i: f"pruning it breaks the forward pass ({error})" for i, error in breaking.items()})
        if not graph.groups:
            raise PruningError("every prunable group breaks the forward pass when pruned")
        pruned, selection = _select(graph, predictor, scores, tiebreak, request, mode, target)
    else:
        raise PruningError("the pruned model still does not run after leaving three rounds of groups whole")
    dist.check_same(dist.digest([[g.root for g in graph.groups], pruned]), "the selected channels")
    achieved = None
    if mode == "flops":
        pruned, achieved = _aim_at_measured(graph, pruned, scores, tiebreak, request, target)
    scoring["selection_digest"] = dist.digest(pruned)
    miss = _target_miss(graph, pruned, mode, target, achieved)
    if miss is not None and abs(miss) > MAX_TARGET_MISS:
        achieved = target + miss
        message = f"the selection reaches {achieved:.1%} instead of the requested {target:.1%} ({mode}): "
        message += "round_to, the per-group cap, protected and unprunable groups leave no closer choice"
        if not request.best_effort:
            raise PruningError(message + " (--best-effort accepts it)")
        warnings.warn(message, stacklevel=2)
    flops_after = _flops_by_part(graph, partition, pruned)
    kept = _kept_channels(graph, pruned)
    reference = _zeroed_outputs(model, task, graph, pruned, example_batch) if verify else None
    latency = None
    if predictor is not None:
        latency = {"table": _table_name(request.latency_table), "target": request.target_latency}
        latency.update(predictor.report(pruned))
        if selection is not None:
            latency["selection"] = selection
    graph.prune(pruned)
    after = {"gflops": measured_gflops(model, task, example_batch), "params": parameter_counts(model, partition)}
    report = {
        "kind": "structured",
        "request": request_dict(request),
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
        "protected": sorted(graph.protected),
        "unpruned_groups": graph.unprunable,
        "left_whole": left_whole,
        "flop_counting": graph.flop_count.report(),
        "score_summary": _score_summary(scores, graph),
        "scoring": scoring,
        **diagnostics,
    }
    if latency is not None:
        report["latency"] = latency
    if reference is not None:
        report["zero_then_prune_error"] = _relative_error(reference, _outputs(model, task, example_batch))
    return report


def _scoring_record(scores: list[torch.Tensor], diagnostics: dict, seconds: float) -> dict:
    """What two runs compare to know they selected from the same numbers: the digest of the scores (and
    tie-break) the selection ranked, the precision of the gradient passes, torch's threads and the ranks."""
    return {
        "digest": dist.digest(scores),
        "precision": diagnostics.pop("precision", "float64"),  # data-free scores: float64 or exact
        "threads": torch.get_num_threads(),
        "ranks": dist.world(),
        "seconds": seconds,
    }


def _altereva_unit_scores(
    saliency: AlterEvaSaliency,
    signed_units,
    parts: list[str],
    request: PruneRequest,
    kind: str,
    diagnostics: dict | None,
) -> list[torch.Tensor]:
    """AlterEva's score per unit (`signed_units` sums a signed saliency per unit: channels or weights), with
    the configured penalty and partition budget; the ReRI report goes into `diagnostics`."""
    a = request.altereva

    def units(sal):
        return settled([u.abs() for u in signed_units(sal)])

    deci = units(saliency.deci)
    reri = {masked: units(sal) for masked, sal in saliency.reri.items()}
    noise = {masked: None if sal is None else units(sal) for masked, sal in saliency.noise.items()}
    signed = (
        {masked: settled(signed_units(sal)) for masked, sal in saliency.reri.items()} if a.penalty == "signed" else None
    )
    penalty = penalty_units(a.penalty, reri, deci, parts, signed, noise if a.subtract_noise else None)
    budgets = masked_loss_budgets(saliency.masked_loss) if a.normalise == "masked-loss" else None
    if diagnostics is not None:
        diagnostics["reri_noise"] = _reri_noise(saliency, reri, noise, penalty, budgets, parts, request, kind, deci)
    failure = {masked: units(sal) for masked, sal in saliency.masked_deci.items()}
    return altereva_scores(
        deci, penalty, parts, a.alpha, a.beta, a.floor, a.normalise, budgets, failure, a.failure_weight
    )


def _reri_noise(
    saliency: AlterEvaSaliency,
    reri: dict,
    noise: dict,
    penalty: dict,
    budgets: dict | None,
    parts: list[str],
    request: PruneRequest,
    kind: str,
    deci: list,
):
    """The scoring report's ReRI signal-to-noise block; `seconds` is what the zero-step floor cost (its
    extra backward passes plus this summary). `floored` counts units by the penalty actually applied."""
    started = time.perf_counter()
    a = request.altereva
    summary = reri_summary(reri, noise, parts, a, kind, deci)
    summary["floored"] = floored_fraction(deci, penalty, parts, a.alpha, a.beta, a.floor, a.normalise, budgets)
    summary["penalty"] = a.penalty
    summary["restarts"] = a.restarts
    summary["subtract_noise"] = a.subtract_noise
    if budgets is not None:
        summary["budgets"] = budgets
        summary["masked_loss"] = saliency.masked_loss
    summary["reactivation_loss"] = saliency.reactivation_loss
    summary["seconds"] = saliency.noise_seconds + time.perf_counter() - started
    return summary


def latency_predictor(request: PruneRequest, graph: ChannelGraph) -> LatencyPredictor | None:
    """The request's latency table, loaded and checked against the graph's model (None without a table)."""
    table = request.latency_table
    if table is None:
        return None
    loaded = load_table(table) if isinstance(table, str | os.PathLike) else table
    return LatencyPredictor(loaded, graph, request.latency_backend, source=_table_name(table))


def _table_name(table: Any) -> str:
    return str(table) if isinstance(table, str | os.PathLike) else "(in memory)"


def _select(graph: ChannelGraph, predictor, scores, tiebreak, request: PruneRequest, mode: str, target: float):
    """(pruned masks, selection summary or None): the latency knapsack, or the global threshold."""
    if mode == "latency":
        budget = target * predictor.total_ms()
        args = (request.round_to, request.max_group_ratio, tiebreak)
        return select_for_latency(graph, predictor, scores, budget, *args)
    return graph.threshold_for(scores, target, mode, request.round_to, request.max_group_ratio, tiebreak), None


def _aim_at_measured(graph: ChannelGraph, pruned, scores, tiebreak, request: PruneRequest, target: float):
    """Re-aim the analytic target when FLOPs outside conv/linear layers shrink with them.

    The analytic count holds such FLOPs constant. Attention matmuls over a pruned embedding, or an
    MHA's in-projection, shrink with the channels, so the measured reduction runs ahead of the
    predicted one (0.69 measured for 0.50 predicted on a cross-attention fuser). The pruned copy the
    selection was verified on is counted; where it disagrees with the prediction, a few secant steps
    move the analytic aim until the measured reduction lands on the request. Where the two agree
    (every model without such ops, the reference included) nothing changes. Returns the selection
    and the reduction it achieves (measured where measurement and prediction disagree).
    """
    predicted = 1.0 - graph.total_flops(pruned) / graph.total_flops()
    measured = 1.0 - graph.copy_flops / graph.total_flops()
    if abs(measured - predicted) <= 0.005:
        return pruned, predicted
    best = (abs(measured - target), pruned, measured)
    aim, low, high = target, 0.0, 0.99  # aims known to land below / above the request
    for _ in range(8):
        if measured < target:
            low = max(low, aim)
        else:
            high = min(high, aim)
        step = aim + (target - measured)  # secant step, kept inside the bracket
        aim = step if low < step < high else (low + high) / 2
        pruned = graph.threshold_for(scores, aim, "flops", request.round_to, request.max_group_ratio, tiebreak)
        measured = graph.measured_reduction(pruned)
        best = min(best, (abs(measured - target), pruned, measured), key=lambda b: b[0])
        if best[0] <= 0.005:
            break
    return best[1], best[2]


def _target_miss(
    graph: ChannelGraph, pruned: list[torch.Tensor], mode: str, target: float, achieved_flops: float | None
) -> float | None:
    """Achieved minus requested reduction, known before anything is removed (None for latency mode)."""
    if mode == "flops":
        return achieved_flops - target
    if mode == "channels":
        return sum(int(m.sum()) for m in pruned) / sum(g.channels for g in graph.groups) - target
    return None


def _outputs(model: nn.Module, task: Task, example_batch: Any) -> list[torch.Tensor]:
    was_training = model.training
    with torch.no_grad():
        outputs = [t.detach().double() for t in output_tensors(task.forward(model.eval(), example_batch))]
    model.train(was_training)
    return outputs


def _zeroed_outputs(model: nn.Module, task: Task, graph: ChannelGraph, pruned, example_batch: Any):
    """The unpruned model's outputs with the pruned channels' coupled weights zeroed (on a copy)."""
    zeroed = copy.deepcopy(model)
    view = copy.copy(graph)
    view.model = zeroed
    view.zero_channels(pruned)
    return _outputs(zeroed, task, example_batch)


def _relative_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Largest |difference| over every output, divided by the largest |reference| value (at least 1)."""
    if len(reference) != len(candidate) or any(r.shape != c.shape for r, c in zip(reference, candidate)):
        return math.inf
    worst = max((float((r - c).abs().max()) for r, c in zip(reference, candidate) if r.numel()), default=0.0)
    scale = max((float(r.abs().max()) for r in reference if r.numel()), default=1.0)
    return worst / max(1.0, scale)


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


# ---- unstructured ------------------------------------------------------------------------------
def weight_scores(
    model: nn.Module,
    task: Task,
    batches: list,
    example_batch: Any,
    request: PruneRequest,
    protected: set[str],
    progress: bool,
    diagnostics: dict | None = None,
) -> dict[str, torch.Tensor]:
    weights = prunable_weights(model, protected)
    partition = Partition.of(model, task.partition)
    record = diagnostics if diagnostics is not None else {}  # gradient passes in float64 (compress.scores)
    if request.method == "altereva":
        score = lambda m, b: altereva_saliency(m, task, b, request.altereva, progress)  # noqa: E731
        saliency = in_float64(score, model, batches, task, record, request.scoring_precision)
        names = list(weights)
        parts = [partition.part_of(n) or "fusion" for n in names]
        signed = lambda sal: [sal[n] for n in names]  # noqa: E731
        return dict(zip(names, _altereva_unit_scores(saliency, signed, parts, request, "weights", diagnostics)))
    if request.method == "snip":
        saliency = in_float64(
            lambda m, b: signed_saliency(m, task, b), model, batches, task, record, request.scoring_precision
        )
        return {n: saliency[n].abs() for n in weights}
    if request.method in ("magnitude", "imp"):
        return magnitude_weight_scores(model, protected)
    if request.method == "synflow":
        example = task.arguments(example_batch)
        return synflow_weight_scores(model, example, request.sparsity, request.synflow, progress, protected)
    if request.method == "prospr":
        score = lambda m, b: prospr_weight_scores(m, task, b, request.prospr, protected, record)  # noqa: E731
        return in_float64(score, model, batches, task, record, request.scoring_precision)
    generator = torch.Generator().manual_seed(request.seed)
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


def prune_unstructured(
    model: nn.Module,
    task: Task,
    batches: list,
    request: PruneRequest,
    example_batch: Any = None,
    progress: bool = True,
) -> dict:
    """Global per-weight masks at the requested sparsity, folded into the weights in place.

    Output layers (found from the graph) and the task's protected modules keep every weight.
    """
    request.validate()
    check_gradients_possible(model, request.method)
    example_batch = batches[0] if example_batch is None else example_batch
    partition = Partition.of(model, task.partition)
    protected = protected_layers(model, task, example_batch)
    diagnostics: dict = {}
    start = time.perf_counter()
    scores = weight_scores(model, task, batches, example_batch, request, protected, progress, diagnostics)
    scores = dict(zip(scores, settled(list(scores.values()))))  # bit-stable (compress.scores)
    dist.broadcast_(list(scores.values()))  # every rank selects from rank 0's numbers
    scoring = _scoring_record(list(scores.values()), diagnostics, time.perf_counter() - start)
    masks = global_masks(scores, request.sparsity)
    scoring["selection_digest"] = dist.digest(masks)
    dist.check_same(scoring["selection_digest"], "the selected weights")
    apply_masks(model, masks)
    per_part: dict[str, list[int]] = {part: [0, 0] for part in PARTS}
    for name, mask in masks.items():
        part = partition.part_of(name) or "fusion"
        per_part[part][0] += int(mask.sum())
        per_part[part][1] += mask.numel()
    return {
        "kind": "unstructured",
        "request": request_dict(request),
        "sparsity": sparsity_of(model, protected),
        "protected": sorted(protected),
        "partitions": {
            p: {"weights_kept": k, "weights": n, "kept_ratio": k / n} for p, (k, n) in per_part.items() if n
        },
        "scoring": scoring,
        **diagnostics,
    }
