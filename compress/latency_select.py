"""Which channels to keep under a latency budget: greedy on importance lost per millisecond saved.

The problem is a knapsack: keep the channels of largest total importance (the method's channel scores,
summed) while the predicted latency stays within the budget. Inside a group the lowest-scored channels go
first (ties by the tie-break, then position, exactly as in the GFLOPs mode), widths move in `round_to`
steps and never below the per-group cap, so a group's only choice is how many whole steps it drops.

Why greedy and not HALP's dynamic-programming knapsack: a layer's latency depends on two groups at
once (its input width is its producer's output width), so the costs are not separable. HALP makes them
separable by freezing every input width at the previous step of its gradual, many-step schedule; in one
shot that freeze is wrong by up to the whole pruning ratio. Greedy recomputes every candidate's saving
from the table after each move, so it sees the coupling exactly. Each move takes, over all groups, the
step (1 to `lookahead` width steps, so a slow width between two fast ones can be jumped over) with the
least importance lost per predicted millisecond saved, until the budget is met; then steps are given back,
most importance per millisecond first, while they still fit (the last move usually overshoots). With a
uniform cost per channel it reduces to the GFLOPs mode's global threshold. Against the exact optimum
(`exhaustive_selection`) on 117 random instances with coupled, non-monotone costs it was optimal in 106 and
lost 0.10% of the score on average, 3.0% at worst (`python -m benchmarks.latency_target selection`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from compress.latency import LatencyPredictor
from compress.structured import ChannelGraph, PruningError, global_ranks, min_kept

LOOKAHEAD = 8  # width steps one move may drop at once


@dataclass
class _Group:
    n: int
    order: torch.Tensor  # channel indices, pruned first first
    prefix: list[float]  # prefix[r]: total score of the r lowest channels
    removable: list[int]  # allowed numbers of removed channels, ascending (0 first)
    items: list[tuple[str, int, list[int]]]  # (layer, 0 in / 1 out, removed at that layer when r root channels go)
    slope: float = 0.0  # rest saved per removed root channel (the table's rest term for this group)


def _groups(graph: ChannelGraph, predictor: LatencyPredictor, scores, tiebreak, round_to, max_group_ratio):
    ranks = global_ranks(scores, tiebreak)
    result = []
    for group, score, rank, slope in zip(graph.groups, scores, ranks, predictor.group_slopes()):
        n = group.channels
        order = group.removal_order(rank)  # attention groups: heads take turns, so steps keep heads equal
        values = score.double()[order]
        prefix = [0.0] + torch.cumsum(values, 0).tolist()
        step = group.step(round_to)
        floor = min_kept(n, step, max_group_ratio)
        kept = sorted({n, *(k for k in range(step, n + 1, step) if k >= floor)}, reverse=True)
        items = []
        for item in group.items:
            if item.layer not in predictor.full:
                continue
            multiplicity = torch.bincount(item.root_idxs, minlength=n)[order]
            cum = [0] + torch.cumsum(multiplicity, 0).tolist()
            items.append((item.layer, 1 if item.kind == "out" else 0, cum))
        result.append(_Group(n, order, prefix, [n - k for k in kept], items, slope))
    return result


class _State:
    """Removed channels per group and per layer, and each layer's current predicted latency."""

    def __init__(self, predictor: LatencyPredictor, groups: list[_Group], removed: list[int]):
        self.predictor, self.groups = predictor, groups
        self.r = list(removed)
        self.removed = {name: [0, 0] for name in predictor.full}
        for g, r in zip(groups, removed):
            for layer, kind, cum in g.items:
                self.removed[layer][kind] += cum[r]
        self.ms = {name: predictor.cost(name, *self.removed[name]) for name in predictor.full}
        self.claimed = -sum(g.slope * r for g, r in zip(groups, removed))  # the rest terms' change, uncapped
        self.rest = predictor.rest_after(self.claimed)  # savings capped at the measured rest
        self.total = sum(self.ms.values()) + self.rest

    def delta(self, gi: int, r_new: int) -> tuple[float, dict[str, list[int]]]:
        """Latency change (new - current, ms) if group gi had r_new channels removed; the new layer counts."""
        g, r_old = self.groups[gi], self.r[gi]
        changed: dict[str, list[int]] = {}
        for layer, kind, cum in g.items:
            counts = changed.setdefault(layer, list(self.removed[layer]))
            counts[kind] += cum[r_new] - cum[r_old]
        change = sum(self.predictor.cost(layer, *counts) - self.ms[layer] for layer, counts in changed.items())
        rest_new = self.predictor.rest_after(self.claimed - g.slope * (r_new - r_old))
        return change + rest_new - self.rest, changed

    def apply(self, gi: int, r_new: int) -> None:
        change, changed = self.delta(gi, r_new)
        for layer, counts in changed.items():
            self.removed[layer] = counts
            self.ms[layer] = self.predictor.cost(layer, *counts)
        self.claimed -= self.groups[gi].slope * (r_new - self.r[gi])
        self.rest = self.predictor.rest_after(self.claimed)
        self.r[gi] = r_new
        self.total = sum(self.ms.values()) + self.rest


def _neighbours(groups: list[_Group]) -> list[set[int]]:
    """Groups sharing a layer with each group (a move of one changes the others' savings)."""
    by_layer: dict[str, set[int]] = {}
    for i, g in enumerate(groups):
        for layer, _, _ in g.items:
            by_layer.setdefault(layer, set()).add(i)
    return [set().union(*(by_layer[layer] for layer, _, _ in g.items)) | {i} for i, g in enumerate(groups)]


def select_for_latency(
    graph: ChannelGraph,
    predictor: LatencyPredictor,
    scores: list[torch.Tensor],
    budget_ms: float,
    round_to: int,
    max_group_ratio: float,
    tiebreak: list[torch.Tensor] | None = None,
    lookahead: int = LOOKAHEAD,
) -> tuple[list[torch.Tensor], dict]:
    """Pruned-channel masks (one bool mask per group) whose predicted latency is at most `budget_ms`,
    keeping as much total score as the greedy finds; and a summary of the search."""
    start = time.perf_counter()
    groups = _groups(graph, predictor, scores, tiebreak, round_to, max_group_ratio)
    state = _State(predictor, groups, [0] * len(groups))
    predictor.check_possible(state.total, "the unpruned model")
    neighbours = _neighbours(groups)
    cache: dict[int, tuple[float, float, int] | None] = {}

    def best_removal(gi: int) -> tuple[float, float, int] | None:
        """(importance lost per ms saved, -ms saved, new r) of the group's best next move, None if none saves."""
        g, r = groups[gi], state.r[gi]
        position = g.removable.index(r)
        best = None
        for r_new in g.removable[position + 1 : position + 1 + lookahead]:
            saved = -state.delta(gi, r_new)[0]
            if saved <= 1e-12:
                continue
            key = ((g.prefix[r_new] - g.prefix[r]) / saved, -saved, r_new)
            best = key if best is None or key < best else best
        return best

    moves = 0
    while state.total > budget_ms:
        for gi in range(len(groups)):
            if gi not in cache:
                cache[gi] = best_removal(gi)
        candidates = [(key, gi) for gi, key in cache.items() if key is not None]
        if not candidates:
            raise _unreachable(state, groups, budget_ms, round_to, max_group_ratio)
        key, gi = min(candidates)
        state.apply(gi, key[2])
        moves += 1
        for other in neighbours[gi]:
            cache.pop(other, None)
    refills = _give_back(state, groups, budget_ms, lookahead)
    predictor.check_possible(state.total)  # e.g. a table whose layers alone cost more than the model
    masks = []
    for g, r in zip(groups, state.r):
        mask = torch.zeros(g.n, dtype=torch.bool)
        mask[g.order[:r]] = True
        masks.append(mask)
    info = {
        "algorithm": "greedy (importance lost per predicted ms saved, then give-back)",
        "budget_ms": budget_ms,
        "predicted_ms": state.total,
        "moves": moves,
        "give_backs": refills,
        "kept_score": sum(g.prefix[-1] - g.prefix[r] for g, r in zip(groups, state.r)),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return masks, info


def _unreachable(state: _State, groups: list[_Group], budget_ms: float, round_to: int, cap: float) -> PruningError:
    full = _State(state.predictor, groups, [0] * len(groups)).total
    smallest = _State(state.predictor, groups, [g.removable[-1] for g in groups]).total
    lowest = min(state.total, smallest)
    return PruningError(
        f"a predicted latency of {budget_ms:.2f} ms ({budget_ms / full:.0%} of {full:.2f} ms) is not reachable: the "
        f"per-group cap ({cap:.0%}), round_to={round_to}, protected layers and the table's rest "
        f"({state.predictor.table.rest_ms:.2f} ms) allow about {lowest:.2f} ms ({lowest / full:.1%})"
    )


def _give_back(state: _State, groups: list[_Group], budget_ms: float, lookahead: int) -> int:
    """Restore width steps, most importance per added ms first, while the budget still holds."""
    refills = 0
    while True:
        best = None
        for gi, g in enumerate(groups):
            r = state.r[gi]
            position = g.removable.index(r)
            for r_new in reversed(g.removable[max(0, position - lookahead) : position]):
                added, _ = state.delta(gi, r_new)
                gain = g.prefix[r] - g.prefix[r_new]
                if gain <= 0 or state.total + added > budget_ms:
                    continue
                ratio = math.inf if added <= 1e-12 else gain / added
                if best is None or (ratio, gain) > best[:2]:
                    best = (ratio, gain, gi, r_new)
        if best is None:
            return refills
        state.apply(best[2], best[3])
        refills += 1


def exhaustive_selection(
    graph: ChannelGraph,
    predictor: LatencyPredictor,
    scores: list[torch.Tensor],
    budget_ms: float,
    round_to: int,
    max_group_ratio: float,
    tiebreak: list[torch.Tensor] | None = None,
    limit: int = 200_000,
) -> tuple[list[int], float]:
    """The exact optimum by enumeration (small instances only): removed channels per group and the kept score."""
    groups = _groups(graph, predictor, scores, tiebreak, round_to, max_group_ratio)
    if math.prod(len(g.removable) for g in groups) > limit:
        raise ValueError(f"more than {limit} combinations: too large to enumerate")
    best_r, best_score = None, -math.inf
    for removed in itertools.product(*(g.removable for g in groups)):
        if _State(predictor, groups, list(removed)).total <= budget_ms:
            score = sum(g.prefix[-1] - g.prefix[r] for g, r in zip(groups, removed))
            if score > best_score:
                best_r, best_score = list(removed), score
    if best_r is None:
        raise PruningError("no selection meets the budget")
    return best_r, best_score
