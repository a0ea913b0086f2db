"""Baseline criteria: planted dead channels rank last, SynFlow's invariants, ProsPr's limits, IMP's target."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from compress.altereva import AlterEvaConfig, altereva_saliency, signed_saliency
from compress.baselines import (
    ProsprConfig,
    SynFlowConfig,
    channel_mask_scales,
    prospr_channel_scores,
    prospr_mask_gradients,
    prospr_weight_scores,
    synflow_channel_schedule,
    synflow_channel_scores,
    synflow_network,
    synflow_saliency,
    synflow_weight_scores,
)
from compress.imp import iterative_magnitude_prune, level_steps
from compress.oneshot import channel_scores
from compress.prune import prune as prune_with
from compress.request import PruneRequest
from compress.scores import altereva_scores
from compress.structured import ChannelGraph
from compress.unstructured import global_masks, prunable_weights, sparsity_of
from fusion.finetune import FinetuneConfig, imp_finetune_fn
from fusion.models.bevfusion import build_model
from fusion.task import first_sample, reference_task, scoring_set

# One planted channel per group: every coupled weight (conv out/in slices, BN affine, biases) x 1e-3,
# so the channel carries ~nothing. The groups chosen have no naturally dead (exactly zero) channels.
PLANTED = {"fuser.fuse.0": 3, "lidar.blocks.0.conv1": 7, "camera.backbone.layer2.0.conv1": 11}


def _random_model(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def planted(tiny_config):
    """(model, graph, partition, scoring batches) with the PLANTED channels scaled to ~nothing."""
    model = _random_model(tiny_config)
    batches = scoring_set(tiny_config, 2, 1)
    task = reference_task(model)
    graph = ChannelGraph(model, task, first_sample(batches[0]))
    masks = [torch.ones(g.channels) for g in graph.groups]
    for mask, group in zip(masks, graph.groups):
        if group.root in PLANTED:
            mask[PLANTED[group.root]] = 1e-3
    with torch.no_grad():
        for name, scale in channel_mask_scales(model, graph, masks).items():
            model.get_parameter(name).mul_(scale)
    return model, graph, task, batches


def _scores(method, model, graph, task, batches, request):
    return channel_scores(method, model, task, graph, batches, first_sample(batches[0]), request, progress=False)


def _example(model, batches):
    return reference_task(model).arguments(first_sample(batches[0]))


def prune(model, request, batches, progress=False, finetune_fn=None):
    task, example = reference_task(model), first_sample(batches[0])
    return prune_with(model, task, batches, request, example_batch=example, finetune_fn=finetune_fn, progress=progress)


def _planted_ranks(graph, scores) -> dict[str, int]:
    """How many channels of each planted group score strictly below the planted one."""
    return {g.root: int((s < s[PLANTED[g.root]]).sum()) for g, s in zip(graph.groups, scores) if g.root in PLANTED}


# Slow set (`make test-slow`): the planted channel for AlterEva (every beta), SynFlow and ProsPr, whose scoring
# takes longest; the default set keeps SNIP's (AlterEva's DeCI) and magnitude's, and ProsPr-without-steps = SNIP.
# The shared harness keeps its data-free and gradient cases in the slow set too; SynFlow's bit-identity stays.
SLOW_CASES = {
    f"test_planted_channel_ranks_last[{i}]"
    for i in ("altereva", "altereva-beta0", "beta2", "prospr-full", "synflow", "prospr-first-order")
} | {
    f"test_new_methods_prune_through_the_shared_harness[{case}]"
    for case in ("prospr-structured", "prospr-unstructured", "synflow-structured", "synflow-unstructured")
}
# (ProsPr's default-set cases: test_prospr_without_inner_steps_is_snip here and zoo model A in test_zoo.py.)


@pytest.mark.parametrize(
    "method, request_",
    [
        ("magnitude", PruneRequest(target_gflops=0.5)),
        ("snip", PruneRequest(target_gflops=0.5)),
        ("synflow", PruneRequest(target_gflops=0.5, synflow=SynFlowConfig(iterations=5))),
        ("prospr", PruneRequest(target_gflops=0.5)),
        ("prospr", PruneRequest(target_gflops=0.5, prospr=ProsprConfig(mode="first-order"))),
        ("altereva", PruneRequest(target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=1, beta=0.0))),
        ("altereva", PruneRequest(target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=1))),
        ("altereva", PruneRequest(target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=1, beta=2.0))),
    ],
    ids=["magnitude", "snip", "synflow", "prospr-full", "prospr-first-order", "altereva-beta0", "altereva", "beta2"],
)
def test_planted_channel_ranks_last(planted, method, request_):
    model, graph, task, batches = planted
    scores = _scores(method, model, graph, task, batches, request_)
    assert _planted_ranks(graph, scores) == dict.fromkeys(PLANTED, 0)


@pytest.mark.slow  # AlterEva on the planted model; default set: the planted-channel cases of SNIP and magnitude
def test_printed_eq13_ranks_live_channels_below_a_dead_one(planted):
    """Why AlterEva floors its scores: with Eq. 13 as printed (floor=None) the planted channel scores ~0
    while live channels reactivated more than they contribute score below it, so they would go first."""
    model, graph, task, batches = planted
    saliency = altereva_saliency(model, task, batches, AlterEvaConfig(reactivation_steps=1), progress=False)
    deci = [s.abs() for s in graph.channel_saliency(saliency.deci)]
    reri = {k: [s.abs() for s in graph.channel_saliency(v)] for k, v in saliency.reri.items()}
    assert _planted_ranks(graph, deci) == dict.fromkeys(PLANTED, 0)
    parts = [g.part for g in graph.groups]
    printed = altereva_scores(deci, reri, parts, 1.0, 1.0, floor=None)
    assert sum(_planted_ranks(graph, printed).values()) > 0
    floored = altereva_scores(deci, reri, parts, 1.0, 1.0)
    assert _planted_ranks(graph, floored) == dict.fromkeys(PLANTED, 0)


def test_floor_bounds_the_reri_discount_and_keeps_order_by_contribution():
    deci = [torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])]  # shares 0.4, 0.3, 0.2, 0.1, 0
    reri = {"lidar": [torch.tensor([0.0, 1.0, 8.0, 1.0, 0.0])]}  # shares 0, 0.1, 0.8, 0.1, 0
    printed = altereva_scores(deci, reri, ["camera"], 1.0, 1.0, floor=None)[0]
    assert torch.allclose(printed, torch.tensor([0.4, 0.2, -0.6, 0.0, 0.0]), atol=1e-7)
    floored = altereva_scores(deci, reri, ["camera"], 1.0, 1.0, floor=0.01)[0]
    assert torch.allclose(floored, torch.tensor([0.4, 0.2, 0.002, 0.001, 0.0]), atol=1e-7)
    assert torch.argsort(floored).tolist() == [4, 3, 2, 1, 0]  # dead unit first, then by contribution


@pytest.mark.slow  # two scorings of the tiny model
def test_altereva_with_beta_zero_ranks_like_snip_within_each_partition(planted):
    """beta = 0 leaves alpha * DeCI / sum_partition(DeCI): SNIP divided by one positive constant per
    partition. Rankings agree inside a partition; across partitions they need not (that is the point)."""
    model, graph, task, batches = planted
    request = PruneRequest(target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=1, beta=0.0))
    alter = _scores("altereva", model, graph, task, batches, request)
    snip = _scores("snip", model, graph, task, batches, request)
    for part in ("camera", "lidar", "fusion"):
        a = torch.cat([s for s, g in zip(alter, graph.groups) if g.part == part])
        b = torch.cat([s for s, g in zip(snip, graph.groups) if g.part == part])
        assert torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True)), part
        ratio = a[b > 0] / b[b > 0]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9), part


# ---- SynFlow ------------------------------------------------------------------------------------
def test_synflow_leaves_the_model_bit_identical(planted):
    model, graph, _, batches = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synflow_channel_scores(model, graph, _example(model, batches), 0.5, config=SynFlowConfig(iterations=2))
    synflow_weight_scores(model, _example(model, batches), 0.8, SynFlowConfig(iterations=2))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        h = h + self.b(h)
        return {"out": self.head(h.mean(dim=(2, 3)))}


def test_synflow_saliency_is_positive_on_a_relu_network():
    torch.manual_seed(0)
    model = _ConvNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.running_mean.uniform_(-1.0, 1.0)
    saliency = synflow_saliency(synflow_network(model), ((), {"x": torch.ones(1, 3, 6, 6, dtype=torch.float64)}), False)
    assert all(bool((s >= 0).all()) for s in saliency.values())
    assert all(float(s.sum()) > 0 for name, s in saliency.items() if name.endswith("weight"))


def test_synflow_conserves_flow_layer_by_layer_on_a_linear_chain():
    """Bias-free chain: every layer's synaptic saliencies sum to the same R (SynFlow's Theorem 2)."""
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False)
    )
    net = synflow_network(chain)
    inputs = {"input": torch.ones(1, 5, dtype=torch.float64)}
    sums = torch.stack([s.sum() for s in synflow_saliency(net, ((), inputs)).values()])
    with torch.no_grad():
        total = net(**inputs).sum()
    assert torch.allclose(sums, total.expand_as(sums), rtol=1e-5)


@pytest.mark.slow  # an iterative SynFlow run; default set: its bit-identity
def test_synflow_removal_order_reproduces_its_selection(planted):
    model, graph, _, batches = planted
    example = _example(model, batches)
    keys, final = synflow_channel_schedule(model, graph, example, 0.5, config=SynFlowConfig(iterations=4))
    shared = graph.threshold_for(keys, 0.5, "flops", 8, 0.9, tiebreak=[torch.rand(g.channels) for g in graph.groups])
    assert all(torch.equal(a, b) for a, b in zip(shared, final))
    assert abs(1 - graph.total_flops(final) / graph.total_flops() - 0.5) < 0.02
    scores = synflow_weight_scores(model, example, 0.8, SynFlowConfig(iterations=3))
    masks = global_masks(scores, 0.8)  # exactly the weights removed over the rounds (negative scores)
    assert all(torch.equal(masks[n], s >= 0) for n, s in scores.items())


# ---- ProsPr -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "first-order"])
def test_prospr_without_inner_steps_is_snip(planted, mode):
    model, graph, task, batches = planted
    config = ProsprConfig(steps=0, mode=mode)
    prospr = prospr_channel_scores(model, task, graph, batches, config)
    snip = [s.abs() for s in graph.channel_saliency(signed_saliency(model, task, batches[:1]))]
    for p, s in zip(prospr, snip):
        assert torch.allclose(p, s, rtol=1e-5, atol=1e-7 * float(s.max())), "channel"
    weights = prospr_weight_scores(model, task, batches, config)
    saliency = signed_saliency(model, task, batches[:1])
    for name, score in weights.items():
        ref = saliency[name].abs()
        assert torch.allclose(score, ref, rtol=1e-5, atol=1e-7 * float(ref.max())), name


def _mse(model, params, batch):
    return ((functional_call(model, params, (), {"x": batch["x"]})["out"] - batch["y"]) ** 2).mean()


def _unrolled_loss(model, masks, names, batches, steps, lr):
    """L(theta_M) with theta_0 = theta * mask: the objective ProsPr differentiates, evaluated directly."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for name, mask in zip(names, masks):
        params[name] = (params[name] * mask).detach().requires_grad_(True)
    for step in range(steps):
        grads = torch.autograd.grad(_mse(model, params, batches[step]), list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
    return float(_mse(model, params, batches[steps]).detach())


def test_prospr_full_mode_is_the_meta_gradient():
    """Central finite differences of the unrolled loss (float64) against the full-mode mask gradient."""
    torch.manual_seed(0)
    model = _ConvNet().double().eval()
    batches = [{"x": torch.randn(4, 3, 6, 6, dtype=torch.float64), "y": torch.randn(4, 4, dtype=torch.float64)}]
    batches = batches * 3
    names = ["a.0.weight", "b.0.weight"]
    config = ProsprConfig(steps=2, lr=0.5, mode="full")
    masks = [torch.ones_like(model.get_parameter(n), requires_grad=True) for n in names]
    full = prospr_mask_gradients(model, batches, masks, dict(zip(names, masks)), config, loss_fn=_mse)
    first = prospr_mask_gradients(
        model, batches, masks, dict(zip(names, masks)), ProsprConfig(2, 0.5, "first-order"), _mse
    )
    eps = 1e-6
    for layer, index in ((0, (1, 0, 1, 1)), (1, (2, 3, 0, 2)), (1, (5, 5, 1, 0))):
        plus = [m.detach().clone() for m in masks]
        minus = [m.detach().clone() for m in masks]
        plus[layer][index] += eps
        minus[layer][index] -= eps
        numeric = (
            _unrolled_loss(model, plus, names, batches, 2, 0.5) - _unrolled_loss(model, minus, names, batches, 2, 0.5)
        ) / (2 * eps)
        assert abs(float(full[layer][index]) - numeric) <= 1e-5 * max(1.0, abs(numeric)), (layer, index)
    assert not torch.allclose(full[1], first[1], rtol=1e-3)  # second-order terms matter at this lr


# ---- IMP ----------------------------------------------------------------------------------------
def test_level_steps_split_the_budget_exactly():
    assert level_steps(300, 3) == [100, 100, 100]
    assert level_steps(100, 3) == [34, 33, 33]
    assert sum(level_steps(7, 4)) == 7


@pytest.mark.slow  # IMP levels with fine-tunes; default set: test_prune_routes_imp_and_leaves_the_last_fine_tune_to_the_caller
def test_imp_hits_the_gflops_target_in_levels(tiny_config, tiny_samples):
    model = _random_model(tiny_config)
    batches = scoring_set(tiny_config, 1, 2)
    ft = FinetuneConfig(steps=3, batch_size=2, threads=1)
    request = PruneRequest(method="imp", target_gflops=0.5)
    request.imp.finetune_steps = 3
    tune = imp_finetune_fn(ft, tiny_samples, unstructured=False, progress=False)
    task, example = reference_task(model), first_sample(batches[0])
    report = iterative_magnitude_prune(
        model, task, batches, request, example_batch=example, finetune_fn=tune, progress=False
    )
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    assert len(report["levels"]) == 3 and report["finetune_steps_used"] == 3
    assert all(0.15 < level["gflops_reduction"] < 0.35 for level in report["levels"])  # geometric: ~20.6% each
    assert all(0 < p["kept_ratio"] < 1 for p in report["partitions"].values())


def test_prune_routes_imp_and_leaves_the_last_fine_tune_to_the_caller(tiny_config, tiny_samples):
    model = _random_model(tiny_config)
    batches = scoring_set(tiny_config, 1, 2)
    request = PruneRequest(method="imp", sparsity=0.8)
    request.imp.finetune_steps = 2
    request.imp.levels = 2
    tune = imp_finetune_fn(FinetuneConfig(batch_size=2, threads=1), tiny_samples, unstructured=True, progress=False)
    report = prune(model, request, batches, finetune_fn=tune)
    assert abs(sparsity_of(model, set(report["protected"])) - 0.8) < 1e-3 and report["kind"] == "unstructured"
    assert abs(report["levels"][0]["sparsity"] - (1 - 0.2**0.5)) < 1e-3
    assert report["finetune_steps_used"] == 1 and report["finetune_steps_remaining"] == 1


@pytest.mark.parametrize(
    "request_",
    [
        PruneRequest(method="synflow", target_gflops=0.5, synflow=SynFlowConfig(iterations=3)),
        PruneRequest(method="prospr", target_gflops=0.5, prospr=ProsprConfig(steps=1)),
        PruneRequest(method="synflow", sparsity=0.85, synflow=SynFlowConfig(iterations=3)),
        PruneRequest(method="prospr", sparsity=0.85, prospr=ProsprConfig(steps=1)),
    ],
    ids=["synflow-structured", "prospr-structured", "synflow-unstructured", "prospr-unstructured"],
)
def test_new_methods_prune_through_the_shared_harness(tiny_config, request_):
    model = _random_model(tiny_config)
    report = prune(model, request_, scoring_set(tiny_config, 1, 2), progress=False)
    if request_.structured:
        assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    else:
        assert abs(sparsity_of(model, set(report["protected"])) - 0.85) < 1e-3
    assert request_.method in str(report["request"]) and "altereva" not in report["request"]
    assert len(prunable_weights(model)) > 0


# ---- the comparison harness ---------------------------------------------------------------------
def _fake_run(spec, rng):
    from dataclasses import asdict

    return {
        "key": spec.key,
        "spec": asdict(spec),
        "metrics": {"mAP": rng.random(), "NDS": rng.random(), "mIoU": rng.random()},
        "gflops": 2.0 * (1 - spec.target) if spec.kind == "structured" else 2.0,
        "params": 1e6,
        "prunable_nonzero": 5e5,
        "sparsity": spec.target if spec.kind == "unstructured" else 0.0,
        "gflops_reduction": spec.target + 0.004 if spec.kind == "structured" else 0.0,
        "kept_ratio": {"camera": 0.5, "lidar": 0.6, "fusion": 0.7},
    }


def test_compare_plans_the_grid_and_writes_tables_and_plots(tmp_path):
    import random

    from altermoma.compare import METHODS, markdown, plan, plot_map_vs_beta, plot_map_vs_gflops

    full = plan(METHODS, 3, quick=False)
    # methods x targets x kinds x seeds, + 4 beta points (beta = 1 is the main run) + Eq. 13, per seed
    assert len(full) == 7 * 3 * 3 * 2 + 4 * 3 + 3
    assert len({spec.key for spec in full}) == len(full)
    quick = plan(METHODS, 1, quick=True)
    assert {(s.kind, s.target, s.seed) for s in quick} == {("structured", 0.5, 0)} and len(quick) == 7
    rng = random.Random(0)
    runs = [_fake_run(spec, rng) for spec in full]
    reference = {"metrics": {"mAP": 0.5, "NDS": 0.5, "mIoU": 0.5}, "gflops": 2.0, "params": 1e6}
    settings = {
        "checkpoint": "x",
        "val_scenes": 1,
        "finetune_steps": 1,
        "imp_levels": 3,
        "train_scenes": 1,
        "synflow_iterations": 1,
        "threads": 1,
    }
    text = markdown({"settings": settings, "seeds": 3, "unpruned": reference, "runs": runs, "seconds": 0})
    assert "## AlterEva beta/alpha sweep" in text and "## Unstructured" in text and " ± " in text
    assert text.count("| 50% | altereva |") == 1  # sweep points stay out of the method table
    assert text.count("| 50% | altereva-eq13 |") == 1
    assert "Largest miss of a target: 0.40 points of GFLOPs reduction (structured), 0.00 points" in text
    plot_map_vs_gflops(runs, reference, tmp_path / "a.png")
    plot_map_vs_beta(runs, tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_compare_runs_printed_eq13_as_altereva_without_floor():
    from altermoma.compare import EQ13, RunSpec, Settings, prune_request

    eq13 = prune_request(RunSpec(EQ13, "structured", 0.5, 0), Settings("x"))
    assert eq13.method == "altereva" and eq13.altereva.floor is None
    main = prune_request(RunSpec("altereva", "structured", 0.5, 0), Settings("x"))
    assert main.altereva.floor == 1e-3


def test_two_compare_invocations_can_share_a_folder(tmp_path, monkeypatch):
    """A run another invocation finished while this one was busy is loaded, not run again."""
    import json
    import random

    import altermoma.compare as compare_module
    from altermoma.compare import RunSpec, Settings, compare

    shipped = compare_module.SHIPPED
    settings = Settings(checkpoint=str(shipped), val_scenes=1, train_scenes=1, threads=1)
    rng = random.Random(0)
    calls = []

    def fake_run_one(spec, settings_, base, train_set, val_set):
        calls.append(spec.key)
        if len(calls) == 1:  # meanwhile, "another invocation" finishes the next run
            other = RunSpec("magnitude", "structured", 0.5, 0)
            done = {**_fake_run(other, rng), "settings": settings_.stored(), "seconds": {"prune": 1.0}}
            (tmp_path / "runs" / f"{other.key}.json").write_text(json.dumps(done))
        return {**_fake_run(spec, rng), "settings": settings_.stored(), "seconds": {"prune": 1.0}}

    monkeypatch.setattr(compare_module, "run_one", fake_run_one)
    summary = compare(
        tmp_path, settings, ("snip", "magnitude"), [0], False, False, structured_targets=(0.5,), sparsities=()
    )
    assert calls == ["structured-0.5-snip-seed0"]
    assert [r["key"] for r in summary["runs"]] == ["structured-0.5-snip-seed0", "structured-0.5-magnitude-seed0"]
    assert summary["seed_list"] == [0] and (tmp_path / "compare.md").is_file()


def test_compare_tables_hold_the_whole_folder_and_name_what_they_leave_out(tmp_path, monkeypatch, capsys):
    """A comparison run in pieces (other methods or seeds per invocation) is reported whole: compare.json is not
    only the last invocation's plan. Runs it cannot hold are named, never dropped silently."""
    import dataclasses
    import json
    import random

    import altermoma.compare as compare_module
    from altermoma.compare import RunSpec, Settings, compare, prune_request

    settings = Settings(checkpoint=str(compare_module.SHIPPED), val_scenes=1, train_scenes=1, threads=1)
    rng = random.Random(0)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()

    def store(spec, **changes):
        run = {**_fake_run(spec, rng), "settings": settings.stored(), "seconds": {"prune": 1.0}} | changes
        (runs_dir / f"{spec.key}.json").write_text(json.dumps(run))
        return run

    earlier = store(RunSpec("magnitude", "unstructured", 0.9, 2))  # another method, kind and seed
    smaller = store(RunSpec("tp-hessian", "structured", 0.3, 0))  # another target: its row goes first
    store(RunSpec("snip", "structured", 0.5, 1), settings={**settings.stored(), "threads": 2})
    paper = RunSpec("altereva-paper", "structured", 0.5, 0)
    options = dataclasses.asdict(prune_request(paper, settings).altereva) | {"reactivation_optimizer": "adamw"}
    store(paper, pruning={"request": {"altereva": options}})
    (runs_dir / "notes.json").write_text("{")
    monkeypatch.setattr(
        compare_module,
        "run_one",
        lambda spec, s, *a: {**_fake_run(spec, rng), "settings": s.stored(), "seconds": {"prune": 1.0}},
    )
    summary = compare(tmp_path, settings, ("snip",), [0], False, False, structured_targets=(0.5,), sparsities=())
    assert [r["key"] for r in summary["runs"]] == ["structured-0.5-snip-seed0", smaller["key"], earlier["key"]]
    assert summary["seed_list"] == [0, 2] and summary["seeds"] == 2
    assert json.loads((tmp_path / "compare.json").read_text())["runs"][2] == earlier
    table = (tmp_path / "compare.md").read_text()
    assert "| 90% | magnitude |" in table and table.index("| 30% | tp-hessian |") < table.index("| 50% | snip |")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes[0].startswith("note: the tables also hold 2 runs stored in")
    assert sorted(notes[1:]) == [
        "note: left out of the tables: notes.json (not a run file)",
        "note: left out of the tables: structured-0.5-altereva-paper-seed0.json (other AlterEva options: "
        "reactivation_optimizer 'adamw' -> 'sgd')",
        "note: left out of the tables: structured-0.5-snip-seed1.json (made with other settings)",
    ]


def test_compare_refuses_a_stored_altereva_run_made_with_other_options(tmp_path, monkeypatch):
    """When AlterEva's defaults move, a folder's plain "altereva" runs were made by the old ones: never mixed in."""
    import dataclasses
    import json
    import random

    import altermoma.compare as compare_module
    from altermoma.compare import RunSpec, Settings, changed_options, compare, prune_request

    settings = Settings(checkpoint=str(compare_module.SHIPPED), val_scenes=1, train_scenes=1, threads=1)
    spec = RunSpec("altereva-paper", "structured", 0.5, 0)
    options = dataclasses.asdict(prune_request(spec, settings).altereva)
    run = {**_fake_run(spec, random.Random(0)), "settings": settings.stored(), "seconds": {"prune": 1.0}}
    run["pruning"] = {"request": {"altereva": options}}
    assert changed_options(run, spec, settings) == ""
    old = {k: v for k, v in options.items() if k != "failure_weight"}  # a run made before an option existed
    assert changed_options({"pruning": {"request": {"altereva": old}}}, spec, settings) == ""
    run["pruning"]["request"]["altereva"] = options | {"reactivation_optimizer": "adamw"}
    assert changed_options(run, spec, settings) == "reactivation_optimizer 'adamw' -> 'sgd'"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{spec.key}.json").write_text(json.dumps(run))
    monkeypatch.setattr(compare_module, "run_one", lambda *a: pytest.fail("no run may start"))
    with pytest.raises(ValueError, match="made with other AlterEva options"):
        compare(tmp_path, settings, ("altereva-paper",), [0], False, False, structured_targets=(0.5,), sparsities=())
    assert json.loads((tmp_path / "runs" / f"{spec.key}.json").read_text()) == run  # untouched
