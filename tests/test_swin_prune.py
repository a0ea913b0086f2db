"""Swin's residual stream prunes exactly: LayerNorms over the pruned width, and patch merging's channels-last fold.

A Swin stage's residual width couples the patch embedding (or patch merging's reduction), every block's norm1,
norm2, attention output and MLP output, and the next patch merging's 4C LayerNorm; that one sees channel c at
c, C + c, 2C + c and 3C + c (timm's reshape-permute-flatten). torch-pruning's own reshape mapping assumes c * 4
... c * 4 + 3, and a zeroed LayerNorm still counts its zeroed inputs in its statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch_pruning import _helpers as tp_helpers

from common.task import Task
from compress.structured import ChannelGraph
from compress.tracing import InterleaveIndexMapping, recorded_fold
from fusion.models.swin import swin_cpu


class _SwinProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.camera = swin_cpu(
            embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 2), window_size=4, out_indices=(0, 1, 2)
        )
        self.head = nn.Conv2d(16 + 32 + 64, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # every stage's output reaches the head
        pooled = [nn.functional.adaptive_avg_pool2d(f, 4) for f in self.camera(x)]
        return self.head(torch.cat(pooled, dim=1))


def _model_task_batch():
    torch.manual_seed(0)
    model = _SwinProbe().eval()
    with torch.no_grad():  # LayerNorms away from their unit initialisation, so a wrong mapping shows
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    task = Task(partition={"camera": ["camera"], "fusion": ["head"]}, loss=lambda out, batch: out.square().mean())
    return model, task, torch.randn(2, 3, 64, 64)


def test_recorded_shapes_decide_folds():
    assert recorded_fold([2, 8, 8, 2, 2, 16], [2, 8, 8, 64], 16, 64) == ("last", 4)  # patch merging's 4C features
    assert recorded_fold([2, 32, 4, 16, 16], [2, 128, 16, 16], 32, None) == ("first", 4)  # a sparse depth fold
    assert recorded_fold([2, 128, 16, 16], [2, 32, 4, 16, 16], None, 32) == ("unfold", 4)  # and back
    assert recorded_fold([2, 16, 32], [2, 512], 16, 512) == ("first", 32)  # flatten for a Linear
    # attention logits (windows, heads, N, N) viewed per image: heads are not channels folded 16 x
    assert recorded_fold([8, 2, 16, 16], [4, 2, 2, 16, 16], 2, 32) is None
    assert recorded_fold([2, 8, 8, 16], [2, 8, 2, 4, 16], 16, 16) is None  # a window split keeps channels
    assert recorded_fold([2, 16, 16], [2, 256], 16, None) is None  # (N, C, L) with L == C: two readings
    hybrid = tp_helpers._HybridIndex
    mapping = InterleaveIndexMapping(channels=16, copies=4)
    assert [i.idx for i in mapping([hybrid(idx=3, root_idx=3)])] == [3, 19, 35, 51]
    back = InterleaveIndexMapping(channels=16, copies=4, reverse=True)
    assert [i.idx for i in back([hybrid(idx=k, root_idx=0) for k in (3, 19, 35)])] == [3]


def test_residual_stream_and_patch_merging_prune_exactly():
    model, task, batch = _model_task_batch()
    graph = ChannelGraph(model, task, batch)
    residual = [i for i, g in enumerate(graph.groups) if any(item.layer.endswith("norm1") for item in g.items)]
    assert len(residual) == 3, graph.unprunable  # one per stage, none left whole
    merging = {g.root for g in graph.groups for item in g.items if item.layer.endswith("downsample.norm")}
    assert len(merging) == 2  # both patch mergings' 4C LayerNorms sit in their stage's residual group
    masks = [torch.zeros(g.channels, dtype=torch.bool) for g in graph.groups]
    for i in residual:
        masks[i][1::4] = True  # a quarter of every residual width
    last = next(i for i in residual if graph.groups[i].channels == 64)
    masks[last][:] = True
    masks[last][::8] = (
        False  # and 7 of 8 in the last stage (torch-pruning's LayerNorm pruner then kept them out of order)
    )
    reference = copy.deepcopy(model)
    view = copy.copy(graph)
    view.model = reference
    view.zero_channels(masks)
    # the zeroed LayerNorm normalises over the kept channels only (the pruned one will not see the others)
    norm, y = reference.camera.patch_embed.norm, torch.randn(2, 5, 16)
    keep = ~masks[next(i for i in residual if graph.groups[i].channels == 16)]
    out = norm(y)
    assert torch.equal(out[..., ~keep], torch.zeros_like(out[..., ~keep]))
    kept = nn.functional.layer_norm(y[..., keep], (12,), norm.weight[keep], norm.bias[keep], norm.eps)
    assert torch.allclose(out[..., keep], kept, atol=1e-6)
    graph.prune(masks)
    with torch.no_grad():
        expected, got = reference(batch), model(batch)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert model.camera.layers[1].downsample.norm.normalized_shape == (48,)  # 4 x 12
    assert model.camera.layers[2].blocks[1].norm2.normalized_shape == (8,)
    assert model.camera.patch_embed.proj.out_channels == 12


def test_layer_norm_pruning_keeps_the_channels_in_order():
    import torch_pruning as tp

    import compress.tracing  # noqa: F401 - installs the fixed LayerNorm pruner

    norm = nn.LayerNorm(256)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(256.0))
        norm.bias.copy_(-torch.arange(256.0))
    removed = [i for i in range(256) if i % 8]
    tp.pruner.function.LayernormPruner().prune_out_channels(norm, removed)  # as the dependency graph calls it
    assert norm.normalized_shape == (32,)
    assert torch.equal(norm.weight, torch.arange(0.0, 256.0, 8.0)) and torch.equal(norm.bias, -norm.weight)
