"""The BEVFusion-shaped presets (issue 22): Swin camera, sparse voxel LiDAR encoder on per-sample rulebooks,
TransFusion head. Only `bevfusion-tiny` is built for real here; the published sizes are built on the meta
device (their GFLOPs, which need a real forward of the sparse encoder, are a slow test)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import altermoma
from altermoma.flops import split_stage_flops, stage_flops
from common import sparse as plain_sparse
from compress.flops import count_flops
from compress.structured import ChannelGraph
from export.onnx import graph_feeds
from fusion.checkpoint import load_checkpoint, save_checkpoint
from fusion.config import ConfigError, get_config, sparse_shape
from fusion.data.cache import scene_key
from fusion.data.dataset import SyntheticScenes, collate, make_sample, model_inputs
from fusion.data.sparse_inputs import PREFIX, layer_specs, pad_rulebooks, synthetic_cloud, voxel_inputs
from fusion.evaluate import decode_detections, evaluate
from fusion.losses import task_loss
from fusion.models.bevfusion import Heads, build_model, example_inputs
from fusion.models.decoder import Decoder
from fusion.models.stages import HeadsStage
from fusion.models.swin import SWIN_T, SwinTransformer
from fusion.models.transfusion import TransFusionHead
from fusion.models.voxel_lidar import VoxelLidarEncoder
from fusion.task import detection_loss, first_sample, protected_names, reference_task
from fusion.train import batch_indices, fit

torch.set_num_threads(1)
PRESET = "bevfusion-tiny"
PARTS = ("camera", "lidar", "fusion")
SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"


@pytest.fixture(scope="module")
def config():
    return get_config(PRESET)


@pytest.fixture(scope="module")
def batch(config):
    """Two rendered scenes (images, voxels, rulebooks and targets) through the real data path."""
    return collate([make_sample(config, 5, i) for i in range(2)])


@pytest.fixture(scope="module")
def fusion_model(config):
    torch.manual_seed(0)
    return build_model(config).eval()


def test_tiny_preset_is_built_from_the_new_parts(config, fusion_model):
    assert isinstance(fusion_model.camera.backbone, SwinTransformer)
    assert isinstance(fusion_model.lidar, VoxelLidarEncoder)
    assert isinstance(fusion_model.heads.det, TransFusionHead) and fusion_model.heads.map is None
    assert fusion_model.input_names == ["images", "voxels", "voxel_coords", "rulebooks"]
    # the encoder's BEV is the fused grid: 0.2 m voxels, two strided convs, z folded to two slices
    assert sparse_shape(config) == (21, 256, 256)
    assert fusion_model.lidar.backbone.output_shape == (2, 64, 64)
    assert fusion_model.lidar.out_channels == 2 * config.model.sparse_out_channels


def test_published_presets_have_bevfusions_sizes():
    for preset, backbone in (("bevfusion-r50", "resnet"), ("bevfusion-swint", "swin")):
        config = get_config(preset)
        m = config.model
        assert m.camera_backbone == backbone and m.fpn_channels == 256 and m.camera_bev_channels == 80
        assert (config.rig.num_cameras, config.rig.image_height, config.rig.image_width) == (6, 256, 704)
        assert config.lidar.voxel_size == (0.075, 0.075, 0.2) and sparse_shape(config) == (41, 1440, 1440)
        assert (config.grid.size_y, config.grid.size_x) == (180, 180)
        assert m.transfusion_proposals == 200 and len(config.data.classes) == 10 and m.velocity_head
        # the parts only (the LSS geometry of six 256 x 704 images takes seconds to build)
        lidar = VoxelLidarEncoder(config)
        decoder = Decoder(m.fuser_channels, m.decoder_channels, m.decoder_layers, m.decoder_up_channels)
        heads = Heads(config, decoder.out_channels)
        assert lidar.backbone.output_shape == (2, 180, 180) and lidar.out_channels == 256
        assert decoder.out_channels == 512 and heads.det.shared_conv.in_channels == 512
        assert heads.det.decoder.self_attn.num_heads == 8 and heads.det.num_proposals == 200
        assert heads.det.prediction.branches["velocity"][-1].out_channels == 2
        classes = config.data.classes
        assert heads.det.no_nms.nonzero().flatten().tolist() == [
            classes.index("pedestrian"),
            classes.index("traffic_cone"),
        ]
    m = get_config("bevfusion-swint").model  # Swin-T itself (27.5 M parameters) is tested in test_swin.py
    swin = {
        "embed_dim": m.swin_embed_dim,
        "depths": m.swin_depths,
        "num_heads": m.swin_heads,
        "window_size": m.swin_window,
    }
    assert swin == SWIN_T and m.swin_drop_path == 0.2


def test_a_voxel_size_that_misses_the_grid_is_refused():
    with pytest.raises(ConfigError, match="sparse encoder's BEV output"):
        get_config(PRESET, {"lidar.voxel_size": [0.1, 0.1, 0.3]})
    with pytest.raises(ConfigError, match="sparse_down_padding"):
        get_config(PRESET, {"model.sparse_down_padding": [[1, 1, 1]]})
    with pytest.raises(ConfigError, match="heads"):
        get_config(PRESET, {"model.transfusion_heads": 5})


@pytest.mark.parametrize("modality", PARTS)
def test_forward_shapes(config, batch, modality):
    torch.manual_seed(0)
    model = build_model(config, modality).eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in model_inputs(batch).items() if k in model.input_names})
    p, k = config.model.transfusion_proposals, len(config.data.classes)
    assert out["dense_heatmap"].shape == (2, k, 64, 64)
    assert out["query_heatmap"].shape == out["query_score"].shape == (2, k, p)
    assert out["query_labels"].shape == (2, p) and out["query_labels"].dtype == torch.int64
    for name, channels in (("center", 2), ("height", 1), ("size", 3), ("rotation", 2)):
        assert out[name].shape == (2, channels, p)
    assert all(torch.isfinite(v).all() for v in out.values())
    decoded = decode_detections(out, config.grid)
    assert len(decoded) == 2 and decoded[0]["boxes"].shape[1] == 7


def test_batched_rulebooks_equal_rulebooks_built_for_the_batch(config, batch, fusion_model):
    """Per-sample rulebooks, padded and offset in the forward pass, compute what rulebooks built for the
    whole batch at once (`common.sparse.build_rulebooks`) compute."""
    encoder = fusion_model.lidar
    voxels, coords = batch["voxels"], batch["voxel_coords"]
    with torch.no_grad():
        got = encoder(voxels, coords, batch["rulebooks"])
        b, m, f = voxels.shape
        flat = torch.cat([torch.arange(b).repeat_interleave(m)[:, None], coords.reshape(b * m, 3).long()], 1)
        flat[coords.reshape(b * m, 3)[:, 0] < 0] = -1
        book = plain_sparse.build_rulebooks(flat, sparse_shape(config), b, layer_specs(config))
        want = encoder.backbone(voxels.reshape(b * m, f), flat, b, book)
    assert torch.allclose(got, want, atol=1e-6) and float(want.abs().max()) > 0.1


def test_a_batchs_first_sample_is_a_batch_of_one(batch, fusion_model):
    one = first_sample(batch)
    assert one["rulebooks"]["subm1.gather"].shape[0] == 1
    with torch.no_grad():
        whole = fusion_model(**model_inputs(batch))
        alone = fusion_model(**model_inputs(one))
    for name, value in alone.items():
        assert torch.allclose(value, whole[name][:1], atol=1e-5), name


def test_samples_carry_voxels_and_rulebooks(config):
    points = synthetic_cloud(config, 3)
    arrays = voxel_inputs(points, config)
    assert arrays["voxels"].shape == (config.lidar.max_voxels, 4)
    real = int((arrays["voxel_coords"][:, 0] >= 0).sum())
    assert 1000 < real < config.lidar.max_voxels  # a 16-beam sweep: a few thousand 0.2 m voxels, none dropped
    gather = arrays[PREFIX + "subm1.gather"]
    assert gather.shape == (config.lidar.max_voxels, 27) and gather.max() < real and (gather[real:] == -1).all()
    assert (gather[:real, 13] == np.arange(real)).all()  # the SubM centre offset meets the site itself


def test_cached_scenes_keep_their_rulebooks_and_evaluate(config, fusion_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ALTERMOMA_CACHE", str(tmp_path))
    dataset = SyntheticScenes(config, "val", num_scenes=2, progress=False)
    stored, fresh = dataset[1], make_sample(config, config.data.val_seed, 1)
    assert stored.keys() == fresh.keys() and any(key.startswith(PREFIX) for key in stored)
    for key, value in fresh.items():
        assert stored[key].dtype == value.dtype and np.array_equal(stored[key], value), key
    other = scene_key(get_config(PRESET, {"model.sparse_down_padding": [[1, 1, 1], [1, 1, 1]]}), 1)
    assert other != scene_key(config, 1)  # another encoder geometry: other rulebooks, another cache folder
    metrics = evaluate(fusion_model, dataset, batch_size=2, progress=False)
    assert 0.0 <= metrics["mAP"] <= 1.0 and "mIoU" not in metrics


def test_checkpoints_round_trip(config, fusion_model, batch, tmp_path):
    save_checkpoint(tmp_path / "ckpt", fusion_model, {"step": 1})
    loaded, meta = load_checkpoint(tmp_path / "ckpt", expect_preset=PRESET)
    assert meta["modality"] == "fusion" and loaded.config.to_dict() == config.to_dict()
    with torch.no_grad():
        want, got = fusion_model(**model_inputs(batch)), loaded.eval()(**model_inputs(batch))
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_one_training_step_reaches_every_partition(config, batch):
    torch.manual_seed(0)
    model = build_model(config).train()
    task = reference_task(model)
    loss = task.loss_of(task.forward(model, batch), batch)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    for part, prefixes in task.partition.items():
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefixes) and p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, part
        assert all(torch.isfinite(g).all() for g in grads), part


def test_backbones_hold_most_of_the_gflops(fusion_model, config):
    inputs = example_inputs(config, 1)
    stages = stage_flops(fusion_model, inputs)
    total = stages["total"]["flops"]
    assert (stages["camera"]["flops"] + stages["lidar"]["flops"]) / total >= 0.60
    # the same count as compress's (sparse convs from their rulebooks' pairs, not the padded gather)
    counted = count_flops(fusion_model, lambda: fusion_model(**inputs))
    assert counted.uncounted == {}
    assert total == pytest.approx(counted.total, rel=1e-9)
    assert stages["lidar"]["flops"] == pytest.approx(sum(counted.sparse.values()), rel=1e-9)
    split = split_stage_flops(fusion_model, inputs)  # the CUDA-BEVFusion split: the sparse encoder its own stage
    assert split["lidar_backbone"]["flops"] == stages["lidar"]["flops"] and split["total"]["flops"] == total
    # Asked for a meta-device count (as `altermoma bench` does), a sparse model is counted on its real inputs.
    assert stage_flops(fusion_model, inputs, device="meta") == stages
    assert split_stage_flops(fusion_model, inputs, device="meta") == split


def fixed_proposals(model):
    """The model with a constant dense heatmap (its last conv zeroed, the prior bias kept), so every cell ties and
    any two runs propose the same cells. Random weights give a nearly flat heatmap whose cells tie to within float
    noise: the pruned model and its zeroed reference (float sums in another order) may then propose another cell,
    which self-attention mixes into every query (zero-then-prune error 0.32 with AlterEva; the dense heatmap
    itself agreed to 5e-7). Fixed proposals make the check measure the pruned layers."""
    with torch.no_grad():
        model.heads.det.heatmap_head[-1].weight.zero_()
    return model


def _prune_half(model, config, method: str = "magnitude") -> dict:
    task = reference_task(model)
    batches = [collate([make_sample(config, 9, i)]) for i in range(2)]
    report = altermoma.prune(model, task, batches, method=method, target_gflops=0.5, round_to=4, progress=False)
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    assert report["zero_then_prune_error"] <= 1e-4
    with torch.no_grad():
        out = task.forward(model.eval(), batches[1])
    assert out["query_heatmap"].shape[1] == len(config.data.classes)  # output layers keep their channels
    return report


@pytest.mark.slow  # the whole fusion preset; default set: the LiDAR-only prune below (sparse convs, TransFusion)
def test_magnitude_prune_to_half_gflops_cuts_all_three_partitions(fusion_model, config, batch, tmp_path):
    model = fixed_proposals(copy.deepcopy(fusion_model))
    assert {"heads.det.heatmap_head.1", "camera.backbone.layers.0.blocks.0.attn.qkv"} <= set(protected_names(model))
    report = _prune_half(model, config)
    for part in PARTS:
        assert report["partitions"][part]["kept_ratio"] < 1.0, part
    assert model.camera.backbone.layers[0].blocks[0].mlp.fc1.out_features < 4 * config.model.swin_embed_dim
    assert model.heads.det.decoder.linear1.out_features <= config.model.transfusion_ffn
    altermoma.save_pruned(model, tmp_path / "pruned", report)
    reloaded = altermoma.load_pruned(build_model(config), tmp_path / "pruned").eval()
    with torch.no_grad():
        want, got = model.eval()(**model_inputs(batch)), reloaded(**model_inputs(batch))
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_magnitude_prune_of_the_lidar_only_model_leaves_nothing_whole(config):
    """Sparse convs, the depth fold, SECOND and TransFusion (MultiheadAttention included) all prune exactly."""
    torch.manual_seed(0)
    model = fixed_proposals(build_model(config, "lidar").eval())
    report = _prune_half(model, config)
    assert report["unpruned_groups"] == [] and report["left_whole"]["modules"] == []
    assert report["partitions"]["lidar"]["kept_ratio"] < 1.0 and report["partitions"]["fusion"]["kept_ratio"] < 1.0
    assert report["flop_counting"]["sparse_gflops"] > 0


def test_every_group_of_the_fusion_model_prunes_exactly(fusion_model, config):
    """Nothing left unprunable in the whole BEVFusion-shaped model (Swin's residual stream through patch
    merging's channels-last fold and its LayerNorms, the sparse depth fold before the camera concat, TransFusion),
    and removing a quarter of every group computes what zeroing it does, LayerNorm statistics included."""
    model = fixed_proposals(copy.deepcopy(fusion_model))
    batch = collate([make_sample(config, 9, i) for i in range(2)])  # two samples: the trace keeps the batch
    graph = ChannelGraph(model, reference_task(model), batch)
    assert graph.unprunable == []
    left = {entry["module"] for entry in graph.left_whole()["modules"]}
    assert all(name.endswith(".attn") for name in left)  # Swin's relative position bias tables (heads stay whole)
    masks = [torch.zeros(group.channels, dtype=torch.bool) for group in graph.groups]
    for mask in masks:
        mask[1::4] = True
    reference = copy.deepcopy(model)
    view = copy.copy(graph)
    view.model = reference
    view.zero_channels(masks)
    graph.prune(masks)
    with torch.no_grad():
        want, got = reference(**model_inputs(batch)), model(**model_inputs(batch))
    for name in want:
        assert float((want[name] - got[name]).abs().max()) <= 1e-5 * max(1.0, float(want[name].abs().max())), name
    swin = model.camera.backbone
    assert swin.layers[1].downsample.norm.normalized_shape == (4 * swin.layers[0].blocks[0].norm1.normalized_shape[0],)
    assert swin.layers[0].blocks[0].norm1.normalized_shape[0] < config.model.swin_embed_dim


@pytest.mark.slow
def test_altereva_to_half_gflops_cuts_all_three_partitions(fusion_model, config):
    """The issue's check, without trained weights: AlterEva (gradients through the plain sparse backend on CPU)
    meets the target within 2 points in all three partitions, exactly (about 75 s of CPU)."""
    report = _prune_half(fixed_proposals(copy.deepcopy(fusion_model)), config, "altereva")
    for part in PARTS:
        assert report["partitions"][part]["kept_ratio"] < 1.0, part


@pytest.mark.slow  # exports the whole preset; default set: test_export_nested's rulebook inputs
def test_onnx_export_matches_onnx_runtime(fusion_model, config, tmp_path):
    """One graph, rulebooks as graph inputs: padded to fixed rows per level, it serves a second cloud too.

    The whole graph is compared on the dense heatmap, which every branch feeds. The query outputs follow a
    discrete choice (local maxima, top-k): random weights give a nearly flat heatmap whose cells tie to within
    float noise, so either runtime may propose another cell, and self-attention mixes it into every query. The
    heads are therefore also exported alone and fed BEV features with distinct peaks (what a trained decoder
    gives), where every output, proposals included, must agree."""
    clouds = [example_inputs(config, 1, seed=seed) for seed in (0, 1)]
    strided = [s.indice_key for s in layer_specs(config) if not s.subm]
    rows = {key: max(c["rulebooks"][f"{key}.coords"].shape[1] for c in clouds) + 8 for key in strided}
    for cloud in clouds:
        cloud["rulebooks"] = pad_rulebooks(cloud["rulebooks"], rows, config)
    path = tmp_path / "bevfusion-tiny.onnx"
    report = altermoma.export_onnx(fusion_model, clouds[0], path, simplify=False)
    assert report["parity"]["outputs"]["dense_heatmap"]["max_abs"] <= 1e-4
    assert "rulebooks.subm1_gather" in report["input_names"] and "voxels" in report["input_names"]
    assert not {"NonZero", "Unique", "Loop", "ScatterND"} & set(report["ops"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = graph_feeds(clouds[1])
    outputs = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    got = dict(zip([o.name for o in session.get_outputs()], outputs))
    with torch.no_grad():
        want = fusion_model(**clouds[1])
    assert np.abs(got["dense_heatmap"] - want["dense_heatmap"].numpy()).max() <= 1e-4

    g = torch.Generator().manual_seed(0)
    bev = torch.zeros(1, fusion_model.decoder.out_channels, 64, 64)
    cells = torch.randperm(64 * 64, generator=g)[:150]
    bev.view(1, bev.shape[1], -1)[0, :, cells] = torch.randn(bev.shape[1], 150, generator=g).abs() * 3
    heads = altermoma.export_onnx(
        HeadsStage(fusion_model), {"bev_features": bev}, tmp_path / "heads.onnx", simplify=False
    )
    assert heads["max_abs_error"] <= 1e-4 and heads["parity"]["outputs"]["query_labels"]["max_abs"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bevfusion-r50", "bevfusion-swint"])
def test_published_sizes_are_counted(preset):
    """Real CPU forward of the published sizes (about 2 minutes each on the shared machine)."""
    config = get_config(preset)
    torch.manual_seed(0)
    model = build_model(config).eval()
    stages = stage_flops(model, example_inputs(config, 1))
    assert stages["heads"]["flops"] / 1e9 == pytest.approx(51.8, rel=0.01)  # docs/reference_parts.md
    assert stages["lidar"]["flops"] > 0 and stages["camera"]["flops"] > 0


def test_fit_trains_a_transfusion_head_with_detection_loss(config, tmp_path):
    """`fit` (training and fine-tuning) uses the loss of the model's head: on a TransFusion model its recorded
    loss is `detection_loss` (Hungarian matching, focal, L1, heatmap) of the same batch, not CenterPoint's."""
    samples = [make_sample(config, 7, i) for i in range(2)]
    torch.manual_seed(0)
    model = build_model(config, "camera")  # the head is the fusion model's; the camera branch is the cheapest
    train = dataclasses.replace(config.train, steps=1, batch_size=2, lr=0.0, warmup_steps=1, threads=1)
    torch.manual_seed(1)  # the decoder layer's dropout draws the same masks in both forward passes
    fit(model, samples, train, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["last_loss"]
    order = batch_indices(len(samples), train.batch_size, train.seed, 0)
    batch = collate([samples[i] for i in order])
    torch.manual_seed(1)
    with torch.no_grad():  # lr 0: the weights are the ones step 0 saw; train mode: BatchNorm on the batch
        want, parts = detection_loss(model.train()(**model_inputs(batch)), batch, config.grid)
    assert parts.keys() == {"heatmap", "query_class", "box"}
    assert recorded == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(KeyError):  # the CenterPoint loss cannot read these outputs: the old fit crashed here
        task_loss(model(**model_inputs(batch)), batch)


@pytest.mark.parametrize("modality", PARTS)
def test_shipped_checkpoints_load_and_detect(modality, batch):
    """The shipped `bevfusion-tiny-*` folders (MODEL_CARD_BEVFUSION_TINY.md): their manifest holds, they are this
    preset and modality, fully trained to their schedule, and detect with finite outputs; fusion starts from the
    two shipped single-modal folders."""
    folder = SHIPPED / f"{PRESET}-{modality}"
    model, meta = load_checkpoint(folder, expect_preset=PRESET)
    assert meta["modality"] == modality and meta["step"] == meta["train"]["steps"] > 0
    assert f"--modality {modality} --preset {PRESET}" in meta["command"]
    if modality == "fusion":
        assert f"--init-lidar fusion/weights/{PRESET}-lidar" in meta["command"]
        assert f"--init-camera fusion/weights/{PRESET}-camera" in meta["command"]
    with torch.no_grad():
        outputs = model.eval()(**{k: v for k, v in model_inputs(batch).items() if k in model.input_names})
    assert all(torch.isfinite(v).all() for v in outputs.values())
    assert len(decode_detections(outputs, model.config.grid)[0]) > 0
