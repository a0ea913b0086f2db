"""What torch-pruning 1.6.1 needs around its tracer to see sparse convolutions and fold reshapes right.

Kept in one place (shared/notes/torch-pruning.md asks for it), each piece with its reason:
- A sparse conv returns a sparse tensor, not a `torch.Tensor`: torch-pruning's forward hook reads
  `outputs.grad_fn`. A hook registered before torch-pruning's gives each such output a `grad_fn`
  attribute (its features' node), so the layer becomes a graph node like any conv.
- The reshape index mapping: 1.6.1 reads `_saved_self_sizes`, which torch >= 2.1 names
  `_saved_self_sym_sizes`, so it falls back to a path that maps any reshape whose neighbours' channel counts
  differ, without looking at the shape, and skips every reshape once a Linear sees a 3-D input (a query
  head). Here the mapping is decided from the saved input shape: a reshape that folds the dims right after
  the channel dim into it, (N, C, D, ...) -> (N, C * D, ...) as `.dense().view(N, C * D, H, W)` does after
  a sparse encoder, maps channel c to c * D ... c * D + D - 1; its inverse maps back; anything else gets
  no mapping (the channel-coupling checks of `ChannelGraph` and zero-then-prune then decide).
  While tracing, every reshape's input and output shapes are recorded, so the fold is decided from both (a
  neighbour's channel count that happens to equal a spatial size is not taken for a fold: Swin's attention
  logits (windows, heads, N, N) once coupled heads to 16 x as many qkv channels and group building never ended).
  A channels-last fold, (..., D, C) -> (..., D * C) as Swin's patch merging (timm: reshape, permute, flatten)
  builds its 4C features, maps channel c to c, C + c, ..., (D - 1) C + c (`InterleaveIndexMapping`).
  torch-pruning recomputes index mappings in every `get_pruning_group`, so this one is installed for good
  when the module is imported (`install_reshape_mapping`), not only while tracing.
- Concat sizes: torch-pruning infers each input's channel count by walking back to the nearest layer, which
  answers C for a depth fold that hands the concat C x D channels (camera channels then get mapped onto LiDAR
  ones). While tracing, the real sizes of every channel concat are recorded (`trace_shapes_recorded`) and given
  to torch-pruning's concat mapping, which keeps them for the graph's life.
- The LayerNorm pruner keeps the wrong channels: it calls `keep_idxs.sort()` on a tensor (a sorted copy, thrown
  away) and keeps the set's iteration order, which is not sorted once a LayerNorm loses most of its channels
  (measured: Swin's last stage cut to 32 of 256 channels had its norms' weights permuted, 0.17 off the zeroed
  model). `install_layer_norm_pruner` replaces it with one that keeps the channels in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.pruner import function as tp_function

from common.layers import is_sparse_conv


def _saved_input_shape(node: Any) -> list[int] | None:
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        sizes = getattr(node.grad_fn, "_saved_self_sizes", None)
    try:
        return None if sizes is None else [int(s) for s in sizes]
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _neighbour_channels(graph: Any, reshape_node: Any) -> tuple[int | None, int | None]:
    """(channels entering the reshape, channels the layers after it expect), as torch-pruning infers them."""
    # Asked of the reshape itself, torch-pruning subtracts the siblings when the next op is a concat (the
    # depth fold feeding `cat([camera, lidar])`); asked of the concat it would answer the fuser's whole width.
    out_channels = shape_infer.infer_in_channels_recursively(graph, reshape_node, [0])
    in_channels = None
    for n in reshape_node.inputs:
        in_channels = shape_infer.infer_out_channels_recursively(graph, n, [0])
        if in_channels is not None:
            break
    return in_channels, out_channels


def fold_stride(shape: list[int], in_channels: int, out_channels: int) -> int | None:
    """How many consecutive channels one input channel becomes (or, unfolding, one output channel came
    from) when a reshape folds the dims right after the channel dim; None if this reshape is not one."""
    if len(shape) < 2 or shape[1] != in_channels or in_channels == out_channels:
        return None
    if out_channels > in_channels:  # fold: (N, C, D1, D2, ...) -> (N, C * D1 * ... * Dk, ...)
        for k in range(3, len(shape) + 1):
            if in_channels * math.prod(shape[2:k]) == out_channels:
                return out_channels // in_channels
        return None
    return in_channels // out_channels if in_channels % out_channels == 0 else None  # unfold


def _dim1_fold(narrow: list[int], wide: list[int], channels: int | None) -> int | None:
    """D when `wide` is `narrow` with the dims after its dim-1 channel folded into it, (N, C, D1, ...) ->
    (N, C * D, ...), and `channels` (the layers' count) is that channel dim; else None."""
    if channels is None or len(narrow) < 3 or narrow[1] != channels:
        return None
    for k in range(3, len(narrow) + 1):
        d = math.prod(narrow[2:k])
        if d > 1 and wide == [narrow[0], channels * d, *narrow[k:]]:
            return d
    return None


def recorded_fold(
    in_shape: list[int], out_shape: list[int], in_channels: int | None, out_channels: int | None
) -> tuple[str, int] | None:
    """How a reshape with these recorded shapes moves channels, as (kind, D), or None when it does not fold:
    "first": (N, C, D1, ...) -> (N, C * D, ...) folds the dims after a dim-1 channel into it (a sparse encoder's
    depth, a flatten for a Linear); "unfold": the same backwards; "last": (..., D1, ..., C) -> (..., D * C) folds
    trailing positions into a last-dim channel (Swin's patch merging). The channel count must be what the
    producing layers give (fold) or the consuming layers take (unfold). Where two readings fit (a spatial size
    equal to the channel count), None: the coupling checks and zero-then-prune decide."""
    found = []
    if (d := _dim1_fold(in_shape, out_shape, in_channels)) is not None:
        found.append(("first", d))
    if (d := _dim1_fold(out_shape, in_shape, out_channels)) is not None:
        found.append(("unfold", d))
    if in_channels is not None and len(in_shape) >= 2 and in_shape[-1] == in_channels:
        for j in range(len(in_shape) - 1):
            d = math.prod(in_shape[j:-1])
            if d > 1 and out_shape == [*in_shape[:j], in_channels * d]:
                found.append(("last", d))
                break
    return found[0] if len(found) == 1 else None


class InterleaveIndexMapping:
    """Channels-last fold (..., D, C) -> (..., D * C): channel c becomes c, C + c, ..., (D - 1) * C + c; in
    reverse, folded channel i came from channel i % C. (torch-pruning's flatten mapping assumes c * D ...)"""

    def __init__(self, channels: int, copies: int, reverse: bool = False):
        self.channels, self.copies, self.reverse = channels, copies, reverse

    def __call__(self, idxs: list) -> list:
        hybrid = index_mapping._helpers._HybridIndex
        if self.reverse:
            return list(dict.fromkeys(hybrid(idx=i.idx % self.channels, root_idx=i.root_idx) for i in idxs))
        return [hybrid(idx=k * self.channels + i.idx, root_idx=i.root_idx) for i in idxs for k in range(self.copies)]


def _set_mapping(reshape_node: Any, ends: list, forward: Any, backward: Any) -> None:
    """forward: from an end into the reshape; backward: from the reshape to that end."""
    for end in ends:
        for dep in reshape_node.dependencies:
            if dep.target == end:
                dep.index_mapping[0] = backward
        for dep in end.dependencies:
            if dep.target == reshape_node:
                dep.index_mapping[0] = forward


def update_reshape_index_mapping(graph: Any, reshape_node: Any) -> None:
    """torch-pruning's reshape index mapping, decided from the reshape's recorded input and output shapes
    (or, for a graph traced without them, from its saved input shape and the neighbours' channel counts)."""
    recorded = _RESHAPE_SHAPES.get(reshape_node.grad_fn)
    if recorded is not None:
        reshape_node.module.altermoma_shapes = recorded  # torch-pruning rebuilds mappings for every group
    recorded = getattr(reshape_node.module, "altermoma_shapes", None)
    if recorded is None and (shape := _saved_input_shape(reshape_node)) is None:
        return _ORIGINAL_RESHAPE(graph, reshape_node)
    in_channels, out_channels = _neighbour_channels(graph, reshape_node)
    if recorded is not None:
        fold = recorded_fold(recorded[0], recorded[1], in_channels, out_channels)
    elif in_channels is None or out_channels is None:
        fold = None
    else:
        stride = fold_stride(shape, in_channels, out_channels)
        fold = None if stride is None else ("first" if out_channels > in_channels else "unfold", stride)
    if fold is None:
        return None
    kind, d = fold
    if kind == "last":
        channels = recorded[0][-1]
        mapping = InterleaveIndexMapping(channels, d, reverse=False), InterleaveIndexMapping(channels, d, True)
        _set_mapping(reshape_node, reshape_node.inputs, *mapping)
        return None
    folding = kind == "first"
    ends = reshape_node.inputs if folding else reshape_node.outputs
    flatten = index_mapping._FlattenIndexMapping
    _set_mapping(reshape_node, ends, flatten(stride=d, reverse=not folding), flatten(stride=d, reverse=folding))
    return None


_ORIGINAL_RESHAPE = index_mapping.update_reshape_index_mapping


def _expose_sparse_grad_fn(module: nn.Module, inputs: tuple, output: Any) -> None:
    """Give a sparse conv's output the `grad_fn` torch-pruning's hook reads (its features' node)."""
    features = getattr(output, "features", None)
    if features is not None and not hasattr(output, "grad_fn"):
        output.grad_fn = features.grad_fn


_CONCAT_SIZES: dict[Any, list[int]] = {}  # grad_fn of a channel concat -> its inputs' channel counts
_RESHAPE_SHAPES: dict[Any, tuple[list[int], list[int]]] = {}  # grad_fn of a reshape -> (input, output) shapes
_CONCATS = (torch.cat, torch.concat, torch.concatenate)


def _is_reshape(grad_fn: Any) -> bool:
    name = grad_fn.name().lower()  # as torch-pruning classifies its RESHAPE nodes
    return "view" in name or "reshape" in name


class _RecordShapes(TorchFunctionMode):
    """Records channel concats' input sizes and reshapes' input and output shapes while torch-pruning traces."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return out
        source = args[0] if args else None
        if func not in _CONCATS and isinstance(source, torch.Tensor) and _is_reshape(out.grad_fn):
            _RESHAPE_SHAPES.setdefault(out.grad_fn, ([int(s) for s in source.shape], [int(s) for s in out.shape]))
        elif func in _CONCATS and out.dim() > 1:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int) and dim % out.dim() == 1:
                _CONCAT_SIZES[out.grad_fn] = [
                    int(t.shape[1]) for t in tensors if t.grad_fn is not None or t.requires_grad
                ]
        return out


@contextmanager
def trace_shapes_recorded() -> Iterator[None]:
    """Record the true input sizes of every channel concat and the input and output shapes of every reshape run
    inside (for torch-pruning's graph build)."""
    try:
        with _RecordShapes():
            yield
    finally:
        _CONCAT_SIZES.clear()
        _RESHAPE_SHAPES.clear()


def update_concat_index_mapping(graph: Any, cat_node: Any) -> None:
    """torch-pruning's concat mapping, from the recorded input sizes where the trace saw them."""
    sizes = _CONCAT_SIZES.get(cat_node.grad_fn)
    if sizes is not None and cat_node.module.concat_sizes is None and len(sizes) == len(cat_node.inputs):
        cat_node.module.concat_sizes = sizes
    return _ORIGINAL_CONCAT(graph, cat_node)


_ORIGINAL_CONCAT = index_mapping.update_concat_index_mapping


def prune_layer_norm(self: Any, layer: nn.LayerNorm, idxs: Any) -> nn.LayerNorm:
    """torch-pruning 1.6.1's `LayernormPruner.prune_out_channels` with its kept channels in ascending order."""
    dim = self.pruning_dim
    if len(layer.normalized_shape) < -dim:
        return layer
    removed = {int(i) for i in idxs}
    keep = torch.tensor([i for i in range(layer.normalized_shape[dim]) if i not in removed], dtype=torch.long)
    if layer.elementwise_affine:
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, dim)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, dim)
    shape = list(layer.normalized_shape)
    shape[dim] = len(keep)
    layer.normalized_shape = tuple(shape)
    return layer


def install_layer_norm_pruner() -> None:
    """Make torch-pruning's LayerNorm pruner (class-wide: its registry's instance too) keep channels in order."""
    pruner = tp_function.LayernormPruner
    pruner.prune_out_channels = prune_layer_norm
    pruner.prune_in_channels = prune_layer_norm
    # torch-pruning tells a LayerNorm's handler by equality with these module-level bound methods (its
    # importances do): bind them anew, or every LayerNorm would look like an unknown layer to them.
    box = tp_function.PrunerBox[tp_function.ops.OPTYPE.LN]
    tp_function.prune_layernorm_out_channels = box.prune_out_channels
    tp_function.prune_layernorm_in_channels = box.prune_in_channels


def install_reshape_mapping() -> None:
    """Make torch-pruning use our reshape and concat mappings (idempotent)."""
    index_mapping.update_reshape_index_mapping = update_reshape_index_mapping
    index_mapping.update_concat_index_mapping = update_concat_index_mapping


@contextmanager
def sparse_outputs_visible(model: nn.Module) -> Iterator[None]:
    """While torch-pruning traces `model`, sparse conv outputs carry the `grad_fn` its hook reads.

    Enter this before `build_dependency` so these hooks run before torch-pruning's own."""
    hooks = [m.register_forward_hook(_expose_sparse_grad_fn) for m in model.modules() if is_sparse_conv(m)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


install_reshape_mapping()
install_layer_norm_pruner()
