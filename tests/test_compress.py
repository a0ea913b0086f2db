import copy
import io

import numpy as np
import pytest
import torch
from torch.func import functional_call

from compress.altereva import AlterEvaConfig, altereva_saliency, signed_saliency
from compress.partition import Partition, PartitionError, masked_modality
from compress.prune import prune as prune_with
from compress.request import PruneRequest
from compress.structured import ChannelGraph, PruningError
from compress.unstructured import sparsity_of
from fusion.checkpoint import load_checkpoint, save_checkpoint
from fusion.config import get_config
from fusion.data.dataset import collate, model_inputs
from fusion.losses import task_loss
from fusion.models.bevfusion import build_model, example_inputs
from fusion.task import first_sample, reference_task, scoring_set


@pytest.fixture()
def model(tiny_config):
    torch.manual_seed(0)
    m = build_model(tiny_config).eval()
    # Non-trivial BatchNorm statistics and affine parameters, so BN terms matter in every check.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture()
def batch(tiny_samples):
    return collate(tiny_samples[:2])


def prune(model, request, batches, progress=False):
    """The reference model traces on one sample (its LSS tracing stand-in averages over images)."""
    task, example = reference_task(model), first_sample(batches[0])
    return prune_with(model, task, batches, request, example_batch=example, progress=progress)


def _one_sample(batch):
    return {k: v[:1] for k, v in model_inputs(batch).items()}


def _loss(model, batch, params=None):
    out = (
        functional_call(model, params, (), model_inputs(batch)) if params is not None else model(**model_inputs(batch))
    )
    return task_loss(out, batch)[0]


def test_channel_score_is_the_gradient_of_a_channel_mask(model, batch):
    graph = ChannelGraph(model, reference_task(model), _one_sample(batch))
    channel = graph.channel_saliency(signed_saliency(model, reference_task(model), [batch]))
    modules = dict(model.named_modules())
    checked = 0
    for g, group in enumerate(graph.groups):
        if group.root not in ("fuser.fuse.0", "lidar.stem.0", "camera.vtransform.feat_conv", "decoder.neck.upsample.0"):
            continue
        mask = torch.ones(group.channels, dtype=torch.float64, requires_grad=True)
        params = dict(model.named_parameters())
        for item in group.items:
            module = modules[item.layer]
            m = mask[item.root_idxs].float()
            scale = torch.ones(module.weight.shape[0 if item.kind == "out" or module.weight.dim() == 1 else 1])
            scale = scale.index_put((item.idxs,), m)
            dim = 0 if (item.kind == "out" or module.weight.dim() == 1) else 1
            if isinstance(module, torch.nn.ConvTranspose2d):
                dim = 1 - dim
                scale = torch.ones(module.weight.shape[dim]).index_put((item.idxs,), m)
            shape = [1] * module.weight.dim()
            shape[dim] = -1
            params[f"{item.layer}.weight"] = params[f"{item.layer}.weight"] * scale.view(shape)
            if module.bias is not None and (item.kind == "out" or module.weight.dim() == 1):
                bias_scale = torch.ones(module.bias.shape[0]).index_put((item.idxs,), m)
                params[f"{item.layer}.bias"] = params[f"{item.layer}.bias"] * bias_scale
        model.eval()
        (grad,) = torch.autograd.grad(_loss(model, batch, params), mask)
        assert torch.allclose(channel[g], grad, rtol=1e-5, atol=1e-7 * float(grad.abs().max())), group.root
        checked += 1
    assert checked == 4


def test_zero_then_prune_equivalence(model, batch):
    inputs = _one_sample(batch)
    graph = ChannelGraph(model, reference_task(model), inputs)
    generator = torch.Generator().manual_seed(1)
    scores = [torch.rand(g.channels, generator=generator) for g in graph.groups]
    pruned = graph.threshold_for(scores, 0.5, "flops", round_to=8, max_group_ratio=0.9)
    graph.zero_channels(pruned)
    with torch.no_grad():
        zeroed = model(**inputs)
    graph.prune(pruned)
    with torch.no_grad():
        slim = model(**inputs)
    for key in zeroed:
        assert slim[key].shape == zeroed[key].shape
        assert torch.allclose(slim[key], zeroed[key], atol=1e-5), key


@pytest.mark.slow  # zeroes every channel once; default set: test_channel_score_is_the_gradient_of_a_channel_mask
def test_score_predicts_the_loss_change_of_zeroing_a_channel(model, batch):
    """First-order estimate vs the true loss change, channel by channel, on the fuser and decoder."""
    model.eval()
    graph = ChannelGraph(model, reference_task(model), _one_sample(batch))
    channel = graph.channel_saliency(signed_saliency(model, reference_task(model), [batch]))
    with torch.no_grad():
        base = float(_loss(model, batch))
    estimates, truths = [], []
    for g, group in enumerate(graph.groups):
        if group.root not in ("fuser.fuse.0", "decoder.backbone.stages.0.0.0"):
            continue
        for c in range(group.channels):
            trial = copy.deepcopy(model)
            trial_graph = copy.copy(graph)
            trial_graph.model = trial
            mask = [torch.zeros(x.channels, dtype=torch.bool) for x in graph.groups]
            mask[g][c] = True
            trial_graph.zero_channels(mask)
            with torch.no_grad():
                truths.append(float(_loss(trial, batch)) - base)
            estimates.append(-float(channel[g][c]))  # L(0) - L(theta) ~ -theta * g
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = np.corrcoef(rank(np.abs(estimates)), rank(np.abs(truths)))[0, 1]
    assert len(truths) == 64 and spearman > 0.7


def test_altereva_leaves_every_tensor_bit_identical(model, batch):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saliency = altereva_saliency(
        model, reference_task(model), [batch], AlterEvaConfig(reactivation_steps=2), progress=False
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert set(saliency.reri) == {"lidar", "camera"}
    # While the LiDAR is masked its parameters have no effect on the loss, so ReRI of the camera is non-zero
    # and the masked partition's own saliency (theta_0 * grad at zero weights) differs from DeCI.
    assert float(saliency.reri["lidar"]["camera.vtransform.feat_conv.weight"].abs().sum()) > 0


def test_masking_zeroes_a_modality_and_restores_it_exactly(model, batch):
    partition = Partition.of(model, model.partition())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = model_inputs(batch)
    with torch.no_grad(), masked_modality(model, partition, "lidar"):
        assert all(float(p.abs().sum()) == 0 for p in partition.parameters(model, "lidar").values())
        masked_params = model(**inputs)["heatmap"]
    with torch.no_grad(), masked_modality(model, partition, "lidar", mode="feature"):
        masked_features = model(**inputs)["heatmap"]
    assert torch.allclose(masked_params, masked_features, atol=1e-5)  # both remove the LiDAR BEV entirely
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_gflops_target_is_hit_and_widths_are_rounded(model, batch, target):
    report = prune(model, PruneRequest(method="magnitude", target_gflops=target), [batch], progress=False)
    assert abs(report["gflops_reduction"] - target) <= 0.02
    for layer, width in report["widths"].items():
        assert width % 8 == 0, layer
    with torch.no_grad():
        out = model(**_one_sample(batch))
    assert torch.isfinite(out["heatmap"]).all()


@pytest.mark.slow  # many targets; default set: test_gflops_target_is_hit_and_widths_are_rounded
def test_random_scores_land_within_one_point_of_every_target(tiny_config):
    """The nearest global threshold alone missed a 30% target by 2.3 points (seed 1): one rank step
    can drop a whole 8-channel block of a FLOP-heavy layer. Single-block corrections close the gap."""
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    graph = ChannelGraph(model, reference_task(model), example_inputs(tiny_config))
    base = graph.total_flops()
    misses = {}
    for tolerance in (1.0, 0.01):  # 1.0: bisection only
        worst = 0.0
        for seed in range(8):
            generator = torch.Generator().manual_seed(seed)
            scores = [torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in graph.groups]
            for target in (0.3, 0.5, 0.7):
                masks = graph.threshold_for(scores, target, "flops", 8, 0.9, tolerance=tolerance)
                kept = [g.channels - int(m.sum()) for g, m in zip(graph.groups, masks)]
                assert all(k % 8 == 0 or k == g.channels for k, g in zip(kept, graph.groups) if g.channels >= 8)
                assert all(k >= max(1, g.channels // 10) for k, g in zip(kept, graph.groups))
                worst = max(worst, abs(1 - graph.total_flops(masks) / base - target))
        misses[tolerance] = worst
    assert misses[1.0] > 0.02 and misses[0.01] <= 0.01


def test_channel_ratio_mode(model, batch):
    report = prune(model, PruneRequest(method="random", channel_ratio=0.4), [batch], progress=False)
    kept = sum(p["channels_after"] for p in report["partitions"].values())
    total = sum(p["channels_before"] for p in report["partitions"].values())
    assert abs(1 - kept / total - 0.4) < 0.05


@pytest.mark.slow  # the whole path on the tiny fusion model; default set covers each step apart (test_byom, test_checkpoint, test_export)
def test_altereva_prune_save_load_and_export(model, batch, tmp_path):
    report = prune(
        model,
        PruneRequest(method="altereva", target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=2)),
        [batch],
        progress=False,
    )
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    assert set(report["partitions"]) == {"camera", "lidar", "fusion"}
    save_checkpoint(tmp_path / "p", model, {"pruning": report})
    loaded, meta = load_checkpoint(tmp_path / "p")
    inputs = _one_sample(batch)
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta["pruning"]["kind"] == "structured"
    assert b"__reduce__" not in (tmp_path / "p" / "model.safetensors").read_bytes()
    # ONNX smoke test: the pruned model exports and ONNX Runtime agrees.
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(
        loaded,
        (),
        buffer,
        kwargs=inputs,
        input_names=list(inputs),
        output_names=list(a),
        opset_version=17,
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    heat = session.run(["heatmap"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(heat - a["heatmap"].numpy()).max() < 1e-4


@pytest.mark.slow  # the small preset; the default set prunes tiny
def test_pruned_small_preset_runs():
    config = get_config("small")
    m = build_model(config).eval()
    inputs = example_inputs(config)
    fake_batch = {**inputs}
    graph = ChannelGraph(m, reference_task(m), inputs)
    scores = [torch.arange(g.channels, dtype=torch.float64) for g in graph.groups]
    graph.prune(graph.threshold_for(scores, 0.5, "flops", 8, 0.9))
    with torch.no_grad():
        out = m(**fake_batch)
    assert out["heatmap"].shape[-1] == config.grid.size_x


def test_unstructured_sparsity_is_exact_and_survives_finetuning(model, batch, tiny_samples):
    from fusion.finetune import FinetuneConfig, finetune

    report = prune(model, PruneRequest(method="snip", sparsity=0.8), [batch], progress=False)
    assert abs(report["sparsity"] - 0.8) < 1e-3
    finetune(
        model,
        FinetuneConfig(steps=2, batch_size=2, threads=1),
        metadata={"pruning": report},
        progress=False,
        train_set=tiny_samples,
    )
    assert abs(sparsity_of(model, set(report["protected"])) - 0.8) < 1e-3


def test_impossible_requests_fail_before_any_work(model, batch):
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(PruningError, match="strictly between 0 and 1"):
            PruneRequest(target_gflops=bad).validate()
    with pytest.raises(PruningError, match="exactly one"):
        PruneRequest(target_gflops=0.5, sparsity=0.5).validate()
    with pytest.raises(PruningError, match="unknown method"):
        PruneRequest(method="oracle", target_gflops=0.5).validate()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="not reachable"):
        prune(model, PruneRequest(target_gflops=0.97), [batch], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_partition_errors(model, tiny_config):
    with pytest.raises(PartitionError, match="matches no module"):
        Partition.of(model, {"camera": ["cam."], "lidar": ["lidar."], "fusion": ["fuser.", "decoder.", "heads."]})
    with pytest.raises(PartitionError, match="belongs to no partition"):
        Partition.of(model, {"camera": ["camera."], "lidar": ["lidar."], "fusion": ["fuser."]})
    with pytest.raises(PartitionError, match="unknown partition"):
        Partition.of(model, {"radar": ["x."]})
    lidar_only = build_model(tiny_config, "lidar")
    with pytest.raises(PartitionError, match="both a camera and a LiDAR"):
        altereva_saliency(lidar_only, reference_task(lidar_only), [], AlterEvaConfig(), progress=False)


def test_scoring_set_is_fixed(tiny_config):
    a, b = scoring_set(tiny_config, 1, 2), scoring_set(tiny_config, 1, 2)
    assert torch.equal(a[0]["images"], b[0]["images"])
    assert not torch.equal(a[0]["images"], scoring_set(tiny_config, 1, 2, seed=1)[0]["images"])


@pytest.mark.slow
def test_pruned_r50_preset_runs():
    """The BEVFusion-R50-sized model prunes to 50% GFLOPs and still runs (about a minute, several GB)."""
    config = get_config("r50")
    m = build_model(config).eval()
    inputs = example_inputs(config)
    graph = ChannelGraph(m, reference_task(m), inputs)
    scores = [torch.arange(g.channels, dtype=torch.float64) for g in graph.groups]
    before = graph.total_flops()
    graph.prune(graph.threshold_for(scores, 0.5, "flops", 8, 0.9))
    with torch.no_grad():
        out = m(**inputs)
    assert out["heatmap"].shape[-2:] == (180, 180) and torch.isfinite(out["heatmap"]).all()
    from compress.oneshot import measured_gflops

    assert abs(1 - measured_gflops(m, reference_task(m), inputs) * 1e9 / before - 0.5) <= 0.02
