"""torch-pruning's own importances as peers on our harness: the numbers its importances define, our Fisher,
LayerNorms counted, the same selection path as every criterion, and what it cannot score named."""

import pytest
import torch
from torch import nn

from common.task import Task
from compress import peers
from compress.altereva import loss_gradients
from compress.oneshot import channel_scores
from compress.prune import prune
from compress.request import PruneRequest
from compress.structured import ChannelGraph, PruningError


class Net(nn.Module):
    """camera: conv-BN-ReLU-conv; lidar: linear-LayerNorm-linear; fuser: a head over both."""

    def __init__(self):
        super().__init__()
        self.camera = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))
        self.lidar = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 6))
        self.fuser = nn.Linear(12, 2)

    def forward(self, image, points):
        return self.fuser(torch.cat([self.camera(image).mean((2, 3)), self.lidar(points).mean(1)], 1))


def _net() -> tuple[Net, Task]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.camera[1].weight.uniform_(0.5, 1.5)
        model.lidar[1].weight.uniform_(0.5, 1.5)
    task = Task(
        partition={"camera": "camera", "lidar": "lidar", "fusion": "fuser"},
        loss=lambda out, batch: ((out - batch["y"]) ** 2).mean(),
        inputs=lambda batch: (batch["image"], batch["points"]),
    )
    return model, task


def _batches(count: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randn(2, 3, 6, 6, generator=g),
            "points": torch.randn(2, 4, 5, generator=g),
            "y": torch.randn(2, 2, generator=g),
        }
        for _ in range(count)
    ]


def _scores(method: str, model, task, batches, record=None):
    graph = ChannelGraph(model, task, batches[0])
    request = PruneRequest(method=method, target_gflops=0.3)
    scores = channel_scores(method, model, task, graph, batches, batches[0], request, False, record)
    return {g.root: s for g, s in zip(graph.groups, scores)}


def _by_hand(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """torch-pruning's defaults: the mean over the group's layers, then divided by its mean over channels."""
    mean = torch.stack(per_layer).mean(0)
    return mean / mean.mean()


def test_the_three_importances_are_the_numbers_torch_pruning_defines():
    model, task = _net()
    batches = _batches()
    conv1, bn, conv2 = model.camera[0], model.camera[1], model.camera[3]
    lin1, norm, lin2 = model.lidar[0], model.lidar[1], model.lidar[3]
    grads = loss_gradients(model, task, batches)
    fisher = {n: sum(loss_gradients(model, task, [b])[n] ** 2 for b in batches) / len(batches) for n in grads}
    weight = dict(model.named_parameters())

    def camera(values, batchnorm=True):  # conv1 out, BN (not in torch-pruning 1.6's Taylor), conv2 in
        v = {n: values(n) for n in ("camera.0.weight", "camera.1.weight", "camera.3.weight")}
        layers = [v["camera.0.weight"].flatten(1).sum(1), v["camera.1.weight"], v["camera.3.weight"].sum((0, 2, 3))]
        return _by_hand(layers if batchnorm else [layers[0], layers[2]])

    def lidar(values):  # linear out, LayerNorm, linear in
        v = {n: values(n) for n in ("lidar.0.weight", "lidar.1.weight", "lidar.3.weight")}
        return _by_hand([v["lidar.0.weight"].sum(1), v["lidar.1.weight"], v["lidar.3.weight"].sum(0)])

    expected = {
        "tp-magnitude": lambda n: weight[n].detach().double() ** 2,
        "tp-taylor": lambda n: (weight[n].detach().double() * grads[n]).abs(),
        "tp-hessian": lambda n: weight[n].detach().double() ** 2 * fisher[n],
    }
    for method, values in expected.items():
        got = _scores(method, model, task, batches)
        assert torch.allclose(got["camera.0"], camera(values, method != "tp-taylor"), rtol=1e-6), method
        assert torch.allclose(got["lidar.0"], lidar(values), rtol=1e-6), method  # the LayerNorm counts
    assert conv1.weight.dtype == bn.weight.dtype == lin1.weight.dtype == norm.weight.dtype == conv2.weight.dtype
    assert lin2.weight.dtype == torch.float32 and lin2.weight.grad is None  # restored, no gradient left behind


def test_the_fisher_averages_every_batch_where_torch_pruning_keeps_the_last():
    import torch_pruning as tp

    model, task = _net()
    batches = _batches()
    fisher = peers.batch_fisher(model, task, batches)
    per_batch = [loss_gradients(model, task, [b]) for b in batches]
    name = "camera.0.weight"
    assert torch.allclose(fisher[name], sum(g[name] ** 2 for g in per_batch) / 3)
    last = per_batch[-1][name].double() ** 2
    scorer = tp.importance.GroupHessianImportance()  # torch-pruning 1.6's own accumulation, as its docs show
    for batch in batches:
        model.zero_grad()
        task.loss_of(task.forward(model, batch), batch).backward()
        scorer.accumulate_grad(model)
    kept = scorer._accu_grad[model.camera[0].weight].double()
    assert torch.allclose(kept, last, rtol=1e-5)  # the last batch only
    assert not torch.allclose(kept, fisher[name].double(), rtol=1e-3)
    model.zero_grad(set_to_none=True)


def test_a_peer_prunes_through_the_shared_harness_and_is_refused_a_sparsity():
    model, task = _net()
    batches = _batches()
    report = prune(
        model, task, batches, PruneRequest(method="tp-taylor", target_gflops=0.15, round_to=1), progress=False
    )
    assert abs(report["gflops_reduction"] - 0.15) <= 0.02
    assert report["zero_then_prune_error"] < 1e-5
    assert report["tp_importance"] == {"kind": "tp-taylor", "unscored": [], "padding_cut": []}
    with pytest.raises(PruningError, match="tp-hessian scores channel groups"):
        PruneRequest(method="tp-hessian", sparsity=0.5).validate()


def test_a_group_torch_pruning_cannot_score_is_kept_whole_and_named(monkeypatch):
    model, task = _net()
    original = peers._importance

    def no_layernorm_groups(kind):
        inner = original(kind)
        return lambda group: None if any(isinstance(d.target.module, nn.LayerNorm) for d, _ in group) else inner(group)

    monkeypatch.setattr(peers, "_importance", no_layernorm_groups)
    record = {}
    scores = _scores("tp-magnitude", model, task, _batches(), record)
    assert record["tp_importance"]["unscored"] == ["lidar.0"]
    assert torch.all(scores["lidar.0"] == peers.UNSCORED) and torch.all(scores["camera.0"] < 10)


def test_peer_scores_do_not_depend_on_the_thread_count():
    model, task = _net()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _scores("tp-hessian", model, task, _batches())
        torch.set_num_threads(2)
        two = _scores("tp-hessian", model, task, _batches())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[k], two[k]) for k in one)


# ---- NVIDIA ModelOpt's FastNAS behind `prune` --------------------------------------------------------
class ConvFusion(nn.Module):
    """Two conv branches concatenated into a conv fuser: what FastNAS's tracer follows."""

    def __init__(self):
        super().__init__()
        block = lambda cin: [nn.Conv2d(cin, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]  # noqa: E731
        self.camera = nn.Sequential(*block(3), *block(32))
        self.lidar = nn.Sequential(*block(2))
        self.fuser = nn.Sequential(*block(64), nn.Conv2d(32, 4, 1))

    def forward(self, image, bev):
        return self.fuser(torch.cat([self.camera(image), self.lidar(bev)], 1))


def _conv_fusion():
    torch.manual_seed(0)
    model = ConvFusion().eval()
    task = Task(
        partition={"camera": "camera", "lidar": "lidar", "fusion": "fuser"},
        loss=lambda out, batch: ((out - batch["y"]) ** 2).mean(),
        inputs=lambda batch: (batch["image"], batch["bev"]),
    )
    g = torch.Generator().manual_seed(2)
    batches = [
        {
            "image": torch.randn(2, 3, 8, 8, generator=g),
            "bev": torch.randn(2, 2, 8, 8, generator=g),
            "y": torch.randn(2, 4, 8, 8, generator=g),
        }
        for _ in range(2)
    ]
    return model, task, batches


@pytest.mark.slow  # ~25 s (ModelOpt's search); default set: test_fastnas_names_the_modules_its_tracer_skipped
def test_fastnas_prunes_in_place_to_its_flops_limit_and_refuses_what_it_cannot_reach():
    pytest.importorskip("modelopt.torch.prune", reason="NVIDIA ModelOpt is not installed (the quant extra)")
    pytest.importorskip("torchprofile", reason="torchprofile is not installed (the quant extra)")
    model, task, batches = _conv_fusion()
    report = prune(model, task, batches, PruneRequest(method="fastnas", target_gflops=0.5, round_to=16), progress=False)
    assert report["method"] == "fastnas" and report["fastnas"]["configurable_hparams"] > 0
    # the limit is an upper bound on FLOPs (ModelOpt's count; ours is reported): on random weights a smaller
    # output lowers this loss, so FastNAS's best-scoring subnet under the limit may go far beyond it
    assert report["gflops_reduction"] >= 0.48
    assert model.fuser[0].in_channels == model.camera[3].out_channels + model.lidar[0].out_channels
    assert report["partitions"]["camera"]["kept_ratio"] < 1.0 or report["partitions"]["lidar"]["kept_ratio"] < 1.0
    assert model(batches[0]["image"], batches[0]["bev"]).shape == (2, 4, 8, 8)  # pruned in place, still runs
    model, task, batches = _conv_fusion()
    with pytest.raises(PruningError, match="FastNAS cannot reach a 50% FLOPs reduction"):  # 32-wide: no smaller step
        prune(model, task, batches, PruneRequest(method="fastnas", target_gflops=0.5, round_to=32), progress=False)
    with pytest.raises(PruningError, match="GFLOPs target only"):
        PruneRequest(method="fastnas", channel_ratio=0.5).validate()


def test_a_dead_group_scores_zero_not_nan():
    model, task = _net()
    with torch.no_grad():  # every coupled weight of the camera's first group zero: tp divides 0 by its mean 0
        model.camera[0].weight.zero_()
        model.camera[0].bias.zero_()
        model.camera[1].weight.zero_()
        model.camera[1].bias.zero_()
        model.camera[3].weight.zero_()
    scores = _scores("tp-magnitude", model, task, _batches())
    assert torch.equal(scores["camera.0"], torch.zeros(8, dtype=torch.float64))
    assert torch.isfinite(scores["lidar.0"]).all()


def test_compare_names_the_same_methods_and_peers_as_the_request():
    """altermoma.compare keeps its own tuples (it imports no torch at start-up): they must not drift."""
    from altermoma import compare
    from compress import request

    assert compare.METHODS == request.METHODS and compare.PEERS == request.PEERS


class _GatedLidar(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it, so FastNAS must skip (and we must name) it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, bev):
        return self.conv(bev) if bool(bev.abs().sum() > 0) else self.conv(bev).mul(0)


def test_fastnas_names_the_modules_its_tracer_skipped():
    pytest.importorskip("modelopt.torch.prune", reason="NVIDIA ModelOpt is not installed (the quant extra)")
    pytest.importorskip("torchprofile", reason="torchprofile is not installed (the quant extra)")
    from compress.fastnas import modelopt_input, search_space

    model, task, batches = _conv_fusion()
    model.lidar = _GatedLidar().eval()
    space = search_space(model, modelopt_input(model, task, batches[0]), 16)
    assert "lidar" in space.untraceable and "camera" not in space.untraceable
    assert not any(name.startswith("lidar.") for name in space.hparams)  # its widths are outside the search
    assert any(name.startswith("camera.") for name in space.hparams)
    assert 0.0 < space.reachable() < 1.0 and space.refusal(0.99) and space.refusal(0.01) is None


def test_torch_pruning_padding_after_a_fold_is_cut_before_the_mean():
    """tp 1.6 sizes a group's scores by its first scored layer (after a channels-to-BEV fold: 2x the group)."""
    from compress.peers import _root_scores

    padded: list[str] = []
    score = torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64)  # 2 root channels, tail never written
    assert torch.equal(_root_scores(score, 2, "lidar.conv_out", padded), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert padded == ["lidar.conv_out"]
    assert torch.equal(_root_scores(score[:2], 2, "x", padded), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert padded == ["lidar.conv_out"]  # only padded groups are named
    with pytest.raises(RuntimeError, match="scored 4 channels for y's group of 2"):
        _root_scores(torch.ones(4, dtype=torch.float64), 2, "y", padded)
    with pytest.raises(RuntimeError, match="scored 1 channels"):
        _root_scores(torch.ones(1, dtype=torch.float64), 2, "z", padded)
