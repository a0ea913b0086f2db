"""Latency tables and latency-targeted pruning: the table format, its checks against the model, the greedy
selection (budget, caps, rounding, optimality on a hand-checkable case), the builder's robust measurement,
bounds and quality verdict, the trtexec log parser, the CLI.

No test depends on the machine's speed or load: tables are synthetic (`table_from_costs`) or built with
`FakeTiming`, a deterministic stand-in for the builder's timer whose every sample follows a cost model and a
scripted load. The one build with real timers asserts the table's structure, never its numbers."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import altermoma
from altermoma import latency_table as lt
from altermoma.cli import build_parser, main, prune_request
from altermoma.latency_table import (
    Subject,
    build_table,
    parse_trtexec_folder,
    parse_trtexec_log,
    robust_estimate,
    trtexec_environment,
    write_trtexec_folder,
)
from common.task import Task
from compress.latency import (
    VERDICTS,
    LatencyPredictor,
    LatencyTableError,
    is_monotone,
    isotonic,
    load_table,
    monotone_grid,
    quality_line,
    save_table,
    summary_line,
    table_from_costs,
    width_grid,
)
from compress.latency_select import exhaustive_selection, select_for_latency
from compress.oneshot import prune_structured
from compress.request import PruneRequest
from compress.structured import ChannelGraph, PruningError, min_kept

torch.set_num_threads(1)
TINY = "fusion/weights/tiny-fusion"
ROOT = Path(__file__).resolve().parents[1]


class Chain(nn.Module):
    def __init__(self, widths=(64, 48, 40)):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


def chain(widths=(64, 48, 40), size=8):
    torch.manual_seed(0)
    model = Chain(widths).eval()
    task = Task(
        partition={"camera": ["body."], "lidar": [], "fusion": ["head."]}, loss=lambda out, _b: out.pow(2).mean()
    )
    batch = torch.randn(1, 3, size, size)
    return model, task, batch, ChannelGraph(model, task, batch)


def work(graph):
    """A cost linear in c_in * c_out * positions (ms), plus a small constant per layer."""

    def cost(name, c_in, c_out):
        out_shape = graph.layer_shapes[name][0][1]
        return 1e-4 * c_in * c_out * math.prod(out_shape[2:]) + 0.01

    return cost


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ---- a deterministic timer ---------------------------------------------------------------------------
class Runner:
    """What `FakeTiming` hands the builder: a callable (never timed for real) with its modelled cost."""

    def __init__(self, kind: str, cost: float, widths: dict[str, tuple[int, int]]):
        self.kind, self.cost, self.widths, self.batches = kind, cost, widths, 0

    def __call__(self) -> None:
        pass


class FakeTiming:
    """Stands in for `altermoma.latency_table.Timing`. A snippet costs what its conv/linear does under a
    work model (1e-5 ms per weight per output position + 5 us); a whole model the same summed over its
    layers, plus a rest of `rest_ms` + `rest_per_channel` x the output channels of `rest_layer` (work outside
    the layers that scales with one group, like the LSS pooling). A sample is the cost x `load(call, runner)`
    x (1 +- `jitter`, seeded): the load script plays the other processes of a busy machine."""

    def __init__(self, rest_ms=2.0, rest_layer=None, rest_per_channel=0.0, load=None, jitter=0.01, bump=None):
        self.rest_ms, self.rest_layer, self.rest_per_channel = rest_ms, rest_layer, rest_per_channel
        self.load = load or (lambda call, runner: 1.0)
        self.bump = bump or (lambda widths: 1.0)  # a cost the hardware really has at some widths
        self.jitter, self.rng, self.calls, self.models = jitter, random.Random(0), 0, 0

    @staticmethod
    def work(module, run) -> tuple[float, dict[str, tuple[int, int]]]:
        costs, widths = [], {}

        def hook(layer, _inputs, output):
            positions = output.numel() // output.shape[1 if layer.weight.dim() > 2 else -1]
            costs.append(1e-5 * layer.weight.numel() * positions + 0.005)

        handles = []
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                handles.append(m.register_forward_hook(hook))
                widths[name] = (
                    (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
                )
        with torch.no_grad():
            run()
        for h in handles:
            h.remove()
        return sum(costs), widths

    def snippet(self, module, inputs):
        cost, widths = self.work(module, lambda: [module(x) for x in inputs])
        return Runner("snippet", cost * self.bump(next(iter(widths.values()))), widths)

    def model(self, model, task, batch):
        args, kwargs = task.arguments(batch)
        cost, widths = self.work(model, lambda: model(*args, **kwargs))
        if self.rest_layer is not None:
            cost += self.rest_per_channel * dict(model.named_modules())[self.rest_layer].out_channels
        self.models += 1
        return Runner("reference" if self.models == 1 else "variant", cost + self.rest_ms, widths)

    def samples(self, runners, warmup, rounds):
        out = [[] for _ in runners]
        for runner in runners:
            runner.batches += 1
        for r in range(rounds):
            for k in range(len(runners)):
                i = (k + r) % len(runners)
                self.calls += 1
                noise = 1.0 + self.rng.uniform(-self.jitter, self.jitter)
                out[i].append(runners[i].cost * self.load(self.calls, runners[i]) * noise)
        return out


def fake_build(model, task, batch, timing, **settings):
    settings = {"grid_points": 8, "runs": 10, "warmup": 0, "check_points": 4, "end_to_end_runs": 10, **settings}
    return build_table(Subject(model, task, batch, "test"), "ort-cpu", timing=timing, **settings)


def fake_ms(timing, model, task, batch) -> float:
    """What the fake machine measures for a (pruned) model: the truth a prediction is checked against."""
    return FakeTiming(timing.rest_ms, timing.rest_layer, timing.rest_per_channel).model(model, task, batch).cost


# ---- the table format -----------------------------------------------------------------------------
def test_width_grid_thins_to_power_of_two_multiples():
    assert width_grid(64, True, 8, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert width_grid(256, True, 8, 16) == list(range(16, 257, 16))
    assert width_grid(256, True, 8, 8) == list(range(32, 257, 32))
    assert width_grid(3, False, 8, 8) == [3] and width_grid(6, True, 8, 8) == [1, 2, 3, 4, 5, 6]
    assert width_grid(60, True, 8, 16) == [8, 16, 24, 32, 40, 48, 56, 60]  # the full width even off the lattice


def test_table_round_trip_and_bilinear_lookup(tmp_path):
    _, _, _, graph = chain()
    table = table_from_costs(graph, work(graph), backend="ort-cpu", rest_ms=1.5, max_points=3)
    path = save_table(table, tmp_path / "t.json")
    loaded = load_table(path)
    assert loaded.to_dict() == table.to_dict()
    entry = loaded.layers["body.3"]  # 64 -> 48 at 8x8, thinned to 3 widths at most: steps of 32 and 16
    assert entry.grid_in == [32, 64] and entry.grid_out == [16, 32, 48] and entry.interpolation == "linear"
    cost = work(graph)
    assert entry.lookup(32, 32) == pytest.approx(cost("body.3", 32, 32))
    assert entry.lookup(48, 24) == pytest.approx(cost("body.3", 48, 24))  # bilinear: exact for a bilinear cost
    assert entry.lookup(4, 4) == entry.lookup(32, 16)  # clamped below the grid
    step = replace(entry, interpolation="ceil")  # the next grid width up
    assert step.lookup(40, 20) == pytest.approx(cost("body.3", 64, 32)) and step.lookup(32, 48) == entry.lookup(32, 48)
    assert loaded.rest_ms == 1.5 and loaded.end_to_end_ms == pytest.approx(table.table_full_ms + 1.5)


# ---- checks on load ----------------------------------------------------------------------------
def test_wrong_backend_widths_feature_size_and_file_are_one_line_errors(tmp_path):
    _, _, _, graph = chain()
    table = table_from_costs(graph, work(graph), backend="ort-cpu")
    with pytest.raises(LatencyTableError) as error:
        LatencyPredictor(table, graph, backend="torch-cpu")
    assert "measured on backend 'ort-cpu', not 'torch-cpu'" in one_line(error)
    _, _, _, narrower = chain(widths=(64, 32, 40))
    with pytest.raises(LatencyTableError) as error:
        LatencyPredictor(table, narrower)
    assert "body.3 has 64->48 channels in the table but 64->32 in the model" in one_line(error)
    _, _, _, larger = chain(size=16)
    with pytest.raises(LatencyTableError) as error:
        LatencyPredictor(table, larger)
    assert "feature maps differ" in one_line(error) and "1x3x8x8" in one_line(error)
    _, _, _, deeper = chain(widths=(64, 48, 40, 40))
    with pytest.raises(LatencyTableError) as error:
        LatencyPredictor(table, deeper)
    assert "no entry for layer body.9" in one_line(error) and "another model" in one_line(error)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(LatencyTableError) as error:
        load_table(tmp_path / "bad.json")
    assert "is not an altermoma latency table" in one_line(error)
    data = table.to_dict()
    data["layers"]["body.0"]["ms"][0] = [-1.0]
    (tmp_path / "neg.json").write_text(json.dumps(data))
    with pytest.raises(LatencyTableError) as error:
        load_table(tmp_path / "neg.json")
    assert "malformed grid" in one_line(error)


def test_request_needs_one_target_and_a_table():
    with pytest.raises(PruningError, match="exactly one"):
        PruneRequest(target_gflops=0.5, target_latency=0.5, latency_table="t.json").validate()
    with pytest.raises(PruningError, match="needs --latency-table"):
        PruneRequest(target_latency=0.5).validate()
    with pytest.raises(PruningError, match="IMP"):
        PruneRequest(method="imp", target_latency=0.5, latency_table="t.json").validate()
    with pytest.raises(PruningError, match="strictly between 0 and 1"):
        PruneRequest(target_latency=1.5, latency_table="t.json").validate()


def test_pipeline_default_gflops_target_gives_way_to_a_latency_target():
    parse = build_parser().parse_args
    assert prune_request(parse(["pipeline"])).target_gflops == 0.5
    request = prune_request(parse(["pipeline", "--target-latency", "0.5", "--latency-table", "t.json"]))
    assert request.target_gflops is None and request.target_latency == 0.5
    assert prune_request(parse(["prune", "--out", "x", "--target-gflops", "0.3"])).target_gflops == 0.3


# ---- selection -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [0.9, 0.5])
def test_latency_prune_meets_the_budget_with_caps_and_rounding(cap):
    model, task, batch, graph = chain()
    table = table_from_costs(graph, work(graph), rest_ms=0.5)
    before = {g.root: g.channels for g in graph.groups}
    request = PruneRequest(method="magnitude", target_latency=0.5, latency_table=table, max_group_ratio=cap)
    report = prune_structured(model, task, [batch], request, progress=False)
    latency = report["latency"]
    assert latency["predicted_after_ms"] <= 0.5 * latency["predicted_before_ms"] + 1e-9
    assert latency["predicted_after_ms"] == pytest.approx(latency["selection"]["predicted_ms"])
    assert latency["rest_before_ms"] == latency["rest_after_ms"] == 0.5 and set(latency["partitions"]) == {
        "camera",
        "fusion",
    }
    assert latency["layers"]["body.3"]["widths_after"] == [report["widths"]["body.0"], report["widths"]["body.3"]]
    for root, kept in report["widths"].items():
        assert kept % 8 == 0 or kept == before[root]
        assert kept >= min_kept(before[root], 8, cap)
    # the predicted latency of the physically pruned model, recomputed from a fresh graph and the same costs
    pruned_graph = ChannelGraph(model, task, batch)
    predicted = sum(work(pruned_graph)(n, *_widths(model, n)) for n in pruned_graph.layer_shapes) + 0.5
    assert predicted == pytest.approx(latency["predicted_after_ms"])


def _widths(model, name):
    m = dict(model.named_modules())[name]
    return m.in_channels, m.out_channels


def test_unreachable_budget_is_refused():
    model, task, batch, graph = chain()
    table = table_from_costs(graph, work(graph), rest_ms=100.0)  # the rest alone exceeds half the total
    request = PruneRequest(method="magnitude", target_latency=0.5, latency_table=table)
    with pytest.raises(PruningError, match="not reachable"):
        prune_structured(model, task, [batch], request, progress=False)


def test_greedy_finds_the_optimum_of_a_hand_checkable_case():
    """Two groups of 16 channels (round_to 8: keep 8 or 16 each). Layer costs: first conv 0.25 ms per
    output channel (4 ms full), second 0.125 ms per output channel (2 ms), head free; budget 70% of 6 ms
    = 4.2 ms. Dropping 8 channels saves 2 ms (group A, losing score 3) or 1 ms (group B, losing 1).
    B alone (5 ms) misses the budget, A alone (4 ms) meets it, both (3 ms) too but lose 4: the optimum
    drops A only. Greedy takes B first (1 per ms < 1.5 per ms), then A, and gives B back."""
    _, _, _, graph = chain(widths=(16, 16))
    costs = {"body.0": 0.25, "body.3": 0.125, "head": 0.0}
    table = table_from_costs(graph, lambda name, c_in, c_out: costs[name] * c_out)
    predictor = LatencyPredictor(table, graph)
    assert predictor.total_ms() == pytest.approx(6.0)
    roots = [g.root for g in graph.groups]
    low = {"body.0": [0.375] * 8 + [5.0] * 8, "body.3": [0.125] * 8 + [5.0] * 8}  # A's lowest 8 sum to 3, B's to 1
    scores = [torch.tensor(low[root], dtype=torch.float64) for root in roots]
    masks, info = select_for_latency(graph, predictor, scores, 4.2, 8, 0.9)
    removed = {root: int(m.sum()) for root, m in zip(roots, masks)}
    assert removed == {"body.0": 8, "body.3": 0}
    assert info["moves"] == 2 and info["give_backs"] == 1 and predictor.total_ms(masks) == pytest.approx(4.0)
    best, score = exhaustive_selection(graph, predictor, scores, 4.2, 8, 0.9)
    assert dict(zip(roots, best)) == removed and score == pytest.approx(info["kept_score"])


def test_public_api_takes_a_latency_target():
    model, task, batch, graph = chain()
    table = table_from_costs(graph, work(graph), backend="ort-cpu")
    report = altermoma.prune(
        model, task, [batch], method="random", target_latency=0.6, latency_table=table, latency_backend="ort-cpu",
        progress=False,
    )  # fmt: skip
    assert report["latency"]["predicted_ratio"] <= 0.6 + 1e-9 and report["request"]["target_latency"] == 0.6
    assert report["request"]["latency_table"] == "<in-memory table: ort-cpu>"
    assert summary_line(report).startswith("predicted latency (ort-cpu) ") and "target 60%" in summary_line(report)


def test_a_table_with_a_gflops_target_is_only_reported():
    model, task, batch, graph = chain()
    table = table_from_costs(graph, work(graph))
    request = PruneRequest(method="magnitude", target_gflops=0.4, latency_table=table)
    report = prune_structured(model, task, [batch], request, progress=False)
    assert report["gflops_reduction"] == pytest.approx(0.4, abs=0.02)
    assert "selection" not in report["latency"] and report["latency"]["predicted_ratio"] < 1.0


def test_rest_terms_enter_the_prediction_and_the_selection():
    """A group whose pruning also shrinks work outside the table (pooling over its channels, say)."""
    _, _, _, graph = chain()
    table = table_from_costs(graph, work(graph), rest_ms=40.0)  # the rest term below takes up to 32 ms off it
    roots = [g.root for g in graph.groups]
    scores = [torch.linspace(1.0, 2.0, g.channels, dtype=torch.float64) for g in graph.groups]
    plain = LatencyPredictor(table, graph)
    budget = 0.7 * plain.total_ms()
    without, _ = select_for_latency(graph, plain, scores, budget, 8, 0.9)
    table.rest_terms = {"body.6": {"channels": 40, "kept": 8, "ms_per_channel": 1.0, "used": True}}
    predictor = LatencyPredictor(table, graph)
    masks = [torch.arange(g.channels) < (8 if g.root == "body.6" else 0) for g in graph.groups]
    assert predictor.total_ms(masks) == pytest.approx(plain.total_ms(masks) - 8.0)
    assert predictor.report(masks)["rest_after_ms"] == pytest.approx(40.0 - 8.0)
    with_term, info = select_for_latency(graph, predictor, scores, budget, 8, 0.9)
    assert predictor.total_ms(with_term) <= budget + 1e-9 and info["predicted_ms"] <= budget + 1e-9
    cut = {root: (int(a.sum()), int(b.sum())) for root, a, b in zip(roots, without, with_term)}
    assert cut["body.6"][1] > cut["body.6"][0]  # the cheaper group is cut deeper once its rest saving is known
    table.rest_terms = {"body.6": {"channels": 48, "kept": 8, "ms_per_channel": 0.1}}
    with pytest.raises(LatencyTableError, match="measured on 48 channels"):
        LatencyPredictor(table, graph)


def test_a_rest_claim_is_capped_at_the_measured_rest_and_an_impossible_prediction_refused():
    _, _, _, graph = chain()
    table = table_from_costs(graph, work(graph), rest_ms=3.0)
    table.rest_terms = {"body.6": {"channels": 40, "kept": 8, "ms_per_channel": 1.0, "used": True}}
    predictor = LatencyPredictor(table, graph)
    masks = [torch.arange(g.channels) < (8 if g.root == "body.6" else 0) for g in graph.groups]
    layers = sum(predictor.layers_ms(masks).values())
    report = predictor.report(masks)  # the term claims 8 ms of a 3 ms rest: it may claim 3
    assert report["rest_after_ms"] == 0.0 and report["rest_claim_capped_ms"] == pytest.approx(5.0)
    assert predictor.total_ms(masks) == pytest.approx(layers) == report["predicted_after_ms"]
    scores = [torch.linspace(1.0, 2.0, g.channels, dtype=torch.float64) for g in graph.groups]
    chosen, info = select_for_latency(graph, predictor, scores, 0.5 * predictor.total_ms(), 8, 0.9)
    assert info["predicted_ms"] == pytest.approx(predictor.total_ms(chosen)) and predictor.report(chosen)
    # layers timed alone costing far more than the whole model: the rest is so negative nothing is positive
    broken = table_from_costs(graph, work(graph), rest_ms=-1.01 * table.table_full_ms)
    with pytest.raises(LatencyTableError, match="impossible") as error:
        select_for_latency(graph, LatencyPredictor(broken, graph), scores, 1.0, 8, 0.9)
    assert "predicts -" in one_line(error) and "the unpruned model" in one_line(error)
    half = table_from_costs(graph, work(graph), rest_ms=-0.9 * table.table_full_ms)  # positive unpruned only
    with pytest.raises(LatencyTableError, match="impossible"):
        LatencyPredictor(half, graph).report([torch.arange(g.channels) < g.channels - 8 for g in graph.groups])


def test_isotonic_fits_are_monotone_least_squares():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert isotonic([1.0, 2.0, 2.0]) == [1.0, 2.0, 2.0]
    assert isotonic([2.0, 1.0], [3.0, 1.0]) == [1.75, 1.75]  # weighted mean of the pooled block
    rng = random.Random(0)
    for _ in range(50):
        grid = [[rng.uniform(0.0, 1.0) + 0.2 * (i + j) for j in range(5)] for i in range(4)]
        fitted = monotone_grid(grid)
        assert is_monotone(fitted) and not is_monotone([[1.0, 0.5]])
        # least squares along a row: the residuals of each pooled block sum to zero
        assert sum(isotonic(grid[0])) == pytest.approx(sum(grid[0]))
    already = [[1.0, 2.0], [2.0, 3.0]]
    assert monotone_grid(already) == already


def test_robust_estimate_drops_bursts_of_load():
    quiet = [10.0 + 0.01 * (i % 5) for i in range(18)]
    estimate = robust_estimate([*quiet, 40.0, 55.0])  # two calls that another process slowed down
    assert estimate.dropped == 2 and estimate.kept == 18
    assert estimate.ms == pytest.approx(sum(quiet) / 18) and 0 < estimate.relative_se < 0.001
    assert robust_estimate([3.0] * 5).ms == 3.0 and robust_estimate([3.0] * 5).se == 0.0


def test_build_table_with_real_timers_has_the_table_structure():
    """The one build that really times (ONNX Runtime): structure only, never numbers or the verdict. No rest
    terms: whether they are timed depends on the verdict so far (the fake-timed builds test them)."""
    model, task, batch, graph = chain(widths=(16, 16))
    table = build_table(Subject(model, task, batch, "test"), "ort-cpu", grid_points=2, runs=2, warmup=0,
                        check_points=2, end_to_end_runs=2, rest_terms=False)  # fmt: skip
    assert set(table.layers) == {"body.0", "body.3", "head"}
    assert table.layers["body.0"].snippet == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert table.layers["head"].snippet == ["Conv2d"] and table.layers["head"].grid_out == [2]
    assert table.layers["body.3"].grid_in == [8, 16] and table.layers["body.0"].grid_in == [3]
    assert table.rest_terms == {} and table.settings["rest_terms"] == "none: the rest is a constant"
    assert table.environment["threads"] == 1 and table.settings["runs"] == 2 and "interpolation" in table.checks
    assert all(is_monotone(e.ms) for e in table.layers.values())
    assert table.verdict in VERDICTS and set(table.quality["metrics"]) == set(lt.LIMITS)
    assert [r["when"] for r in table.quality["reference"]] == ["start", "after 1 layers", "after 2 layers",
                                                               "end to end", "end"]  # fmt: skip
    assert table.rest_ms == pytest.approx(table.end_to_end_ms - table.table_full_ms)


def test_a_quiet_build_is_good_and_predicts_the_pruned_models(tmp_path):
    """On a steady machine the table reproduces the cost model: entries, rest, the one rest term that
    matters (0.5 ms per channel of body.6) and the predicted latency of models pruned to a budget."""
    model, task, batch, graph = chain()
    timing = FakeTiming(rest_ms=1.0, rest_layer="body.6", rest_per_channel=0.5)
    table = fake_build(model, task, batch, timing)
    assert table.verdict == "good" and table.quality["reasons"] == []
    assert quality_line(table).startswith("quality: good (the unpruned model varied by ")
    assert table.quality["metrics"]["reference_spread"] < 0.05 and table.quality["metrics"]["layer_noise"] < 0.01
    entry = table.layers["body.3"]  # 64 -> 48 convs at 8x8: 1e-5 ms per weight and position + 5 us
    for ci, row in zip(entry.grid_in, entry.ms):
        for co, ms in zip(entry.grid_out, row):
            assert ms == pytest.approx(1e-5 * ci * co * 9 * 64 + 0.005, rel=0.01)
    assert table.rest_ms == pytest.approx(1.0 + 0.5 * 40, rel=0.02)
    assert table.checks["rest_terms"]["used"] == ["body.6"]
    assert table.rest_terms["body.6"]["ms_per_channel"] == pytest.approx(0.5, rel=0.05)
    saved = load_table(save_table(table, tmp_path / "t.json"))
    assert saved.verdict == "good" and saved.quality == json.loads(json.dumps(table.quality))
    for target in (0.5, 0.7):
        pruned = chain()[0]
        request = PruneRequest(method="magnitude", target_latency=target, latency_table=table)
        report = prune_structured(pruned, task, [batch], request, progress=False)
        predicted = report["latency"]["predicted_after_ms"]
        assert predicted == pytest.approx(fake_ms(timing, pruned, task, batch), rel=0.03)
        assert report["latency"]["table_quality"] == "good" and "; table" not in summary_line(report)


def test_bursts_and_a_slow_width_are_measured_again_and_fitted_monotone():
    """Every 7th call 4x slower (another process), and one width slow only the first time it is timed:
    bursts are dropped as outliers, the slow entry disagrees with its neighbours and is timed again; a
    width the hardware really runs slowly (body.3 at 64 -> 40) stays slow and the monotone fit absorbs it."""
    model, task, batch, graph = chain()
    first = {}  # the first runner built for a 32 -> 32 conv (body.3's): timed while something else ran

    def load(call, runner):
        first_slow = runner.widths.get("0") == (32, 32) and first.setdefault("runner", runner) is runner
        return 4.0 if call % 7 == 0 else 3.0 if first_slow else 1.0

    timing = FakeTiming(load=load, bump=lambda widths: 1.3 if widths == (64, 40) else 1.0)
    table = fake_build(model, task, batch, timing, rest_terms=False)
    again = {(p["layer"], p["c_in"], p["c_out"]) for p in table.checks["retimed"]["points"]}
    assert ("body.3", 32, 32) in again
    assert ("body.3", 64, 40) not in again and all(is_monotone(e.ms) for e in table.layers.values())
    entry = table.layers["body.3"]
    assert entry.lookup(32, 32) == pytest.approx(1e-5 * 32 * 32 * 9 * 64 + 0.005, rel=0.01)  # timed again: true
    slow = 1.3 * (1e-5 * 64 * 40 * 9 * 64 + 0.005)
    assert entry.lookup(64, 40) < slow and entry.lookup(64, 48) >= entry.lookup(64, 40)
    assert table.quality["layers"]["body.3"]["monotone_adjustment"] > 0
    assert table.quality["layers"]["body.3"]["dropped_samples"] > 0
    assert table.verdict == "good", table.quality["reasons"]


def test_a_machine_that_slows_down_halfway_gives_a_bad_table_that_prune_refuses():
    model, task, batch, graph = chain()
    timing = FakeTiming(load=lambda call, runner: 1.4 if call > 400 else 1.0)  # another job starts
    table = fake_build(model, task, batch, timing)
    assert timing.calls > 800 and table.verdict == "bad"
    spread = table.quality["metrics"]["reference_spread"]  # 1.4 - 1.0 over the median of the checks
    assert spread == pytest.approx(0.4 / 1.4, abs=0.02) or spread == pytest.approx(0.4, abs=0.02)
    reason = f"the unpruned model varied by {spread:.1%} while the table was built (bad above 15%)"
    assert table.quality["reasons"][0] == reason and table.rest_terms == {}  # the rest terms would not help:
    assert table.quality["reasons"][1].startswith("rest terms not timed: the unpruned model had already varied by")
    with pytest.raises(LatencyTableError, match="judged bad when it was built") as error:
        LatencyPredictor(table, graph)
    assert reason in one_line(error)


def test_a_rest_term_beyond_its_bounds_is_measured_again_or_makes_the_table_bad():
    """A pruned model measured at a third of its time claims more rest saved than there is: timed again.
    Once (the next measurement is right): the term is kept. Always: the table is bad, the term unused."""
    model, task, batch, graph = chain()
    rest = {"rest_ms": 1.0, "rest_layer": "body.6", "rest_per_channel": 0.1}  # 5 ms of rest

    def once(call, runner):
        return 0.3 if runner.kind == "variant" and runner.batches == 1 else 1.0

    table = fake_build(model, task, batch, FakeTiming(**rest, load=once))
    assert all(t["attempts"] == 2 for t in table.rest_terms.values()) and table.verdict == "good"
    assert table.checks["rest_terms"]["used"] == ["body.6"]
    always = fake_build(model, task, batch, FakeTiming(**rest, load=lambda c, r: 0.3 if r.kind == "variant" else 1.0))
    assert always.verdict == "bad" and all(t["attempts"] == 3 for t in always.rest_terms.values())
    assert always.checks["rest_terms"]["used"] == []
    reason = next(r for r in always.quality["reasons"] if r.startswith("rest term body.6 "))
    assert "more than the" in reason and "measured outside the layers (3 times)" in reason


def test_an_old_table_without_a_verdict_is_read_and_flagged_unverified(tmp_path):
    model, task, batch, graph = chain()
    data = table_from_costs(graph, work(graph), backend="ort-cpu", rest_ms=0.5).to_dict()
    del data["quality"]  # as written before verdicts existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    table = load_table(tmp_path / "old.json")
    assert table.verdict == "unverified" and quality_line(table).startswith("quality: unverified")
    report = prune_structured(
        model, task, [batch], PruneRequest(method="magnitude", target_latency=0.6, latency_table=table), progress=False
    )
    assert report["latency"]["table_quality"] == "unverified"
    assert summary_line(report).endswith("; table unverified (built without a quality verdict)")


def test_the_committed_tiny_table_from_before_verdicts_still_reads():
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    model, _ = load_checkpoint(TINY)
    graph = ChannelGraph(model, reference_task(model), first_sample(scoring_set(model.config, 1, 1)[0]))
    table = load_table(ROOT / "reports/latency-target/tiny-ort-cpu.json")
    predictor = LatencyPredictor(table, graph, backend="ort-cpu")
    assert table.verdict == "unverified" and predictor.total_ms() == pytest.approx(table.end_to_end_ms)


# ---- TensorRT: the trtexec folder and its log parser ---------------------------------------------------
SAMPLE_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=onnx/model.onnx --fp16
[08/01/2025-10:00:00] [I] === Device Information ===
[08/01/2025-10:00:00] [I] Selected Device: Orin
[08/01/2025-10:00:00] [I] Compute Capability: 8.7
[08/01/2025-10:00:00] [I] TensorRT version: 10.3.0
[08/01/2025-10:00:05] [I] === Performance summary ===
[08/01/2025-10:00:05] [I] Throughput: 812.5 qps
[08/01/2025-10:00:05] [I] Latency: min = 1.21 ms, max = 1.62 ms, mean = 1.25 ms, median = 1.24 ms, percentile(90%) = 1.29 ms, percentile(95%) = 1.31 ms, percentile(99%) = 1.5 ms
[08/01/2025-10:00:05] [I] GPU Compute Time: min = 1.1875 ms, max = 1.5912 ms, mean = 1.2201 ms, median = 1.2134 ms, percentile(90%) = 1.2456 ms, percentile(95%) = 1.2688 ms, percentile(99%) = 1.4021 ms
[08/01/2025-10:00:05] [I] Total GPU Compute Time: 0.61 s
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=onnx/model.onnx --fp16
"""


def test_trtexec_log_parser_reads_the_gpu_compute_median():
    assert parse_trtexec_log(SAMPLE_LOG) == pytest.approx(1.2134)
    assert parse_trtexec_log(SAMPLE_LOG.replace("1.2134", "2.5e-02")) == pytest.approx(0.025)
    assert trtexec_environment(SAMPLE_LOG) == {"device": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}
    with pytest.raises(ValueError, match="no 'GPU Compute Time"):
        parse_trtexec_log("[E] Error[4]: engine build failed", "logs/x.log")


def test_trtexec_folder_round_trip(tmp_path):
    model, task, batch, graph = chain(widths=(16, 16))
    out = write_trtexec_folder(Subject(model, task, batch, "test"), tmp_path / "trt", grid_points=2, runs=30)
    manifest = json.loads((out / "snippets.json").read_text())
    assert set(manifest["rest_terms"]) == {"body.0", "body.3"}
    script = (out / "run_trtexec.sh").read_text()
    assert "--fp16 --warmUp=500 --iterations=30" in script and "run model" in script
    points = [line.split()[1] for line in script.splitlines() if line.startswith("run ")]
    assert all((out / "onnx" / f"{p}.onnx").is_file() for p in points)
    (out / "logs").mkdir()
    logs = [line.split()[-1] for line in script.splitlines() if line.startswith("run ")]
    assert logs[-1] == "model-again"
    for i, log in enumerate(logs):  # a fake device: the model 10 ms, every snippet (i + 1) / 100 ms
        median = 10.0 if log.startswith("model") else 9.0 if log.startswith("rest") else (i + 1) / 100
        (out / "logs" / f"{log}.log").write_text(SAMPLE_LOG.replace("1.2134", str(median)))
    table = parse_trtexec_folder(out)
    assert table.backend == "tensorrt-fp16" and table.environment["device"] == "Orin"
    assert table.end_to_end_ms == 10.0 and table.rest_ms == pytest.approx(10.0 - table.table_full_ms)
    assert set(table.rest_terms) == {"body.0", "body.3"} and table.checks["rest_terms"]["noise_ms"] == 0.0
    LatencyPredictor(table, graph, backend="tensorrt-fp16")  # it fits the model it was written for
    (out / "logs" / f"{points[1]}.log").unlink()
    with pytest.raises(FileNotFoundError, match="run_trtexec.sh"):
        parse_trtexec_folder(out)


# ---- the CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_machine(monkeypatch):
    """The CLI's table builds time on `FakeTiming` (set `.load` on the returned holder for a busy machine)."""
    holder = {"load": None}
    monkeypatch.setattr(lt, "make_timing", lambda backend, threads, workdir: FakeTiming(load=holder["load"]))
    return holder


@pytest.mark.slow  # the CLI on the tiny model; default set: test_cli_latency_table_and_prune_for_a_user_task
def test_cli_latency_table_then_prune_to_a_latency_target(tmp_path, capsys, fake_machine):
    table = tmp_path / "tiny-ort.json"
    argv = ["latency-table", "--checkpoint", TINY, "--out", str(table), "--grid-points", "2", "--runs", "3"]
    assert main([*argv, "--warmup", "0", "--check-points", "2", "--no-rest-terms", "--quiet"]) == 0
    assert "quality: good (" in capsys.readouterr().out
    data = json.loads(table.read_text())
    assert data["backend"] == "ort-cpu" and data["environment"]["threads"] == 1
    assert data["model"]["preset"] == "tiny" and data["settings"]["runs"] == 3
    assert all(len(e["grid_out"]) <= 2 for e in data["layers"].values()) and data["quality"]["verdict"] == "good"
    out = tmp_path / "pruned"
    prune = ["prune", "--checkpoint", TINY, "--method", "magnitude", "--out", str(out), "--latency-table", str(table),
             "--scoring-batches", "1"]  # fmt: skip
    assert main([*prune, "--target-latency", "0.6", "--latency-backend", "ort-cpu"]) == 0
    report = json.loads((out / "checkpoint.json").read_text())["pruning"]
    latency = report["latency"]
    assert latency["predicted_after_ms"] <= 0.6 * latency["predicted_before_ms"] + 1e-9
    assert {"camera", "lidar", "fusion"} == set(latency["partitions"]) and latency["layers"]
    capsys.readouterr()
    prune[prune.index(str(out))] = str(tmp_path / "never-written")
    cases = [  # (a table from another backend: test_wrong_backend_widths_feature_size_and_file_are_one_line_errors)
        ([*prune[:-4], "--target-latency", "0.6"], "needs --latency-table"),
        ([*prune, "--target-latency", "0.6", "--target-gflops", "0.5"], "exactly one"),
        (["latency-table", "--checkpoint", TINY, "--out", str(tmp_path / "c.json"), "--backend", "torch-cuda"], "CUDA"),
    ]
    for argv, message in cases:
        if "CUDA" in message and torch.cuda.is_available():
            continue
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "never-written").exists()


def test_cli_refuses_a_bad_table_and_keeps_the_one_already_there(tmp_path, capsys, fake_machine):
    """A machine that slows down by 40% halfway through the build: error line, exit 2, --out untouched;
    --keep-bad saves it, and prune refuses it."""
    table = tmp_path / "t.json"
    table.write_text("an earlier table")
    fake_machine["load"] = lambda call, runner: 1.4 if call > 150 else 1.0
    argv = ["latency-table", "--task", "examples/pku_fusion.py:setup", "--out", str(table), "--grid-points", "2"]
    argv += ["--runs", "3", "--warmup", "0", "--check-points", "0", "--no-rest-terms", "--quiet"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: latency table not saved: judged bad (the unpruned model "), err
    assert "quality: bad (" in captured.out and table.read_text() == "an earlier table"
    assert main([*argv, "--keep-bad"]) == 0 and load_table(table).verdict == "bad"
    capsys.readouterr()
    prune = ["prune", "--task", "examples/pku_fusion.py:setup", "--method", "snip", "--target-latency", "0.6"]
    assert main([*prune, "--latency-table", str(table), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judged bad when it was built" in err[0] and not (tmp_path / "p").exists()


@pytest.mark.slow  # the CLI table + prune of a user task; default set: the table, verdict and selection unit tests here
def test_cli_latency_table_and_prune_for_a_user_task(tmp_path, monkeypatch, fake_machine):
    """`--task`: a user's model (depthwise and grouped convs, squeeze-excite) gets a table and a latency prune."""
    monkeypatch.chdir(ROOT)
    spec, table = "examples/pku_fusion.py:setup", tmp_path / "pku.json"
    argv = ["latency-table", "--task", spec, "--out", str(table), "--grid-points", "2", "--runs", "3", "--warmup", "1"]
    assert main([*argv, "--no-rest-terms", "--quiet"]) == 0
    out = tmp_path / "pruned"
    prune = ["prune", "--task", spec, "--method", "snip", "--target-latency", "0.6", "--latency-table", str(table)]
    assert main([*prune, "--out", str(out)]) == 0
    latency = json.loads((out / "pruned.json").read_text())["report"]["latency"]
    assert latency["predicted_after_ms"] <= 0.6 * latency["predicted_before_ms"] + 1e-9
    assert latency["table_quality"] == "good"
