"""Per-layer latency tables and the latency they predict for a set of kept widths.

A table holds, for every conv/linear layer of one model, its latency (median ms, measured on one backend
with its BN and activation, at the model's real feature-map sizes) on a grid of input x output widths.
Between grid widths a layer costs what the next grid width up costs ("ceil": ONNX Runtime's CPU convolutions
run in blocks of 16 channels, so 40 channels cost what 48 cost, and bilinear interpolation under-predicted
such widths by up to 15%), or, for smooth cost models, bilinear ("linear"); below the smallest grid width the
smallest width's latency is used (tiny layers are overhead-bound, so both err on the slow side). Everything the
table does not cover (pooling, gathers, adds, concats, the runtime's own overhead) is the "rest": the
unpruned model measured end to end minus the sum of the table's full-width entries.

The rest is not always constant. On the `small` preset it is 21% of the latency, almost all of it the
LSS BEV pooling, whose cost is linear in the context channels: a constant rest over-predicted pruned
models by 18-27% (reports/latency-target/rest-ablation-small.md). So a table may carry per-group rest
terms ("rest_terms"): the model measured end to end with one group cut to about a quarter of its width
gives the change of the rest per removed channel of that group; the builder marks which terms to use
(`used`; those that stand out from the others, see `altermoma.latency_table.choose_rest_terms`). Then

    predicted latency = sum over layers of table(c_in, c_out) + rest - sum over groups of slope x removed

A table is valid for one model only: its layers, full widths and feature-map sizes are checked against
the model on load (`check_table`), so a table from another model, preset or backend is a one-line error.
Building tables needs a runtime and lives in `altermoma.latency_table`; this module only reads them.

What a table may claim is bounded, because a timing taken on a busy machine can claim anything: a layer's
cost never falls as its widths grow (the builder fits every grid monotone, `monotone_grid`), the rest
saved by pruning never exceeds the measured rest (`LatencyPredictor` caps the claim), and a prediction
at or below zero is refused. Every table the builder writes carries a quality verdict ("good", "noisy"
or "bad", with its reasons: the reference model's spread while the table was built, the per-layer
noise, how far the monotone fit moved the measurements, the rest terms' bounds). A "bad" table is
refused; a table without a verdict (built before verdicts existed) is read and flagged "unverified".
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.task import PARTS
from compress.structured import ChannelGraph, PruningError, is_depthwise

FORMAT = "altermoma-latency-table"
VERSION = 1  # the quality verdict is an optional key: version-1 tables without it still read ("unverified")
VERDICTS = ("good", "noisy", "bad")  # best first
UNVERIFIED = "unverified"


class LatencyTableError(PruningError):
    """A latency table that cannot be read, or that was measured on another model, preset or backend."""


@dataclass
class LayerEntry:
    """One layer's latency grid: `ms[i][j]` is the median latency at `grid_in[i]` inputs, `grid_out[j]` outputs.

    A depthwise conv's inputs follow its outputs: its grid has one row (`grid_in == [c_in]`)."""

    op: str
    c_in: int
    c_out: int
    shapes: list[list[list[int]]]  # per call of the layer in one forward: [input shape, output shape]
    grid_in: list[int]
    grid_out: list[int]
    ms: list[list[float]]
    snippet: list[str] = field(default_factory=list)  # what was timed, e.g. ["Conv2d", "BatchNorm2d", "ReLU"]
    depthwise: bool = False
    interpolation: str = "ceil"  # "ceil": the next grid width up (a step function); "linear": bilinear

    def lookup(self, c_in: int, c_out: int) -> float:
        """The latency at (c_in, c_out): between grid widths, that of the next grid width up ("ceil", never
        below a step function's true value) or bilinear ("linear"); clamped at the grid's edges."""
        if self.interpolation == "ceil":
            i = min(bisect.bisect_left(self.grid_in, c_in), len(self.grid_in) - 1)
            j = min(bisect.bisect_left(self.grid_out, c_out), len(self.grid_out) - 1)
            return self.ms[0 if self.depthwise else i][j]
        i0, i1, s = _bracket(self.grid_in, c_in) if len(self.grid_in) > 1 else (0, 0, 0.0)
        j0, j1, t = _bracket(self.grid_out, c_out)
        row0 = self.ms[i0][j0] * (1 - t) + self.ms[i0][j1] * t
        row1 = self.ms[i1][j0] * (1 - t) + self.ms[i1][j1] * t
        return row0 * (1 - s) + row1 * s

    @property
    def full_ms(self) -> float:
        return self.lookup(self.c_in, self.c_out)


def _bracket(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around x and the weight of the upper one (clamped outside the grid)."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        last = len(grid) - 1
        return last, last, 0.0
    j = bisect.bisect_right(grid, x)
    lo, hi = grid[j - 1], grid[j]
    return j - 1, j, (x - lo) / (hi - lo)


@dataclass
class LatencyTable:
    backend: str
    layers: dict[str, LayerEntry]
    end_to_end_ms: float  # the unpruned model, measured end to end on the backend
    rest_ms: float  # end_to_end_ms minus the sum of the full-width entries
    environment: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # e.g. the measured interpolation error
    # group root -> {"channels", "kept", "ms_per_channel" (rest saved per removed channel), "used", ...}
    rest_terms: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {"verdict": "good" | "noisy" | "bad", "reasons": [...], the measurements behind them}; {} = unverified
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """The builder's quality verdict, or "unverified" for a table written without one."""
        verdict = self.quality.get("verdict")
        return verdict if verdict in VERDICTS else UNVERIFIED

    @property
    def claimable_rest_ms(self) -> float:
        """The most the rest terms together may claim to save: the measured rest (nothing when it is negative)."""
        return max(self.rest_ms, 0.0)

    def rest_slopes(self) -> dict[str, float]:
        """ms of rest saved per removed root channel, for the terms in use."""
        return {root: float(t["ms_per_channel"]) for root, t in self.rest_terms.items() if t.get("used", True)}

    @property
    def table_full_ms(self) -> float:
        return sum(e.full_ms for e in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "the table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyTableError(f"{source} is not an altermoma latency table (no format: {FORMAT!r})")
        if data.get("version") != VERSION:
            raise LatencyTableError(
                f"{source} has format version {data.get('version')!r}; this toolkit reads {VERSION}"
            )
        try:
            layers = {name: LayerEntry(**entry) for name, entry in data["layers"].items()}
            table = cls(
                backend=str(data["backend"]),
                layers=layers,
                end_to_end_ms=float(data["end_to_end_ms"]),
                rest_ms=float(data["rest_ms"]),
                environment=dict(data.get("environment", {})),
                settings=dict(data.get("settings", {})),
                model=dict(data.get("model", {})),
                checks=dict(data.get("checks", {})),
                rest_terms=dict(data.get("rest_terms", {})),
                quality=dict(data.get("quality") or {}),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise LatencyTableError(f"{source} is malformed: {type(error).__name__}: {error}") from None
        for name, entry in layers.items():
            _check_entry(name, entry, source)
        return table


def _check_entry(name: str, e: LayerEntry, source: str) -> None:
    rows = 1 if e.depthwise else len(e.grid_in)
    shape_ok = len(e.ms) == rows and all(len(row) == len(e.grid_out) for row in e.ms)
    grids_ok = all(g == sorted(set(g)) and g and g[0] >= 1 for g in (e.grid_in, e.grid_out))
    values_ok = all(math.isfinite(v) and v >= 0 for row in e.ms for v in row)
    if not (shape_ok and grids_ok and values_ok and e.interpolation in ("ceil", "linear")):
        raise LatencyTableError(f"{source}: layer {name} has a malformed grid (sorted widths, one finite ms per point)")
    if e.grid_out[-1] != e.c_out or e.grid_in[-1] != e.c_in:
        raise LatencyTableError(f"{source}: layer {name}'s grid does not reach its full width {e.c_in}->{e.c_out}")


def isotonic(values: list[float], weights: list[float] | None = None) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [weighted mean, weight, length]
    for v, w in zip(values, weights or [1.0] * len(values)):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, n2), (m1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [m for m, _, n in blocks for _ in range(n)]


def monotone_grid(ms: list[list[float]]) -> list[list[float]]:
    """A latency grid fitted so that cost never falls as either width grows: each row, then each column,
    made non-decreasing by isotonic regression (the column fit keeps the rows non-decreasing, because
    isotonic regression is order-preserving: row i <= row i' pointwise stays so after the fit)."""
    rows = [isotonic(row) for row in ms]
    columns = [isotonic([row[j] for row in rows]) for j in range(len(rows[0]))]
    return [[columns[j][i] for j in range(len(columns))] for i in range(len(rows))]


def is_monotone(ms: list[list[float]], tolerance: float = 1e-9) -> bool:
    rows_ok = all(a <= b + tolerance for row in ms for a, b in zip(row, row[1:]))
    return rows_ok and all(a <= b + tolerance for r0, r1 in zip(ms, ms[1:]) for a, b in zip(r0, r1))


def save_table(table: LatencyTable, path: str | os.PathLike) -> Path:
    from common.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(table.to_dict(), indent=1))
    return path


def load_table(path: str | os.PathLike) -> LatencyTable:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency table {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LatencyTableError(f"latency table {path} is not JSON: {error}") from None
    return LatencyTable.from_dict(data, source=f"latency table {path}")


# ---- grids --------------------------------------------------------------------------------------
def width_grid(full: int, prunable: bool, round_to: int, max_points: int) -> list[int]:
    """Widths to measure: every `round_to` multiple up to `full` (and `full` itself); when that is more than
    `max_points`, every second, fourth, ... multiple instead (widths stay multiples of a power-of-two step,
    the ones vector units and tensor cores are fastest at). A dimension never pruned: its full width only."""
    if not prunable or full <= 1:
        return [full]
    step = round_to if full > round_to else 1
    while True:
        widths = sorted({*range(step, full + 1, step), full})
        if len(widths) <= max(2, max_points):
            return widths
        step *= 2


def layer_widths(module: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a conv or linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def prunable_dims(graph: ChannelGraph) -> dict[str, tuple[bool, bool]]:
    """For every conv/linear layer that ran: (inputs prunable, outputs prunable) under the graph's groups."""
    dims = {name: [False, False] for name in graph.layer_shapes}
    for group in graph.groups:
        for item in group.items:
            if item.layer in dims:
                dims[item.layer][0 if item.kind == "in" else 1] = True
    modules = dict(graph.model.named_modules())
    for name, d in dims.items():
        if is_depthwise(modules[name]):
            d[0] = d[1]
    return {name: (d[0], d[1]) for name, d in dims.items()}


def table_from_costs(
    graph: ChannelGraph,
    cost: Callable[[str, int, int], float],
    *,
    backend: str = "synthetic",
    round_to: int = 8,
    max_points: int = 8,
    rest_ms: float = 0.0,
    interpolation: str = "linear",
) -> LatencyTable:
    """A table whose entries are `cost(layer, c_in, c_out)` in ms on the usual grid (tests, cost models)."""
    modules = dict(graph.model.named_modules())
    dims = prunable_dims(graph)
    layers = {}
    for name, shapes in graph.layer_shapes.items():
        module = modules[name]
        c_in, c_out = layer_widths(module)
        depthwise = is_depthwise(module)
        grid_out = width_grid(c_out, dims[name][1], round_to, max_points)
        grid_in = [c_in] if depthwise else width_grid(c_in, dims[name][0], round_to, max_points)
        rows = [c_in] if depthwise else grid_in
        ms = [[float(cost(name, co if depthwise else ci, co)) for co in grid_out] for ci in rows]
        layers[name] = LayerEntry(
            type(module).__name__, c_in, c_out, [[i, o] for i, o in shapes], grid_in, grid_out, ms, [], depthwise,
            interpolation,
        )  # fmt: skip
    full = sum(e.full_ms for e in layers.values())
    return LatencyTable(backend, layers, full + rest_ms, rest_ms, settings={"round_to": round_to})


# ---- checks against the model -----------------------------------------------------------------
def check_table(table: LatencyTable, graph: ChannelGraph, backend: str | None = None, source: str = "") -> None:
    """Refuse a table measured on another backend, model, preset or input size (one-line LatencyTableError)."""
    where = f"latency table {source}".strip()
    if backend is not None and table.backend != backend:
        raise LatencyTableError(f"{where} was measured on backend {table.backend!r}, not {backend!r}")
    model_layers = set(graph.layer_shapes)
    missing = sorted(model_layers - set(table.layers))
    extra = sorted(set(table.layers) - model_layers)
    if missing or extra:
        what = f"no entry for layer {missing[0]}" if missing else f"a layer {extra[0]} the model does not have"
        raise LatencyTableError(
            f"{where} has {what} ({len(missing)} missing, {len(extra)} unknown): measured on another model"
        )
    modules = dict(graph.model.named_modules())
    dims = prunable_dims(graph)
    for name in sorted(model_layers):
        entry = table.layers[name]
        widths = layer_widths(modules[name])
        if (entry.c_in, entry.c_out) != widths:
            raise LatencyTableError(
                f"{where}: layer {name} has {entry.c_in}->{entry.c_out} channels in the table but "
                f"{widths[0]}->{widths[1]} in the model (another model or preset, or an already pruned one)"
            )
        shapes = [[list(i), list(o)] for i, o in graph.layer_shapes[name]]
        if entry.shapes != shapes:
            raise LatencyTableError(
                f"{where}: layer {name}'s feature maps differ (table {_shape_text(entry.shapes)}, model "
                f"{_shape_text(shapes)}): another preset, input size or batch size"
            )
        for k, (prunable, grid) in enumerate(zip(dims[name], (entry.grid_in, entry.grid_out))):
            if prunable and len(grid) < 2 and not (k == 0 and entry.depthwise):
                raise LatencyTableError(
                    f"{where}: layer {name}'s {'input' if k == 0 else 'output'} channels are pruned but the "
                    "table has their full width only (built with other protected layers?)"
                )
    _check_rest_terms(table, graph, where)


def _check_rest_terms(table: LatencyTable, graph: ChannelGraph, where: str) -> None:
    modules = dict(graph.model.named_modules())
    for root, term in table.rest_terms.items():
        if root not in table.layers:
            raise LatencyTableError(f"{where}: rest term for {root}, which is not a layer of the model")
        if term.get("channels") != layer_widths(modules[root])[1]:
            raise LatencyTableError(f"{where}: rest term for {root} was measured on {term.get('channels')} channels")


def _shape_text(shapes: list) -> str:
    return ", ".join(f"{'x'.join(map(str, i))}->{'x'.join(map(str, o))}" for i, o in shapes[:2])


# ---- prediction -----------------------------------------------------------------------------------
class LatencyPredictor:
    """Predicted latency of the graph's model for any set of pruned channels, from a checked table."""

    def __init__(self, table: LatencyTable, graph: ChannelGraph, backend: str | None = None, source: str = ""):
        check_table(table, graph, backend, source)
        check_quality(table, source)
        self.table, self.graph = table, graph
        modules = dict(graph.model.named_modules())
        self.full = {name: layer_widths(modules[name]) for name in table.layers}
        self.part = {name: graph.partition.part_of(name) or "fusion" for name in table.layers}
        self.slopes = table.rest_slopes()

    def cost(self, layer: str, removed_in: int, removed_out: int) -> float:
        c_in, c_out = self.full[layer]
        return self.table.layers[layer].lookup(c_in - removed_in, c_out - removed_out)

    def group_slopes(self) -> list[float]:
        """Per current group, the rest saved per removed root channel (0 without a term)."""
        return [self.slopes.get(group.root, 0.0) for group in self.graph.groups]

    def removed(self, pruned: list[torch.Tensor] | None) -> tuple[dict[str, int], dict[str, int]]:
        """Input and output channels removed per layer by the pruned root channels (bool masks per group)."""
        removed_in: dict[str, int] = {}
        removed_out: dict[str, int] = {}
        for group, mask in zip(self.graph.groups, pruned or []):
            for item in group.items:
                if item.layer in self.full:
                    target = removed_out if item.kind == "out" else removed_in
                    target[item.layer] = target.get(item.layer, 0) + int(mask[item.root_idxs].sum())
        return removed_in, removed_out

    def layers_ms(self, pruned: list[torch.Tensor] | None = None) -> dict[str, float]:
        removed_in, removed_out = self.removed(pruned)
        return {name: self.cost(name, removed_in.get(name, 0), removed_out.get(name, 0)) for name in self.full}

    def rest_changes(self, pruned: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Change of the rest (ms, <= 0 when pruning saves) per group root with a rest term, as its slope
        claims it (uncapped; `rest_after` applies the bound)."""
        changes = {}
        for group, slope, mask in zip(self.graph.groups, self.group_slopes(), pruned or []):
            if slope:
                changes[group.root] = -slope * int(mask.sum())
        return changes

    def rest_after(self, claimed_change_ms: float) -> float:
        """The rest after pruning: the terms' summed change, with savings capped at the measured rest
        (work outside the table cannot shrink by more than there is)."""
        return self.table.rest_ms + max(claimed_change_ms, -self.table.claimable_rest_ms)

    def total_ms(self, pruned: list[torch.Tensor] | None = None) -> float:
        return sum(self.layers_ms(pruned).values()) + self.rest_after(sum(self.rest_changes(pruned).values()))

    def check_possible(self, total_ms: float, what: str = "the selection") -> None:
        """Refuse a prediction no model can have: at or below zero (a table whose layers alone cost more
        than the whole model, or a rest it cannot account for)."""
        if not (math.isfinite(total_ms) and total_ms > 0):
            raise LatencyTableError(
                f"latency table predicts {total_ms:.2f} ms for {what}: impossible (its rest is "
                f"{self.table.rest_ms:.2f} ms of {self.table.end_to_end_ms:.2f} ms end to end); rebuild the table"
            )

    def report(self, pruned: list[torch.Tensor]) -> dict[str, Any]:
        """Predicted latency before and after: total, per partition (layers and rest terms) and per layer."""
        before, after = self.layers_ms(None), self.layers_ms(pruned)
        removed_in, removed_out = self.removed(pruned)
        rest_changes = self.rest_changes(pruned)
        claimed = sum(rest_changes.values())
        rest_before, rest_after = self.table.rest_ms, self.rest_after(claimed)
        total_before, total_after = sum(before.values()) + rest_before, sum(after.values()) + rest_after
        self.check_possible(total_before, "the unpruned model")
        self.check_possible(total_after, "the pruned model")
        parts = {p: {"before_ms": 0.0, "after_ms": 0.0, "rest_change_ms": 0.0} for p in PARTS}
        for name in before:  # the partition's layers; the rest its groups' pruning saved, apart
            parts[self.part[name]]["before_ms"] += before[name]
            parts[self.part[name]]["after_ms"] += after[name]
        for root, change in rest_changes.items():
            parts[self.part[root]]["rest_change_ms"] += change
        layers = {}
        for name in before:
            c_in, c_out = self.full[name]
            layers[name] = {
                "part": self.part[name],
                "widths_before": [c_in, c_out],
                "widths_after": [c_in - removed_in.get(name, 0), c_out - removed_out.get(name, 0)],
                "before_ms": before[name],
                "after_ms": after[name],
            }
        return {
            "backend": self.table.backend,
            "predicted_before_ms": total_before,
            "predicted_after_ms": total_after,
            "predicted_ratio": total_after / total_before,
            "predicted_speedup": total_before / total_after,
            "rest_before_ms": rest_before,
            "rest_after_ms": rest_after,
            "rest_changes_ms": rest_changes,
            "rest_claim_capped_ms": max(0.0, -claimed - self.table.claimable_rest_ms),
            "table_end_to_end_ms": self.table.end_to_end_ms,
            "table_quality": self.table.verdict,
            "partitions": {p: v for p, v in parts.items() if v["before_ms"] > 0},
            "layers": layers,
        }


def summary_line(report: dict[str, Any]) -> str | None:
    """One line for the CLI's pruning summary (None when the report has no latency prediction)."""
    latency = report.get("latency")
    if not latency:
        return None
    target = f", target {latency['target']:.0%} of the unpruned prediction" if latency.get("target") else ""
    verdict = latency.get("table_quality", UNVERIFIED)
    why = {UNVERIFIED: " (built without a quality verdict)", "noisy": " (see its quality reasons)"}
    flag = "" if verdict == "good" else f"; table {verdict}{why.get(verdict, '')}"
    return (
        f"predicted latency ({latency['backend']}) {latency['predicted_before_ms']:.2f} -> "
        f"{latency['predicted_after_ms']:.2f} ms ({latency['predicted_speedup']:.2f}x{target}){flag}"
    )


def quality_line(table: LatencyTable) -> str:
    """The verdict and its reasons in one line."""
    if table.verdict == UNVERIFIED:
        return "quality: unverified (the table carries no quality verdict: built before verdicts existed)"
    said = table.quality.get("reasons") or table.quality.get("checks") or ["every check within its limit"]
    return f"quality: {table.verdict} ({'; '.join(said)})"


def check_quality(table: LatencyTable, source: str = "") -> None:
    """Refuse a table its builder judged bad (one line, with the builder's reasons)."""
    if table.verdict == "bad":
        where = f"latency table {source}".strip()
        reasons = "; ".join(table.quality.get("reasons") or ["no reason recorded"])
        raise LatencyTableError(
            f"{where} was judged bad when it was built ({reasons}): rebuild it on a quieter machine"
        )
