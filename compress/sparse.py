"""Sparse 3-D convolutions (spconv 2.x, or the plain-PyTorch backend in `common.sparse`) as first-class layers.

Three small jobs, one function each:
- `SparseConvPruner`: torch-pruning's extension point (a customised pruner per layer type) cutting output
  channels on weight dim 0 and input channels on the last dim, spconv's (out, *kernel, in) layout;
- `active_pairs`: how many (input site, kernel offset) pairs a sparse conv multiplied on a batch, from its
  rulebook where the backend exposes one, else from the geometry of its input and output sites (the same
  count spconv's rulebook holds, its SubM centre offset included). GFLOPs = 2 x pairs x Cin/groups x Cout;
- `needs_cuda_backward`: spconv's CPU build has no backward pass, so gradient scores need CUDA there.

Nothing here imports spconv: layers are recognised by duck typing (`common.layers.is_sparse_conv`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from common.layers import is_sparse_conv, is_transposed_sparse


class SparseConvPruner(tp.pruner.function.BasePruningFunc):
    """Remove output (weight dim 0, bias) or input (last weight dim) channels of a sparse conv."""

    TARGET_MODULES = ()

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _kept(layer.out_channels, idxs)
        layer.weight = nn.Parameter(layer.weight.data.index_select(0, keep).clone(), layer.weight.requires_grad)
        if getattr(layer, "bias", None) is not None:
            layer.bias = nn.Parameter(layer.bias.data.index_select(0, keep).clone(), layer.bias.requires_grad)
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _kept(layer.in_channels, idxs)
        dim = layer.weight.dim() - 1
        layer.weight = nn.Parameter(layer.weight.data.index_select(dim, keep).clone(), layer.weight.requires_grad)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def _kept(channels: int, idxs: Sequence[int]) -> torch.Tensor:
    removed = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(channels) if i not in removed], dtype=torch.long)


def sparse_pruners(model: nn.Module) -> dict[type, SparseConvPruner]:
    """One customised torch-pruning pruner per sparse conv type found in the model (empty without any)."""
    pruner = SparseConvPruner()
    return {type(m): pruner for m in model.modules() if is_sparse_conv(m) and not is_transposed_sparse(m)}


def sparse_unsupported_reason(module: nn.Module) -> str | None:
    """Why a sparse conv cannot be pruned or counted here (None: it can)."""
    if is_transposed_sparse(module):
        return "transposed sparse convolution (its geometry is not supported; inverse convs are)"
    if getattr(module, "groups", 1) != 1:
        return f"grouped sparse convolution (groups={module.groups})"
    if getattr(module, "conv1x1", False) and type(module).__module__.startswith("spconv"):
        # spconv multiplies `weight.view(in, out)` for 1x1 kernels: not the (out, ..., in) layout sliced here
        return "spconv 1x1 sparse convolution (its kernel reads the weight's memory as (in, out))"
    return None


# ---- counting -------------------------------------------------------------------------------------
def _triple(value: Any, ndim: int) -> list[int]:
    if isinstance(value, int):
        return [value] * ndim
    return [int(v) for v in value]


def _site_keys(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One int64 key per (batch, *spatial) site, for membership tests."""
    key = coords[:, 0].long()
    for d, size in enumerate(shape):
        key = key * int(size) + coords[:, d + 1].long()
    return key


def _offsets(kernel: Sequence[int]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(k) for k in kernel], indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=1)


def subm_pairs(
    indices: torch.Tensor, spatial_shape: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]
) -> int:
    """Pairs of a submanifold conv: for every active site, the kernel offsets that land on an active site."""
    coords = indices.long()
    shape = [int(s) for s in spatial_shape]
    keys = torch.sort(_site_keys(coords, shape)).values
    total = 0
    for offset in _offsets(kernel):
        shift = (offset - torch.tensor([k // 2 for k in kernel])) * torch.tensor(dilation)
        moved = coords.clone()
        moved[:, 1:] += shift
        inside = ((moved[:, 1:] >= 0) & (moved[:, 1:] < torch.tensor(shape))).all(dim=1)
        candidates = _site_keys(moved[inside], shape)
        found = torch.searchsorted(keys, candidates).clamp(max=len(keys) - 1)
        total += int((keys[found] == candidates).sum())
    return total


def strided_pairs(
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> int:
    """Pairs of a regular sparse conv: every (input site, kernel offset) that lands on an output position.

    The count factorises per spatial dimension: a site's pairs are the product over dims of the kernel taps
    k with (p + pad - k * dil) divisible by the stride and inside the output grid.
    """
    coords = indices.long()[:, 1:]
    per_site = torch.ones(len(coords), dtype=torch.long)
    for d in range(coords.shape[1]):
        out_size = (int(spatial_shape[d]) + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        taps = torch.arange(kernel[d])
        numerator = coords[:, d : d + 1] + padding[d] - taps[None, :] * dilation[d]
        valid = (numerator % stride[d] == 0) & (numerator >= 0) & (numerator // stride[d] < out_size)
        per_site = per_site * valid.sum(dim=1)
    return int(per_site.sum())


def active_pairs(module: nn.Module, inputs: tuple, output: Any) -> int | None:
    """The (input site, kernel offset) pairs one call of a sparse conv multiplied, or None if unknown.

    A backend that keeps its rulebook with an `active_pairs()` method (the plain-PyTorch backend, whose
    tensors are padded to static shapes) is asked; otherwise (spconv) the pairs follow from the sites.
    """
    source = inputs[0] if inputs else None
    key = getattr(module, "indice_key", None)
    for tensor in (output, source):
        rulebook = getattr(tensor, "indice_dict", {}).get(key) if key is not None else None
        if rulebook is not None and callable(getattr(rulebook, "active_pairs", None)):
            return int(rulebook.active_pairs())
    if source is None or not hasattr(source, "indices") or sparse_unsupported_reason(module) is not None:
        return None
    ndim = source.indices.shape[1] - 1
    kernel = _triple(module.kernel_size, ndim)
    dilation = _triple(module.dilation, ndim)
    if getattr(module, "subm", False):
        return subm_pairs(source.indices, source.spatial_shape, kernel, dilation)
    if getattr(module, "inverse", False):
        # The inverse of a strided conv multiplies exactly that conv's pairs, read backwards: count them on
        # the forward conv's input sites (this call's output sites) with its geometry, kept by the backend.
        forward = getattr(source, "indice_dict", {}).get(key)
        if forward is None or not hasattr(output, "indices"):
            return None
        return strided_pairs(
            output.indices,
            forward.spatial_shape,
            kernel,
            _triple(forward.stride, ndim),
            _triple(forward.padding, ndim),
            _triple(forward.dilation, ndim),
        )
    stride, padding = _triple(module.stride, ndim), _triple(module.padding, ndim)
    return strided_pairs(source.indices, source.spatial_shape, kernel, stride, padding, dilation)


def sparse_flops(module: nn.Module, pairs: int) -> float:
    """FLOPs (2 x MACs) of `pairs` multiplications of a Cin/groups x Cout kernel tap."""
    groups = getattr(module, "groups", 1) or 1
    return 2.0 * pairs * module.in_channels // groups * module.out_channels


def needs_cuda_backward(model: nn.Module) -> str | None:
    """Why gradients cannot flow through this model's sparse convs here (None: they can)."""
    spconv_layers = [m for m in model.modules() if is_sparse_conv(m) and type(m).__module__.startswith("spconv")]
    if not spconv_layers:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return None
    return (
        f"spconv's CPU build has no backward pass ({len(spconv_layers)} spconv layers, model on {device}): "
        "gradient-based scores need the model on CUDA, or a data-free method (magnitude, random)"
    )


def spconv_threads_warning(model: nn.Module) -> str | None:
    """spconv's CPU kernels accumulate in a thread-dependent order: with more than one torch thread two
    forward passes of one model differ (by up to 3e-4 measured on examples/spconv_fusion.py), so scores,
    zero-then-prune checks and reloads stop being reproducible. None when that cannot happen."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    uses_spconv = any(is_sparse_conv(m) and type(m).__module__.startswith("spconv") for m in model.modules())
    if not uses_spconv or device.type != "cpu" or torch.get_num_threads() == 1:
        return None
    return (
        f"spconv's CPU kernels are not deterministic with {torch.get_num_threads()} threads: "
        "results differ run to run; use 1 thread (--threads 1, torch.set_num_threads(1))"
    )
