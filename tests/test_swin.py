"""Swin Transformer camera backbone: shapes at non-divisible sizes, window masks, relative positions,
state-dict layouts (timm, Microsoft, mmdet), prunable structure and ONNX parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion.models.swin import (
    DropPath,
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    WindowAttention,
    convert_state_dict,
    detect_layout,
    export_state_dict,
    get_relative_position_index,
    load_pretrained,
    shifted_window_mask,
    swin_cpu,
    swin_t,
)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms included), so a wrong mapping cannot hide behind ones and zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _tiny(out_indices=(0, 1, 2, 3), **kwargs) -> SwinTransformer:
    torch.manual_seed(0)
    return swin_cpu(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), out_indices=out_indices, **kwargs)


@pytest.mark.parametrize("size", [(64, 176), (66, 178), (30, 50)])
def test_stage_shapes_at_sizes_not_divisible_by_window_or_patch(size):
    """256x704 scaled by 1/4 (64x176): stride-4 map 16x44, then 8x22, 4x11, 2x6 (odd sides padded)."""
    model = _tiny().eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    expected = []
    for i in range(4):
        expected.append((2, 16 * 2**i, h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert [tuple(o.shape) for o in outputs] == expected
    assert model.out_channels == [16, 32, 64, 128]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_out_indices_select_stages_and_their_norms():
    model = _tiny(out_indices=(1, 2))
    assert len(model.layers) == 3  # the stage after the last output is not built
    assert sorted(model.out_norms) == ["1", "2"]
    assert [o.shape[1] for o in model(torch.rand(1, 3, 64, 64))] == [32, 64]
    with pytest.raises(ValueError, match="out_indices"):
        swin_cpu(out_indices=(4,))


def test_swin_t_published_configuration():
    model = swin_t()
    heads = [(s.blocks[0].attn.num_heads, s.blocks[0].attn.head_dim) for s in model.layers]
    assert heads == [(3, 32), (6, 32), (12, 32), (24, 32)]
    assert [len(s.blocks) for s in model.layers] == [2, 2, 6, 2]
    assert model.layers[0].blocks[1].shift == 3 and model.layers[0].blocks[0].shift == 0
    assert model.out_channels == [192, 384, 768]
    assert model.layers[1].blocks[0].mlp.fc1.out_features == 4 * 192
    assert tuple(model.layers[0].blocks[0].attn.relative_position_bias_table.shape) == (169, 3)
    # timm's Swin-T backbone has 27,519,354 parameters; ours adds the output norms of stages 1 and 2.
    assert sum(p.numel() for p in model.parameters()) == 27_519_354 + 2 * (192 + 384)


@pytest.mark.parametrize("window", [(4, 4), (7, 7), (3, 5)])
def test_relative_position_index_matches_brute_force(window):
    win_h, win_w = window
    tokens = [(y, x) for y in range(win_h) for x in range(win_w)]
    expected = torch.tensor(
        [[(qy - ky + win_h - 1) * (2 * win_w - 1) + (qx - kx + win_w - 1) for ky, kx in tokens] for qy, qx in tokens]
    )
    assert torch.equal(get_relative_position_index(win_h, win_w), expected)


def test_relative_position_bias_reads_the_table_row_of_each_offset():
    attn = WindowAttention(dim=8, num_heads=2, window_size=3)
    bias = attn.relative_position_bias()[0]  # (heads, 9, 9)
    table = attn.relative_position_bias_table
    # query (0, 0), key (2, 1): offset (-2, -1) -> row (-2 + 2) * 5 + (-1 + 2) = 1
    assert torch.equal(bias[:, 0, 2 * 3 + 1], table[1])
    # the same offset anywhere in the window reads the same row
    assert torch.equal(bias[:, 1 * 3 + 1, 0 * 3 + 0], bias[:, 2 * 3 + 2, 1 * 3 + 1])


def _expected_partners(token, height, width, padded, window, shift):
    """Real tokens whose output depends on `token`, from first principles: after rolling the padded map by
    -shift, both lie in the same window, and neither was carried across the wrap while the other was not."""
    (ty, tx), (hp, wp) = token, padded

    def window_of(y, x):
        return ((y - shift) % hp) // window, ((x - shift) % wp) // window

    def wrapped(y, x):
        return (y < shift, x < shift)

    return {
        (y, x)
        for y in range(height)
        for x in range(width)
        if window_of(y, x) == window_of(ty, tx) and wrapped(y, x) == wrapped(ty, tx)
    }


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
@pytest.mark.parametrize("shift", [0, 2])
def test_shifted_window_attention_does_not_cross_the_shift_boundary(size, shift):
    """Perturb one token; exactly the outputs of its (shifted-)window partners change, padding included."""
    torch.manual_seed(0)
    height, width = size
    window = 4
    padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
    block = _randomise(SwinBlock(dim=8, num_heads=2, window_size=window, shift=shift))
    mask = torch.from_numpy(shifted_window_mask(*padded, window, 2).copy()) if shift else None
    x = torch.randn(1, height, width, 8)
    with torch.no_grad():
        base = block(x, mask)
        for token in [(0, 0), (1, 1), (3, 2), (2, 5), (height - 1, width - 1), (5, 7)]:
            if token[0] >= height or token[1] >= width:
                continue
            perturbed = x.clone()
            perturbed[0, token[0], token[1]] += 3.0 * torch.randn(8)
            change = (block(perturbed, mask) - base).abs().amax(dim=-1)[0]
            changed = {tuple(p) for p in (change > 1e-4).nonzero().tolist()}
            assert changed == _expected_partners(token, height, width, padded, window, shift)
            assert change[change <= 1e-4].max() < 1e-6 if (change <= 1e-4).any() else True


def test_shifted_window_mask_counts():
    """An 8x8 map, window 4, shift 2: the top-left window is unmasked; the bottom-right one holds 4 regions."""
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()
    assert np.isin(mask, (0.0, -100.0)).all()
    # bottom-right window: four 2x2 regions, each token attends to the 4 tokens of its own
    assert ((mask[3] == 0).sum(axis=1) == 4).all()
    assert ((mask[1] == 0).sum(axis=1) == 8).all()


def test_drop_path_is_identity_at_eval_and_drops_whole_samples_in_training():
    torch.manual_seed(0)
    layer = DropPath(0.5)
    x = torch.randn(64, 3, 4)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    kept = (y == 2 * x).flatten(1).all(dim=1)
    dropped = (y == 0).flatten(1).all(dim=1)
    assert (kept | dropped).all() and kept.any() and dropped.any()
    model = _tiny(drop_path_rate=0.3).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images), model(images)))


def _model_pair(out_indices=(1, 2, 3)):
    source = _randomise(_tiny(out_indices=out_indices), seed=1)
    target = _tiny(out_indices=out_indices).eval()
    return source, target


def _outputs(model, images):
    with torch.no_grad():
        return model(images)


def test_timm_layout_round_trip_and_load():
    source, target = _model_pair()
    timm = export_state_dict(source.state_dict(), "timm")
    assert "layers.1.downsample.reduction.weight" in timm and "layers.0.downsample.norm.weight" not in timm
    assert tuple(timm["layers.1.downsample.reduction.weight"].shape) == (32, 64)
    assert "norm.weight" in timm and not any(k.startswith("out_norms") for k in timm)
    assert detect_layout(list(timm)) == "timm"
    timm["head.fc.weight"] = torch.zeros(10, 128)  # a classifier checkpoint: dropped
    back = convert_state_dict(timm)
    own = source.state_dict()
    assert set(back) == set(own) - {"out_norms.1.weight", "out_norms.1.bias", "out_norms.2.weight", "out_norms.2.bias"}
    assert all(torch.equal(back[k], own[k]) for k in back)
    missing, unexpected = load_pretrained(target, {"model": timm})
    assert sorted(missing) == ["out_norms.1.bias", "out_norms.1.weight", "out_norms.2.bias", "out_norms.2.weight"]
    assert unexpected == []
    images = torch.rand(1, 3, 48, 80)
    assert torch.equal(_outputs(source, images)[-1], _outputs(target, images)[-1])


def test_microsoft_layout_moves_patch_merging_to_the_previous_stage():
    source, target = _model_pair(out_indices=(3,))
    original = export_state_dict(source.state_dict(), "swin")
    assert "layers.0.downsample.reduction.weight" in original and "layers.3.downsample.norm.weight" not in original
    assert detect_layout(list(original)) == "swin"
    original["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)  # derived buffers: dropped
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    original["head.weight"] = torch.zeros(10, 128)
    assert load_pretrained(target, original) == ([], [])
    images = torch.rand(1, 3, 40, 72)
    assert torch.equal(_outputs(source, images)[0], _outputs(target, images)[0])


def test_mmdet_layout_round_trip_and_load_under_a_prefix():
    source, target = _model_pair()
    mmdet = {f"backbone.{k}": v for k, v in export_state_dict(source.state_dict(), "mmdet").items()}
    for key in (
        "backbone.patch_embed.projection.weight",
        "backbone.stages.0.blocks.1.attn.w_msa.relative_position_bias_table",
        "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight",
        "backbone.stages.2.blocks.1.ffn.layers.0.0.weight",
        "backbone.stages.2.blocks.1.ffn.layers.1.bias",
        "backbone.stages.0.downsample.reduction.weight",
        "backbone.norm1.weight",
        "backbone.norm3.bias",
    ):
        assert key in mmdet, key
    assert detect_layout([k[len("backbone.") :] for k in mmdet]) == "mmdet"
    mmdet["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)  # another module's weights: not selected
    back = convert_state_dict(mmdet, prefix="backbone.")
    own = source.state_dict()
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)
    assert load_pretrained(target, mmdet, prefix="backbone.") == ([], [])
    images = torch.rand(2, 3, 64, 176)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(source, images), _outputs(target, images)))
    with pytest.raises(ValueError, match="no Swin weights"):
        load_pretrained(target, mmdet, prefix="img_backbone.")


def test_mmdet_patch_merging_weights_act_on_mmdet_unfold_features():
    """mmdet merges 2x2 neighbourhoods with nn.Unfold (channel-major order); its weights, applied that way,
    must compute what ours compute on our (offset-major) order."""
    torch.manual_seed(0)
    merge = _randomise(PatchMerging(dim=6, out_dim=12))
    theirs = export_state_dict({f"layers.1.downsample.{k}": v for k, v in merge.state_dict().items()}, "mmdet")
    x = torch.randn(2, 4, 6, 6)  # NHWC
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, 4C)
    normed = F.layer_norm(
        unfolded, (24,), theirs["stages.0.downsample.norm.weight"], theirs["stages.0.downsample.norm.bias"]
    )
    expected = normed @ theirs["stages.0.downsample.reduction.weight"].T
    with torch.no_grad():
        assert torch.allclose(merge(x).reshape(2, -1, 12), expected, atol=1e-5)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        convert_state_dict({"patch_embed.proj.weight": torch.zeros(1)}, layout="detectron")


def test_removing_a_head_equals_zeroing_it():
    """The forward reads num_heads from the module, so a pruner can drop a head's qkv rows, bias column and
    proj columns and update the attribute; head_dim and the scale stay."""
    torch.manual_seed(0)
    attn = _randomise(WindowAttention(dim=12, num_heads=3, window_size=2))
    x = torch.randn(5, 4, 12)
    head, hd = 1, attn.head_dim
    keep = [i for i in range(3 * 12) if (i % 12) // hd != head]
    keep_proj = [i for i in range(12) if i // hd != head]
    zeroed = _randomise(WindowAttention(dim=12, num_heads=3, window_size=2))
    zeroed.load_state_dict(attn.state_dict())
    pruned = WindowAttention(dim=12, num_heads=3, window_size=2).eval()
    with torch.no_grad():
        zeroed.proj.weight[:, head * hd : (head + 1) * hd] = 0
        pruned.qkv = torch.nn.Linear(12, len(keep))
        pruned.qkv.weight.copy_(attn.qkv.weight[keep])
        pruned.qkv.bias.copy_(attn.qkv.bias[keep])
        pruned.proj = torch.nn.Linear(len(keep_proj), 12)
        pruned.proj.weight.copy_(attn.proj.weight[:, keep_proj])
        pruned.proj.bias.copy_(attn.proj.bias)
        table = attn.relative_position_bias_table[:, [h for h in range(3) if h != head]]
        pruned.relative_position_bias_table = torch.nn.Parameter(table.clone())
        pruned.num_heads = 2
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # static shapes are the point of the export
def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    # Padding in stages 1-3 (8x22, 4x11, 2x6 with window 4) and a shifted block in stage 2.
    model = _randomise(swin_cpu(embed_dim=16, num_heads=(1, 2, 2, 4)), seed=2)
    images = torch.rand(1, 3, 64, 176)
    path = tmp_path / "swin.onnx"
    names = [f"stage{i}" for i in model.out_indices]
    torch.onnx.export(
        model, (images,), str(path), input_names=["images"], output_names=names, opset_version=17, dynamo=False
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(names, {"images": images.numpy()})
    expected = _outputs(model, images)
    for a, b in zip(got, expected):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= 1e-4
