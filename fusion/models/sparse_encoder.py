"""SECOND/VoxelNet sparse voxel encoder (mmdet3d's `SparseEncoder`, block_type="basicblock") on two backends.

conv_input (SubMConv3d + BN1d + ReLU), then stages of residual basic blocks (SubMConv3d-BN1d-ReLU-
SubMConv3d-BN1d + identity, ReLU) with a strided SparseConv3d (+ BN1d + ReLU) closing every stage but the
last, then conv_out (SparseConv3d, kernel (3, 1, 1), stride (2, 1, 1): halves z) and `.dense()` folded to
BEV as (B, C * D, H, W), exactly as mmdet3d does.

`backend="spconv"` builds spconv.pytorch modules (GPU training, spconv deployments); `backend="plain"`
builds `common.sparse` modules (CPU training, ONNX export). Parameter names and shapes are the same, so
a state dict trained with one loads into the other. The plain backend needs rulebooks built outside the
forward pass: `encoder.build_rulebooks(coors, batch_size)` gives the `indice_dict` to pass to forward.

Parameter names follow mmdet3d: `conv_input.0.weight`, `conv_input.1.*` (BN), `encoder_layers.
encoder_layer{i}.{j}.conv1.weight` / `.bn1.*` / `.conv2.weight` / `.bn2.*` for blocks,
`encoder_layers.encoder_layer{i}.{j}.0.weight` / `.1.*` for the stage's strided conv, `conv_out.0.weight`,
`conv_out.1.*`. Unlike mmdet3d, block convs carry the indice_key `subm{i}` (the plain backend needs a
rulebook key per layer; for spconv it only reuses the rulebook it would have rebuilt).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType

import torch
from torch import nn

from common import sparse as plain_sparse

BACKENDS = ("plain", "spconv")
SPCONV_CPU_THREADS = (
    "spconv 2.3's CPU kernels race with more than one torch thread (two identical calls differed by 5e-3 "
    "with 2 threads): use torch.set_num_threads(1) for spconv on CPU"
)
# BEVFusion's LiDAR encoder (mmdet3d configs), z-y-x order: stage paddings of the strided convs at position -1
BEVFUSION_CHANNELS = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128))
BEVFUSION_PADDINGS = ((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0))


def backend_module(backend: str) -> ModuleType:
    """The module providing SubMConv3d, SparseConv3d, SparseSequential, SparseModule for a backend."""
    if backend == "plain":
        return plain_sparse
    if backend == "spconv":
        try:
            return importlib.import_module("spconv.pytorch")
        except ImportError as error:
            raise ImportError(
                f"backend='spconv' needs spconv 2.x (pip install spconv or spconv-cu12x): {error}; "
                "backend='plain' needs nothing"
            ) from error
    raise ValueError(f"unknown sparse backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class _BasicBlockBase(nn.Module):
    """Residual block of two SubM convs (mmdet3d's SparseBasicBlock: conv1, bn1, conv2, bn2, relu)."""

    def __init__(self, backend: ModuleType, channels: int, indice_key: str, eps: float, momentum: float):
        super().__init__()
        self.conv1 = backend.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = nn.BatchNorm1d(channels, eps=eps, momentum=momentum)
        self.conv2 = backend.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = nn.BatchNorm1d(channels, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x.features
        out = self.conv1(x)
        out = plain_sparse.apply_to_features(self.relu, plain_sparse.apply_to_features(self.bn1, out))
        out = plain_sparse.apply_to_features(self.bn2, self.conv2(out))
        out = out.replace_feature(out.features + identity)
        return plain_sparse.apply_to_features(self.relu, out)


@functools.cache
def _block_class(backend_name: str) -> type:
    """The block as a SparseModule of its backend, so that backend's SparseSequential passes it the tensor."""
    base = backend_module(backend_name).SparseModule
    return type("SparseBasicBlock", (_BasicBlockBase, base), {"__module__": __name__})


def _conv_bn_relu(backend: ModuleType, conv: nn.Module, channels: int, eps: float, momentum: float) -> nn.Module:
    """mmdet3d's make_sparse_convmodule: SparseSequential(conv, BN1d, ReLU) -> names .0, .1, .2."""
    return backend.SparseSequential(conv, nn.BatchNorm1d(channels, eps=eps, momentum=momentum), nn.ReLU(inplace=True))


class SparseEncoder(nn.Module):
    """Voxel features (N, C) + coordinates (N, 4) [batch, z, y, x] -> BEV features (B, C_out * D_out, H, W)."""

    def __init__(
        self,
        in_channels: int,
        sparse_shape: Sequence[int],
        base_channels: int = 16,
        output_channels: int = 128,
        encoder_channels: Sequence[Sequence[int]] = BEVFUSION_CHANNELS,
        encoder_paddings: Sequence[Sequence[int | Sequence[int]]] = BEVFUSION_PADDINGS,
        backend: str = "plain",
        norm_eps: float = 1e-3,
        norm_momentum: float = 0.01,
    ):
        super().__init__()
        self.backend = backend
        sp = backend_module(backend)
        self.in_channels = in_channels
        self.sparse_shape = [int(s) for s in sparse_shape]
        _check_stages(base_channels, encoder_channels, encoder_paddings)
        norm = {"eps": norm_eps, "momentum": norm_momentum}
        self.conv_input = _conv_bn_relu(
            sp,
            sp.SubMConv3d(in_channels, base_channels, 3, padding=1, bias=False, indice_key="subm1"),
            base_channels,
            **norm,
        )
        self.encoder_layers = sp.SparseSequential()
        channels = base_channels
        for i, (stage, paddings) in enumerate(zip(encoder_channels, encoder_paddings)):
            blocks = []
            for j, (out_channels, padding) in enumerate(zip(stage, paddings)):
                if j == len(stage) - 1 and i != len(encoder_channels) - 1:
                    conv = sp.SparseConv3d(
                        channels, out_channels, 3, stride=2, padding=padding, bias=False, indice_key=f"spconv{i + 1}"
                    )
                    blocks.append(_conv_bn_relu(sp, conv, out_channels, **norm))
                else:
                    blocks.append(_block_class(backend)(sp, out_channels, f"subm{i + 1}", **norm))
                channels = out_channels
            self.encoder_layers.add_module(f"encoder_layer{i + 1}", sp.SparseSequential(*blocks))
        conv_out = sp.SparseConv3d(
            channels, output_channels, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2"
        )
        self.conv_out = _conv_bn_relu(sp, conv_out, output_channels, **norm)
        self.output_channels = output_channels
        self.output_shape = _output_shape(self.sparse_shape, self.layer_specs())
        self.out_channels = output_channels * self.output_shape[0]  # BEV channels after folding z

    def layer_specs(self) -> list[plain_sparse.LayerSpec]:
        """Every sparse conv's geometry and indice_key, in forward order (what rulebooks are built from)."""
        return plain_sparse.layer_specs(self)

    def build_rulebooks(
        self, coors: torch.Tensor, batch_size: int, capacities: Mapping[str, int] | None = None
    ) -> dict[str, plain_sparse.RuleBook]:
        """The plain backend's indice_dict for one batch (preprocessing; see common.sparse.build_rulebooks)."""
        return plain_sparse.build_rulebooks(
            coors, self.sparse_shape, batch_size, self.layer_specs(), capacities=capacities
        )

    def forward(
        self,
        voxel_features: torch.Tensor,
        coors: torch.Tensor,
        batch_size: int,
        indice_dict: dict | None = None,
    ) -> torch.Tensor:
        """(N, C) features and (N, 4) int coordinates (padding rows: batch -1) -> (B, C_out * D_out, H, W)."""
        x = self._input_tensor(voxel_features, coors, batch_size, indice_dict)
        x = self.conv_input(x)
        x = self.encoder_layers(x)
        dense = self.conv_out(x).dense()
        n, c, d, h, w = dense.shape
        return dense.view(n, c * d, h, w)

    def _input_tensor(self, features: torch.Tensor, coors: torch.Tensor, batch_size: int, indice_dict: dict | None):
        if self.backend == "plain":
            if indice_dict is None:
                raise ValueError("the plain backend needs rulebooks: pass indice_dict=encoder.build_rulebooks(...)")
            return plain_sparse.SparseTensor(features, coors.int(), self.sparse_shape, batch_size, indice_dict)
        sp = backend_module("spconv")
        if not features.is_cuda and torch.get_num_threads() > 1:
            warnings.warn(SPCONV_CPU_THREADS, stacklevel=3)
        real = coors[:, 0] >= 0  # spconv takes real rows only
        if not bool(real.all()):
            features, coors = features[real], coors[real]
        return sp.SparseConvTensor(features, coors.int(), self.sparse_shape, batch_size)


def _check_stages(base: int, channels: Sequence[Sequence[int]], paddings: Sequence[Sequence]) -> None:
    """Residual blocks keep their width: every block's channels must equal the channels entering it."""
    if len(channels) != len(paddings) or any(len(c) != len(p) for c, p in zip(channels, paddings)):
        raise ValueError("encoder_paddings must have one entry per entry of encoder_channels")
    width = base
    for i, stage in enumerate(channels):
        for j, out in enumerate(stage):
            strided = j == len(stage) - 1 and i != len(channels) - 1
            if not strided and out != width:
                raise ValueError(f"residual block {i + 1}.{j} maps {width} channels to {out}; blocks keep their width")
            width = out


def _output_shape(shape: Sequence[int], specs: Sequence[plain_sparse.LayerSpec]) -> tuple[int, int, int]:
    """Grid (D, H, W) after all strided convs (the dense output before folding z into channels)."""
    out = tuple(shape)
    for spec in specs:
        if not spec.subm and not spec.inverse and not spec.conv1x1:
            out = plain_sparse.conv_output_shape(out, spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    return out
