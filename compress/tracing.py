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
  torch-pruning recomputes index mappings in every `get_pruning_group`, so this one is installed for good
  when the module is imported (`install_reshape_mapping`), not only while tracing.
- Concat sizes: torch-pruning infers each input's channel count by walking back to the nearest layer, which
  answers C for a depth fold that hands the concat C x D channels (camera channels then get mapped onto LiDAR
  ones). While tracing, the real sizes of every channel concat are recorded (`concat_sizes_recorded`) and given
  to torch-pruning's concat mapping, which keeps them for the graph's life.
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


def update_reshape_index_mapping(graph: Any, reshape_node: Any) -> None:
    """torch-pruning's reshape index mapping, decided from the reshape's saved input shape."""
    shape = _saved_input_shape(reshape_node)
    if shape is None:
        return _ORIGINAL_RESHAPE(graph, reshape_node)
    in_channels, out_channels = _neighbour_channels(graph, reshape_node)
    if in_channels is None or out_channels is None:
        return None
    stride = fold_stride(shape, in_channels, out_channels)
    if stride is None:
        return None
    folding = out_channels > in_channels
    ends = reshape_node.inputs if folding else reshape_node.outputs
    for end in ends:
        for dep in reshape_node.dependencies:
            if dep.target == end:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=stride, reverse=folding)
        for dep in end.dependencies:
            if dep.target == reshape_node:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=stride, reverse=not folding)
    return None


_ORIGINAL_RESHAPE = index_mapping.update_reshape_index_mapping


def _expose_sparse_grad_fn(module: nn.Module, inputs: tuple, output: Any) -> None:
    """Give a sparse conv's output the `grad_fn` torch-pruning's hook reads (its features' node)."""
    features = getattr(output, "features", None)
    if features is not None and not hasattr(output, "grad_fn"):
        output.grad_fn = features.grad_fn


_CONCAT_SIZES: dict[Any, list[int]] = {}  # grad_fn of a channel concat -> its inputs' channel counts
_CONCATS = (torch.cat, torch.concat, torch.concatenate)


class _RecordConcats(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONCATS and isinstance(out, torch.Tensor) and out.grad_fn is not None and out.dim() > 1:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int) and dim % out.dim() == 1:
                _CONCAT_SIZES[out.grad_fn] = [
                    int(t.shape[1]) for t in tensors if t.grad_fn is not None or t.requires_grad
                ]
        return out


@contextmanager
def concat_sizes_recorded() -> Iterator[None]:
    """Record the true input sizes of every channel concat run inside (for torch-pruning's graph build)."""
    try:
        with _RecordConcats():
            yield
    finally:
        _CONCAT_SIZES.clear()


def update_concat_index_mapping(graph: Any, cat_node: Any) -> None:
    """torch-pruning's concat mapping, from the recorded input sizes where the trace saw them."""
    sizes = _CONCAT_SIZES.get(cat_node.grad_fn)
    if sizes is not None and cat_node.module.concat_sizes is None and len(sizes) == len(cat_node.inputs):
        cat_node.module.concat_sizes = sizes
    return _ORIGINAL_CONCAT(graph, cat_node)


_ORIGINAL_CONCAT = index_mapping.update_concat_index_mapping


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
