"""Camera backbone: a plain-PyTorch Swin Transformer (Liu et al. 2021), as BEVFusion's Swin-T camera encoder.

Written here instead of imported from timm or mmdet because neither installs beside our CPU torch. Parameter
names and shapes follow timm's current layout (`patch_embed.proj`, `layers.N.downsample` at the start of stage
N, `layers.N.blocks.M.attn.qkv`, `.mlp.fc1`, ...), so timm's Swin-T weights load by name;
`convert_state_dict` renames Microsoft's original, older timm and mmdet checkpoints to it.

The forward follows mmdet's detection backbone, not timm's classifier: feature maps whose sides are not a
multiple of the window are padded at the bottom and right (BEVFusion feeds 256x704 images, whose stride-4 map
is 64x176), the window never shrinks to the feature map, and every stage in `out_indices` gets its own output
LayerNorm and comes out as an NCHW map for the FPN neck.

Structure kept prunable: attention is one `qkv` Linear and one `proj` Linear with `num_heads` and `head_dim`
recorded on the module (a pruner that removes heads updates them; the forward reads them), and the MLP is
`fc1` / `fc2`, so its hidden width can be cut independently.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.resnet import IMAGE_MEAN, IMAGE_STD

SWIN_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7}
# CPU presets: Swin-T's head width (32 channels per head) and structure at a third of its width and depth.
SWIN_CPU = {"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}
MASK_VALUE = -100.0  # added to the logits of token pairs a shifted window must keep apart (as timm and mmdet)
LAYOUTS = ("timm", "swin", "mmdet")


def get_relative_position_index(win_h: int, win_w: int) -> torch.Tensor:
    """(N, N) row of the bias table for each query/key pair of a win_h x win_w window (N = win_h * win_w).

    The table holds one row per relative offset (dy, dx), dy in [-(win_h-1), win_h-1], stored row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    dy, dx = relative[0] + win_h - 1, relative[1] + win_w - 1
    return dy * (2 * win_w - 1) + dx


@functools.lru_cache(maxsize=32)
def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) additive mask for shifted-window attention on a padded height x width map.

    The cyclic shift moves the first `shift` rows and columns to the bottom and right; tokens that were not
    neighbours before the shift share a window afterwards and must not attend to each other. Each token gets
    a region id (which of the three row bands and three column bands it falls in after the roll); pairs with
    different ids get MASK_VALUE. Cached: one mask per feature-map size, built once, read-only."""
    region = np.zeros((height, width), dtype=np.float32)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[rows, cols] = label
            label += 1
    windows = region.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    mask = np.where(windows[:, None, :] != windows[:, :, None], MASK_VALUE, 0.0).astype(np.float32)
    mask.setflags(write=False)
    return mask


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window * window, C); H and W multiples of the window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * num_windows, window * window, C) -> (B, height, width, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples while training; identity at eval."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        # Fixed at construction: a pruner that narrows head_dim keeps the scale the weights were trained with.
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Derived from the window size, so not saved (as timm): checkpoints stay loadable across layouts.
        index = get_relative_position_index(window_size, window_size)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * self.num_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.num_heads * self.head_dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, N, N) bias added to every window's attention logits."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B * num_windows, N, C); mask (num_windows, N, N) of 0 / MASK_VALUE for shifted windows."""
        windows, n, _ = x.shape
        qkv = self.qkv(x).reshape(windows, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(2, 3) + self.relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(windows, n, -1)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; the hidden width (fc1's outputs) is what a pruner cuts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted-)window attention, then the MLP, each with a residual and drop-path."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, W, C); `mask` is the stage's shifted-window mask for the padded map (unused unshifted)."""
        _, h, w, c = x.shape
        window = self.window_size
        pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
        y = self.norm1(x)
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))  # after the norm, as mmdet: padded tokens are zeros
        height, width = h + pad_h, w + pad_w
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, window), mask if self.shift else None)
        y = window_reverse(y.view(-1, window * window, c), window, height, width)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_h or pad_w:
            y = y[:, :h, :w, :].contiguous()
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv to the embedding width, then LayerNorm; returns NHWC."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[2], x.shape[3]
        pad_h, pad_w = (p - h % p) % p, (p - w % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # bottom and right, as mmdet's "corner" adaptive padding
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Halves the resolution: each 2x2 neighbourhood's four C-vectors are concatenated (4C), normed, projected.

    Concatenation order (row offset, column offset) = (0,0), (1,0), (0,1), (1,1), as timm and Microsoft's
    original; mmdet's Unfold orders the same 4C features channel-major, which `convert_state_dict` undoes."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging (every stage but the first), then blocks alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        drop_path: Sequence[float] = (),
    ):
        super().__init__()
        self.window_size = window_size
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                SwinBlock(out_dim, num_heads, window_size, window_size // 2 if i % 2 else 0, mlp_ratio, rates[i])
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        window = self.window_size
        height, width = -(-x.shape[1] // window) * window, -(-x.shape[2] // window) * window
        mask = None
        if len(self.blocks) > 1:
            # Built from Python ints, so a traced export holds it as a constant.
            mask = torch.from_numpy(shifted_window_mask(height, width, window, window // 2).copy())
            mask = mask.to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinTransformer(nn.Module):
    """Returns the NCHW outputs of the stages in `out_indices` (stage i has stride 4 * 2**i and
    embed_dim * 2**i channels), each after its own LayerNorm, for an FPN neck."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (1, 2, 3),
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads must have the same length, got {len(depths)} and {len(num_heads)}")
        if not out_indices or any(not 0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in [0, {len(depths)}), got {tuple(out_indices)}")
        self.out_indices = tuple(sorted(set(out_indices)))
        self.num_stages = len(depths)  # as published; stages after the last output are not built
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        total = sum(depths)  # deeper blocks drop more, linearly from 0 to drop_path_rate, as the paper
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start = [], 0
        for i, (depth, heads) in enumerate(zip(depths[: self.out_indices[-1] + 1], num_heads)):
            stage_rates = rates[start : start + depth]
            stages.append(
                SwinStage(
                    dims[max(i - 1, 0)], dims[i], depth, heads, window_size, i > 0, mlp_ratio, drop_path=stage_rates
                )
            )
            start += depth
        self.layers = nn.Sequential(*stages)
        self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(dims[i]) for i in self.out_indices})
        self.out_channels = [dims[i] for i in self.out_indices]
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed((images - self.mean) / self.std)
        outputs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                outputs.append(self.out_norms[str(i)](x).permute(0, 3, 1, 2).contiguous())
        return outputs


def _init_weights(module: nn.Module) -> None:
    """timm's and mmdet's initialisation: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def swin_t(out_indices: Sequence[int] = (1, 2, 3), drop_path_rate: float = 0.2) -> SwinTransformer:
    """Swin-T as published and as BEVFusion configures it (strides 8, 16, 32 out; drop-path 0.2)."""
    return SwinTransformer(**SWIN_T, drop_path_rate=drop_path_rate, out_indices=out_indices)


def swin_cpu(
    embed_dim: int = SWIN_CPU["embed_dim"],
    depths: Sequence[int] = SWIN_CPU["depths"],
    num_heads: Sequence[int] = SWIN_CPU["num_heads"],
    window_size: int = SWIN_CPU["window_size"],
    out_indices: Sequence[int] = (1, 2, 3),
    drop_path_rate: float = 0.0,
) -> SwinTransformer:
    """A Swin small enough to train on two CPU cores: same block structure, narrower, shallower, smaller windows."""
    return SwinTransformer(
        embed_dim, depths, num_heads, window_size, drop_path_rate=drop_path_rate, out_indices=out_indices
    )


# ---------------------------------------------------------------------------------------------------------------
# State-dict layouts
#
#   ours / timm (>= 0.9)        Microsoft original, timm < 0.9     mmdet (and BEVFusion's camera backbone)
#   patch_embed.proj            patch_embed.proj                   patch_embed.projection
#   layers.N.blocks.M.attn.*    (same)                             stages.N.blocks.M.attn.w_msa.*
#   layers.N.blocks.M.mlp.fc1   (same)                             stages.N.blocks.M.ffn.layers.0.0
#   layers.N.blocks.M.mlp.fc2   (same)                             stages.N.blocks.M.ffn.layers.1
#   layers.N.downsample.*       layers.(N-1).downsample.*          stages.(N-1).downsample.*  (4C features reordered)
#   out_norms.i                 norm (last stage only)             norm{i}
#   -                           head.*, attn_mask, rel. index      rel. index                 (dropped)
# ---------------------------------------------------------------------------------------------------------------

_MMDET_UNFOLD = [0, 2, 1, 3]  # mmdet's Unfold visits the 2x2 offsets in this order of ours (its own inverse)


def detect_layout(keys: Sequence[str]) -> str:
    """ "mmdet", "swin" (Microsoft's original and timm < 0.9) or "timm", from the key names alone."""
    if any(k.startswith("stages.") or ".w_msa." in k or ".ffn.layers." in k for k in keys):
        return "mmdet"
    if any(k.startswith("layers.0.downsample.") for k in keys):
        return "swin"
    return "timm"


def _merge_features_from_mmdet(value: torch.Tensor) -> torch.Tensor:
    """mmdet's PatchMerging feature order (channel-major over the 2x2 offsets) to ours (offset-major), on the
    last dim: the reduction weight's input dim, the norm's only dim."""
    lead, four_c = value.shape[:-1], value.shape[-1]
    grouped = value.reshape(*lead, four_c // 4, 4).transpose(-1, -2)  # (..., 4 mmdet offsets, C)
    return grouped[..., _MMDET_UNFOLD, :].reshape(*lead, four_c)


def _merge_features_to_mmdet(value: torch.Tensor) -> torch.Tensor:
    lead, four_c = value.shape[:-1], value.shape[-1]
    grouped = value.reshape(*lead, 4, four_c // 4)[..., _MMDET_UNFOLD, :]  # (..., 4 mmdet offsets, C)
    return grouped.transpose(-1, -2).reshape(*lead, four_c)


def _shift_downsample(key: str, by: int, prefix: str) -> str:
    return re.sub(rf"^{prefix}\.(\d+)\.downsample\.", lambda m: f"{prefix}.{int(m.group(1)) + by}.downsample.", key)


def _from_mmdet_key(key: str) -> str:
    if key.startswith("patch_embed.projection."):
        return "patch_embed.proj." + key[len("patch_embed.projection.") :]
    match = re.match(r"^norm(\d+)\.(weight|bias)$", key)
    if match:
        return f"out_norms.{match.group(1)}.{match.group(2)}"
    if not key.startswith("stages."):
        return key if key.startswith("patch_embed.") else None
    key = key.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
    key = key.replace(".ffn.layers.1.", ".mlp.fc2.")
    return _shift_downsample("layers." + key[len("stages.") :], 1, "layers")


def _to_mmdet_key(key: str) -> str:
    if key.startswith("patch_embed.proj."):
        return "patch_embed.projection." + key[len("patch_embed.proj.") :]
    if key.startswith("out_norms."):
        index, name = key[len("out_norms.") :].split(".")
        return f"norm{index}.{name}"
    if not key.startswith("layers."):
        return key
    key = key.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
    key = key.replace(".mlp.fc2.", ".ffn.layers.1.")
    return _shift_downsample("stages." + key[len("layers.") :], -1, "stages")


def _is_derived(key: str) -> bool:
    """Buffers recomputed from the configuration, and the classifier a detection backbone has no use for."""
    return key.endswith(("relative_position_index", "attn_mask")) or key.startswith("head.")


def convert_state_dict(
    state: Mapping[str, torch.Tensor], layout: str = "auto", prefix: str = "", last_stage: int = 3
) -> dict[str, torch.Tensor]:
    """A Swin state dict in `layout` ("timm", "swin", "mmdet" or "auto") renamed to this module's keys.

    `prefix` selects and strips a sub-module's keys (e.g. "backbone." in an mmdet detector checkpoint,
    "encoders.camera.backbone." in BEVFusion's). The classifier (`head.*`) and the derived buffers
    (`relative_position_index`, `attn_mask`) are dropped. mmdet's patch-merging norm and reduction are
    permuted back to the timm feature order (the inverse of mmdet's `swin_converter`). timm's and
    Microsoft's final `norm` (after the last stage, for the classifier) becomes `out_norms.{last_stage}`:
    the same function of the same features, and the best start for that output norm."""
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if layout == "auto":
        layout = detect_layout(list(state))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of auto, {', '.join(LAYOUTS)}; got {layout!r}")
    out = {}
    for key, value in state.items():
        if _is_derived(key):
            continue
        if layout == "mmdet":
            new_key = _from_mmdet_key(key)
            if ".downsample." in new_key:
                value = _merge_features_from_mmdet(value)
        elif key.startswith("norm."):
            new_key = f"out_norms.{last_stage}." + key[len("norm.") :]
        else:
            new_key = _shift_downsample(key, 1, "layers") if layout == "swin" else key
        out[new_key] = value
    return out


def export_state_dict(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """This module's state dict in `layout`'s key names: the inverse of `convert_state_dict`.

    timm and Microsoft keep one output norm (`norm`, after the last stage): the last of `out_norms` becomes
    it and the others, which those layouts have no place for, are left out."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    state = {k: v for k, v in state.items() if not _is_derived(k)}
    norms = sorted({int(k.split(".")[1]) for k in state if k.startswith("out_norms.")})
    out = {}
    for key, value in state.items():
        if layout == "mmdet":
            if ".downsample." in key:
                value = _merge_features_to_mmdet(value)
            out[_to_mmdet_key(key)] = value
        elif key.startswith("out_norms."):
            index, name = key[len("out_norms.") :].split(".")
            if int(index) == norms[-1]:
                out[f"norm.{name}"] = value
        else:
            out[_shift_downsample(key, -1, "layers") if layout == "swin" else key] = value
    return out


def load_pretrained(
    model: SwinTransformer, state: Mapping[str, torch.Tensor], layout: str = "auto", prefix: str = ""
) -> tuple[list[str], list[str]]:
    """Loads a timm / Microsoft / mmdet Swin checkpoint's weights into `model` by name.

    `state` may be the raw dict of a checkpoint file (read it with `torch.load(path, weights_only=True)` or
    safetensors); a "model" or "state_dict" wrapper is unwrapped. Returns (missing, unexpected) keys as
    `load_state_dict(strict=False)`: an ImageNet checkpoint leaves the earlier output norms missing (mmdet
    initialises them fresh too); a shape mismatch (another Swin size, another window) raises."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    converted = convert_state_dict(state, layout, prefix, last_stage=model.num_stages - 1)
    if not converted:
        raise ValueError(f"no Swin weights found under prefix {prefix!r}")
    result = model.load_state_dict(converted, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


__all__ = [
    "SWIN_CPU",
    "SWIN_T",
    "SwinTransformer",
    "convert_state_dict",
    "detect_layout",
    "export_state_dict",
    "get_relative_position_index",
    "load_pretrained",
    "shifted_window_mask",
    "swin_cpu",
    "swin_t",
]
