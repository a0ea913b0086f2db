"""Sparse 3-D convolutions in plain PyTorch: spconv 2.x's module API over rulebooks built in preprocessing.

Why: spconv's CPU build has no backward pass and its ops do not export to ONNX. Here a sparse conv is one
gather and one matmul over a rulebook computed beforehand (numpy, `build_rulebooks`), so it trains on CPU and
exports as Concat + Gather + MatMul (no sort/unique/nonzero, no scatter) for any runtime.

Layout (spconv 2.x, "KRSC"): `weight` is (out_channels, kz, ky, kx, in_channels), `bias` (out_channels,);
parameter names and constructor arguments match `spconv.pytorch.{SubMConv3d, SparseConv3d,
SparseInverseConv3d}`, so a state dict saved with one backend loads into the other. Indices are
(batch, z, y, x) int32, `spatial_shape` is [D, H, W] and `dense()` returns (B, C, D, H, W) like spconv's.

Rulebook (`RuleBook`): for an output row o and kernel offset k (row-major over (kz, ky, kx)),
`gather_index[o, k]` is the input row that meets o through k, or the dump index `num_rows` of the input (a
zero row appended in the forward pass) where none does. Column k is therefore the per-offset pair list of
fixed size (input row, output row o); every output has at most kz*ky*kx inputs, so the forward pass is
exact as one gather + sum (no scatter at all), and the backward pass of the gather is autograd's
scatter-add. `active_pairs()` counts the real pairs (SubM centre offset included), for FLOPs =
2 x pairs x Cin x Cout. SubM layers sharing an `indice_key` share one rulebook; `SparseInverseConv3d`
uses the rulebook of the `SparseConv3d` with its key, read backwards (`inverse_gather_index`).

Static shapes: a tensor may carry padding rows (N fixed). Padding rows have indices (-1, -1, -1, -1);
rulebooks never read them (they point to the dump), so their features are never used: they hold
bias-only values after a conv. Training-mode BatchNorm normalises real rows only (`apply_to_features`).
A strided conv's output rows are the real sites sorted by (batch, z, y, x), then padding up to the
capacity given to `build_rulebooks` (default: exactly the real count).

spconv compatibility note: for kernel volume 1 (and stride 1 unless SubM) spconv 2.x computes
`features @ weight.view(in_channels, out_channels)` (not the KRSC transpose) and keeps the input sites;
these layers do the same (`conv1x1`), so such weights mean the same in both backends.

Imports nothing from the project and never spconv.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

PAD = -1  # index value of padding rows


# ---- geometry ------------------------------------------------------------------------------------
def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (int(value),) * 3 if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return values


def conv_output_shape(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int, int]:
    """Output grid of a regular (strided) sparse conv: nn.Conv3d's formula, per dim."""
    out = tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    )
    if min(out) < 1:
        raise ValueError(f"sparse conv output shape {out} is empty (input {tuple(spatial_shape)})")
    return out


def _kernel_offsets(kernel_size: Sequence[int]) -> np.ndarray:
    """(K, 3) kernel taps (kz, ky, kx) in row-major order: the order of weight[:, kz, ky, kx, :]."""
    grids = np.meshgrid(*[np.arange(k) for k in kernel_size], indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)


def _linear(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """One int64 key per (batch, z, y, x) row; sorting keys sorts rows by batch, z, y, x."""
    d, h, w = (int(s) for s in shape)
    return ((coords[:, 0] * d + coords[:, 1]) * h + coords[:, 2]) * w + coords[:, 3]


def _unlinear(keys: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    d, h, w = (int(s) for s in shape)
    rest, x = np.divmod(keys, w)
    rest, y = np.divmod(rest, h)
    b, z = np.divmod(rest, d)
    return np.stack([b, z, y, x], axis=1)


# ---- rulebooks -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Sites:
    """The rows of a sparse tensor: coordinates (padding rows = -1), which rows are real, and an
    optional dense map (cell of the (B, D, H, W) grid -> row, or `num_rows` for an empty cell)."""

    indices: torch.Tensor  # (N, 4) int32
    spatial_shape: tuple[int, int, int]
    batch_size: int
    valid_index: torch.Tensor  # (n,) int64, the real rows
    dense_index: torch.Tensor | None = None  # (B * D * H * W,) int64

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_valid(self) -> int:
        return int(self.valid_index.shape[0])


@dataclass(eq=False)
class RuleBook:
    """Gather rulebook of one sparse conv (see the module docstring for the layout)."""

    subm: bool
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    in_sites: Sites
    out_sites: Sites
    gather_index: torch.Tensor  # (out rows, K) int64; in_sites.num_rows = no input
    inverse_gather_index: torch.Tensor | None = None  # (in rows, K) int64; out_sites.num_rows = none

    def active_pairs(self) -> int:
        """Real (input row, output row) pairs over all kernel offsets, the SubM centre included."""
        return int((self.gather_index < self.in_sites.num_rows).sum())

    @property
    def indice_pair_num(self) -> torch.Tensor:
        """Real pairs per kernel offset (K,), like spconv's (whose SubM centre entry is 0, not counted)."""
        return (self.gather_index < self.in_sites.num_rows).sum(dim=0)


@dataclass(frozen=True)
class LayerSpec:
    """What rulebook construction needs to know about one sparse conv layer."""

    indice_key: str | None
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)
    dilation: tuple[int, int, int] = (1, 1, 1)
    subm: bool = False
    inverse: bool = False

    @property
    def conv1x1(self) -> bool:
        """spconv's 1x1 fast path: a matmul that keeps the sites and builds no rulebook."""
        return math.prod(self.kernel_size) == 1 and (self.subm or math.prod(self.stride) == 1)


def _spec_of(module: nn.Module) -> LayerSpec:
    return LayerSpec(
        indice_key=module.indice_key,
        kernel_size=_triple(module.kernel_size, "kernel_size"),
        stride=_triple(module.stride, "stride"),
        padding=_triple(module.padding, "padding"),
        dilation=_triple(module.dilation, "dilation"),
        subm=bool(module.subm),
        inverse=bool(module.inverse),
    )


def _is_sparse_conv_module(module: nn.Module) -> bool:
    """This backend's or spconv's sparse conv (duck-typed: both have subm/inverse/indice_key/kernel_size)."""
    return any(cls.__name__ == "SparseConvolution" for cls in type(module).__mro__) and hasattr(module, "subm")


def layer_specs(model: nn.Module) -> list[LayerSpec]:
    """Specs of every sparse conv in `model`, in registration order (which must be the forward order)."""
    return [_spec_of(m) for m in model.modules() if _is_sparse_conv_module(m)]


def make_sites(
    indices: torch.Tensor | np.ndarray, spatial_shape: Sequence[int], batch_size: int, dense: bool = False
) -> Sites:
    """Validate coordinates (rows with batch -1 are padding) and wrap them as `Sites`."""
    coords = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices).astype(np.int64)
    shape = tuple(int(s) for s in spatial_shape)
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"indices must be (N, 4) [batch, z, y, x], got shape {coords.shape}")
    valid = coords[:, 0] != PAD
    real = coords[valid]
    bounds = np.array([batch_size, *shape])
    if len(real) and ((real < 0).any() or (real >= bounds).any()):
        raise ValueError(f"indices outside batch size {batch_size} / spatial shape {list(shape)}")
    keys = _linear(real, shape)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("indices hold the same (batch, z, y, x) site twice")
    padded = np.where(valid[:, None], coords, PAD)
    sites = Sites(
        indices=torch.from_numpy(padded.astype(np.int32)),
        spatial_shape=shape,
        batch_size=int(batch_size),
        valid_index=torch.from_numpy(np.flatnonzero(valid).astype(np.int64)),
    )
    if dense:
        sites.dense_index = _dense_index(sites)
    return sites


def _site_table(sites: Sites) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real coords, their rows, sorted keys and the rows in key order) for membership lookups."""
    rows = sites.valid_index.numpy()
    coords = sites.indices.numpy()[rows].astype(np.int64)
    keys = _linear(coords, sites.spatial_shape)
    order = np.argsort(keys, kind="stable")
    return coords, rows, np.stack([keys[order], rows[order]])


def _lookup(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each key, or -1 where the key is not a site."""
    sorted_keys, sorted_rows = table
    if len(sorted_keys) == 0:
        return np.full(keys.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, sorted_rows[pos], -1)


def _subm_rulebook(sites: Sites, spec: LayerSpec) -> RuleBook:
    """Output rows = input rows; out[o] gathers in[o + (k - centre) * dilation] per offset k."""
    coords, rows, table = _site_table(sites)
    offsets = _kernel_offsets(spec.kernel_size)
    centre = np.array([k // 2 for k in spec.kernel_size])
    shape = np.array(sites.spatial_shape)
    gather = np.full((sites.num_rows, len(offsets)), sites.num_rows, dtype=np.int64)
    for k, offset in enumerate(offsets):
        moved = coords.copy()
        moved[:, 1:] += (offset - centre) * np.array(spec.dilation)
        inside = ((moved[:, 1:] >= 0) & (moved[:, 1:] < shape)).all(axis=1)
        found = np.full(len(rows), -1, dtype=np.int64)
        found[inside] = _lookup(table, _linear(moved[inside], sites.spatial_shape))
        hit = found >= 0
        gather[rows[hit], k] = found[hit]
    return RuleBook(
        True, spec.kernel_size, spec.stride, spec.padding, spec.dilation, sites, sites, torch.from_numpy(gather)
    )


def _strided_rulebook(sites: Sites, spec: LayerSpec, capacity: int | None) -> RuleBook:
    """out[o] gathers in[o * stride - padding + k * dilation]; output sites are every reachable o."""
    coords, rows, _ = _site_table(sites)
    out_shape = conv_output_shape(sites.spatial_shape, spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    stride, padding, dilation = (np.array(v) for v in (spec.stride, spec.padding, spec.dilation))
    hits = []  # (output key, kernel offset, input row)
    for k, offset in enumerate(_kernel_offsets(spec.kernel_size)):
        numerator = coords[:, 1:] + padding - offset * dilation
        out = numerator // stride
        ok = ((numerator % stride == 0) & (out >= 0) & (out < np.array(out_shape))).all(axis=1)
        keys = _linear(np.concatenate([coords[ok, :1], out[ok]], axis=1), out_shape)
        hits.append((keys, np.full(len(keys), k), rows[ok]))
    out_keys, offset_ids, in_rows = (np.concatenate(parts) for parts in zip(*hits))
    unique_keys = np.unique(out_keys)
    n_out = len(unique_keys)
    n_rows = n_out if capacity is None else int(capacity)
    if n_out > n_rows:
        raise ValueError(f"sparse conv '{spec.indice_key}' has {n_out} output sites, over its capacity {n_rows}")
    out_coords = np.full((n_rows, 4), PAD, dtype=np.int64)
    out_coords[:n_out] = _unlinear(unique_keys, out_shape)
    gather = np.full((n_rows, math.prod(spec.kernel_size)), sites.num_rows, dtype=np.int64)
    gather[np.searchsorted(unique_keys, out_keys), offset_ids] = in_rows
    out_sites = Sites(
        indices=torch.from_numpy(out_coords.astype(np.int32)),
        spatial_shape=out_shape,
        batch_size=sites.batch_size,
        valid_index=torch.arange(n_out, dtype=torch.int64),
    )
    return RuleBook(
        False, spec.kernel_size, spec.stride, spec.padding, spec.dilation, sites, out_sites, torch.from_numpy(gather)
    )


def _inverse_gather(rulebook: RuleBook) -> torch.Tensor:
    """The forward pairs read backwards: inverse[i, k] = o where gather[o, k] = i (at most one o)."""
    gather = rulebook.gather_index.numpy()
    inverse = np.full((rulebook.in_sites.num_rows, gather.shape[1]), rulebook.out_sites.num_rows, dtype=np.int64)
    out_rows, offsets = np.nonzero(gather < rulebook.in_sites.num_rows)
    inverse[gather[out_rows, offsets], offsets] = out_rows
    return torch.from_numpy(inverse)


def _dense_index(sites: Sites) -> torch.Tensor:
    """Cell of the (B, D, H, W) grid -> its row, or `num_rows` (the zero row) where the cell is empty."""
    rows = sites.valid_index.numpy()
    cells = sites.batch_size * math.prod(sites.spatial_shape)
    dense = np.full(cells, sites.num_rows, dtype=np.int64)
    dense[_linear(sites.indices.numpy()[rows].astype(np.int64), sites.spatial_shape)] = rows
    return torch.from_numpy(dense)


def _check_subm_reuse(rulebook: RuleBook, sites: Sites, spec: LayerSpec) -> None:
    if not rulebook.subm:
        raise ValueError(f"indice_key '{spec.indice_key}' names a strided conv; SubM layers cannot reuse it")
    if rulebook.in_sites is not sites:
        raise ValueError(f"SubM layers sharing indice_key '{spec.indice_key}' see different sites")
    if (rulebook.kernel_size, rulebook.dilation) != (spec.kernel_size, spec.dilation):
        raise ValueError(f"SubM layers sharing indice_key '{spec.indice_key}' need the same kernel and dilation")


def build_rulebooks(
    indices: torch.Tensor | np.ndarray,
    spatial_shape: Sequence[int],
    batch_size: int,
    specs: Iterable[LayerSpec],
    *,
    capacities: Mapping[str, int] | None = None,
    dense: bool = True,
) -> dict[str, RuleBook]:
    """Rulebooks of a sequence of sparse convs (in forward order) for one batch, as an `indice_dict`.

    `indices` (N, 4) int [batch, z, y, x], padding rows with batch -1. `capacities` fixes the output row
    count of strided convs by indice_key (static shapes for export; more real sites than that is an
    error, never a silent drop). `dense` attaches the dense map of the final sites, used by `dense()`.
    """
    capacities = dict(capacities or {})
    sites = make_sites(indices, spatial_shape, batch_size)
    book: dict[str, RuleBook] = {}
    for position, spec in enumerate(specs):
        if spec.conv1x1:
            continue
        key = spec.indice_key
        if key is None:
            raise ValueError(f"sparse conv #{position} has no indice_key: the plain backend needs one per layer")
        if spec.inverse:
            forward = book.get(key)
            if forward is None or forward.subm:
                raise ValueError(f"inverse conv '{key}' has no strided conv with that indice_key before it")
            if forward.out_sites is not sites or forward.kernel_size != spec.kernel_size:
                raise ValueError(f"inverse conv '{key}' does not follow the sites or kernel of its strided conv")
            if forward.inverse_gather_index is None:
                book[key] = replace(forward, inverse_gather_index=_inverse_gather(forward))
            sites = forward.in_sites
        elif spec.subm:
            if any(k % 2 == 0 for k in spec.kernel_size):
                raise ValueError(f"SubM conv '{key}' needs odd kernel sizes, got {spec.kernel_size}")
            if key in book:
                _check_subm_reuse(book[key], sites, spec)
            else:
                book[key] = _subm_rulebook(sites, spec)
        else:
            if key in book:
                raise ValueError(f"indice_key '{key}' is used by two strided convs")
            book[key] = _strided_rulebook(sites, spec, capacities.pop(key, None))
            sites = book[key].out_sites
    if capacities:
        raise ValueError(f"capacities name no strided conv: {sorted(capacities)}")
    if dense:
        sites.dense_index = _dense_index(sites)
    return book


# ---- export: rulebooks as graph inputs -----------------------------------------------------------
def rulebook_tensors(indice_dict: Mapping[str, RuleBook]) -> dict[str, torch.Tensor]:
    """The tensors the forward pass reads from an indice_dict, by stable name (graph inputs for export)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, rulebook in indice_dict.items():
        tensors[f"{key}.gather"] = rulebook.gather_index
        if rulebook.inverse_gather_index is not None:
            tensors[f"{key}.inverse_gather"] = rulebook.inverse_gather_index
        for side, sites in (("in", rulebook.in_sites), ("out", rulebook.out_sites)):
            if sites.dense_index is not None and not any(t is sites.dense_index for t in tensors.values()):
                tensors[f"{key}.{side}_dense"] = sites.dense_index
    return tensors


def with_rulebook_tensors(indice_dict: Mapping[str, RuleBook], tensors: Mapping[str, torch.Tensor]) -> dict:
    """A copy of `indice_dict` whose tensors are replaced by `tensors` (names from `rulebook_tensors`).

    Sites shared between rulebooks stay shared, so an export wrapper can rebuild the dict from its inputs.
    """
    names = rulebook_tensors(indice_dict)
    by_id = {id(tensor): tensors[name] for name, tensor in names.items() if name in tensors}
    new_sites: dict[int, Sites] = {}

    def sites_copy(sites: Sites) -> Sites:
        if id(sites) not in new_sites:
            dense = sites.dense_index
            new_sites[id(sites)] = replace(
                sites, dense_index=by_id.get(id(dense), dense) if dense is not None else None
            )
        return new_sites[id(sites)]

    out = {}
    for key, rulebook in indice_dict.items():
        inverse = rulebook.inverse_gather_index
        out[key] = replace(
            rulebook,
            in_sites=sites_copy(rulebook.in_sites),
            out_sites=sites_copy(rulebook.out_sites),
            gather_index=by_id.get(id(rulebook.gather_index), rulebook.gather_index),
            inverse_gather_index=by_id.get(id(inverse), inverse) if inverse is not None else None,
        )
    return out


# ---- tensor ----------------------------------------------------------------------------------------
class SparseTensor:
    """The subset of spconv's `SparseConvTensor` the layers here use; rows may include padding."""

    def __init__(
        self,
        features: torch.Tensor,
        indices: torch.Tensor,
        spatial_shape: Sequence[int],
        batch_size: int,
        indice_dict: dict | None = None,
        *,
        valid_index: torch.Tensor | None = None,
        dense_index: torch.Tensor | None = None,
    ):
        if not torch.jit.is_tracing() and (features.dim() != 2 or indices.shape != (features.shape[0], 4)):
            raise ValueError(
                f"features (N, C) and indices (N, 4) disagree: {tuple(features.shape)}, {tuple(indices.shape)}"
            )
        self.features = features
        self.indices = indices
        self.spatial_shape = [int(s) for s in spatial_shape]
        self.batch_size = int(batch_size)
        self.indice_dict = {} if indice_dict is None else indice_dict
        self.valid_index = valid_index
        self.dense_index = dense_index

    @classmethod
    def from_sites(cls, features: torch.Tensor, sites: Sites, indice_dict: dict) -> SparseTensor:
        return cls(
            features,
            sites.indices,
            sites.spatial_shape,
            sites.batch_size,
            indice_dict,
            valid_index=sites.valid_index,
            dense_index=sites.dense_index,
        )

    def replace_feature(self, features: torch.Tensor) -> SparseTensor:
        """Same sites and rulebooks, new features (spconv's idiom for elementwise ops)."""
        return SparseTensor(
            features,
            self.indices,
            self.spatial_shape,
            self.batch_size,
            self.indice_dict,
            valid_index=self.valid_index,
            dense_index=self.dense_index,
        )

    def find_indice_pair(self, key: str | None) -> RuleBook | None:
        return None if key is None else self.indice_dict.get(key)

    def valid_mask(self) -> torch.Tensor:
        """(N,) bool: real rows (padding rows have batch index -1)."""
        return self.indices[:, 0] != PAD

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """(B, C, D, H, W) (or (B, D, H, W, C)), empty cells zero: spconv's `dense()`.

        With a precomputed dense map this is a gather; without one, a scatter of the real rows.
        """
        cells = self.batch_size * math.prod(self.spatial_shape)
        channels = self.features.shape[1]
        padded = torch.cat([self.features, self.features.new_zeros(1, channels)])
        if self.dense_index is not None:
            grid = padded.index_select(0, self.dense_index)
        else:
            grid = self._scatter_dense(cells)
        grid = grid.view(self.batch_size, *self.spatial_shape, channels)
        return grid.permute(0, 4, 1, 2, 3).contiguous() if channels_first else grid

    def _scatter_dense(self, cells: int) -> torch.Tensor:
        d, h, w = self.spatial_shape
        idx = self.indices.long()
        linear = ((idx[:, 0] * d + idx[:, 1]) * h + idx[:, 2]) * w + idx[:, 3]
        linear = torch.where(idx[:, 0] == PAD, torch.full_like(linear, cells), linear)
        target = self.features.new_zeros(cells + 1, self.features.shape[1])
        target = target.scatter(0, linear[:, None].expand_as(self.features), self.features)
        return target[:cells]


# ---- modules ---------------------------------------------------------------------------------------
class SparseModule(nn.Module):
    """Marker: SparseSequential hands these the whole sparse tensor (others get its features)."""

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name


def apply_to_features(module: nn.Module, x):
    """`x.replace_feature(module(x.features))`, except that training-mode BatchNorm sees real rows only.

    Works on spconv tensors too (they have no padding rows).
    """
    if not torch.jit.is_tracing() and x.indices.shape[0] == 0:
        return x
    if isinstance(x, SparseTensor) and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        rows = x.valid_index if x.valid_index is not None else torch.nonzero(x.valid_mask()).squeeze(1)
        if rows.shape[0] == 0:  # nothing real: no statistics to take (spconv skips empty tensors too)
            return x
        if rows.shape[0] != x.features.shape[0]:
            normed = module(x.features.index_select(0, rows))
            return x.replace_feature(x.features.index_copy(0, rows, normed))
    return x.replace_feature(module(x.features))


class SparseSequential(SparseModule):
    """spconv's SparseSequential: sparse modules get the tensor, other modules its features."""

    def __init__(self, *args: nn.Module, **kwargs: nn.Module):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for index, module in enumerate(args):
                self.add_module(str(index), module)
        for name, module in kwargs.items():
            if name in self._modules:
                raise ValueError(f"name {name} exists")
            self.add_module(name, module)

    def __getitem__(self, index: int) -> nn.Module:
        modules = list(self._modules.values())
        if not -len(modules) <= index < len(modules):
            raise IndexError(f"index {index} is out of range")
        return modules[index]

    def __len__(self) -> int:
        return len(self._modules)

    def add(self, module: nn.Module, name: str | None = None) -> None:
        name = str(len(self._modules)) if name is None else name
        if name in self._modules:
            raise KeyError("name exists")
        self.add_module(name, module)

    def forward(self, x):
        for module in self._modules.values():
            x = module(x) if isinstance(module, SparseModule) else apply_to_features(module, x)
        return x


class SparseConvolution(SparseModule):
    """Base of the sparse convs: spconv 2.x's attributes and KRSC weight; forward = gather + matmul."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        subm: bool = False,
        output_padding: int | Sequence[int] = 0,
        transposed: bool = False,
        inverse: bool = False,
        indice_key: str | None = None,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(name=name)
        if ndim != 3:
            raise ValueError(f"only 3-D sparse convolutions are implemented, got ndim={ndim}")
        if groups != 1:
            raise ValueError("grouped sparse convolutions are not supported (spconv neither)")
        if transposed or any(_triple(output_padding, "output_padding")):
            raise ValueError("transposed sparse convolutions are not implemented (inverse convolutions are)")
        self.ndim = ndim
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        self.padding = _triple(padding, "padding")
        self.dilation = _triple(dilation, "dilation")
        self.output_padding = (0, 0, 0)
        self.groups = groups
        self.subm = bool(subm)
        self.inverse = bool(inverse)
        self.transposed = False
        self.indice_key = indice_key
        if self.subm and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"SubM convolutions need odd kernel sizes, got {self.kernel_size}")
        if self.subm and self.stride != (1, 1, 1):
            raise ValueError(f"SubM convolutions keep their sites: stride must be 1, got {self.stride}")
        if self.inverse and indice_key is None:
            raise ValueError("an inverse convolution needs the indice_key of the strided conv it inverts")
        self.conv1x1 = math.prod(self.kernel_size) == 1 and (self.subm or math.prod(self.stride) == 1)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """spconv's initialisation: kaiming-uniform (a = sqrt(5)) over fan_in = in_channels x kernel volume."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if any(self.padding):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text + f", indice_key={self.indice_key!r}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        if not torch.jit.is_tracing() and x.features.shape[1] != self.in_channels:
            raise ValueError(f"sparse conv expects {self.in_channels} channels, got {x.features.shape[1]}")
        if self.conv1x1:
            out = x.features @ self.weight.reshape(self.weight.shape[-1], self.weight.shape[0])  # spconv's view
            return x.replace_feature(out if self.bias is None else out + self.bias)
        rulebook = x.indice_dict.get(self.indice_key) if self.indice_key is not None else None
        if rulebook is None:
            raise ValueError(
                f"no rulebook for indice_key {self.indice_key!r}: build them with common.sparse.build_rulebooks"
            )
        if self.inverse:
            gather, source, target = rulebook.inverse_gather_index, rulebook.out_sites, rulebook.in_sites
            if gather is None:
                raise ValueError(f"rulebook '{self.indice_key}' was built without its inverse")
        else:
            gather, source, target = rulebook.gather_index, rulebook.in_sites, rulebook.out_sites
        if not torch.jit.is_tracing() and (
            x.features.shape[0] != source.num_rows or tuple(x.spatial_shape) != source.spatial_shape
        ):
            raise ValueError(
                f"sparse conv '{self.indice_key}': input has {x.features.shape[0]} rows on {x.spatial_shape}, "
                f"its rulebook expects {source.num_rows} on {list(source.spatial_shape)}"
            )
        return SparseTensor.from_sites(self._gather_matmul(x.features, gather), target, x.indice_dict)

    def _gather_matmul(self, features: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
        """out[o] = sum_k in[gather[o, k]] @ W_k: one Gather, one MatMul (the dump row reads zeros)."""
        rows, offsets = gather.shape
        c_out, c_in = self.weight.shape[0], self.weight.shape[-1]  # the weight decides (pruning edits it)
        padded = torch.cat([features, features.new_zeros(1, c_in)])
        taken = padded.index_select(0, gather.reshape(-1)).reshape(rows, offsets * c_in)
        out = taken @ self.weight.permute(1, 2, 3, 4, 0).reshape(offsets * c_in, c_out)
        return out if self.bias is None else out + self.bias


class SubMConv3d(SparseConvolution):
    """Submanifold conv: output sites = input sites (stride 1, odd kernel centred on each site)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        indice_key: str | None = None,
        name: str | None = None,
    ):
        super().__init__(
            3,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            subm=True,
            indice_key=indice_key,
            name=name,
        )


class SparseConv3d(SparseConvolution):
    """Regular sparse conv: every output site any input reaches (nn.Conv3d's geometry)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        indice_key: str | None = None,
        name: str | None = None,
    ):
        super().__init__(
            3,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            indice_key=indice_key,
            name=name,
        )


class SparseInverseConv3d(SparseConvolution):
    """Inverse of the SparseConv3d with the same indice_key: back to its input sites, same kernel pairs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        indice_key: str,
        bias: bool = True,
        name: str | None = None,
    ):
        super().__init__(
            3, in_channels, out_channels, kernel_size, bias=bias, inverse=True, indice_key=indice_key, name=name
        )
