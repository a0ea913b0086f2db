"""Where a layer keeps its channels: one small rule per layer kind, shared by pruning, resizing and counting.

Dense convs keep output channels on weight dim 0 and inputs on dim 1 (transposed convs the other way round);
linear layers (out, in). Sparse 3-D convolutions (spconv 2.x and the plain-PyTorch backend in
`common.sparse`) store weights as (out, *kernel, in): inputs on the LAST dim. They are recognised by duck
typing, so neither this module nor `compress` needs spconv installed: a class named `SparseConvolution`
in the module's MRO (spconv's base class and ours share the name) with `in_channels`/`out_channels`.
"""

from __future__ import annotations

from torch import nn

SPARSE_BASE = "SparseConvolution"


def is_sparse_conv(module: nn.Module) -> bool:
    """A spconv-style sparse convolution (SubMConv3d, SparseConv3d, SparseInverseConv3d, ...)."""
    return (
        any(cls.__name__ == SPARSE_BASE for cls in type(module).__mro__)
        and hasattr(module, "in_channels")
        and hasattr(module, "out_channels")
        and getattr(module, "weight", None) is not None
    )


def is_transposed_sparse(module: nn.Module) -> bool:
    """A transposed (not inverse) sparse conv: its geometry is not counted or pruned here."""
    return is_sparse_conv(module) and bool(getattr(module, "transposed", False))


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """(output-channel dim, input-channel dim) of the layer's weight."""
    if is_sparse_conv(module):
        return 0, module.weight.dim() - 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1, 0
    return 0, 1


def layer_channels(module: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a conv, sparse conv or linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels
