"""GFLOPs as the toolkit counts them, for any model: FlopCounterMode, plus what it cannot see.

`torch.utils.flop_counter.FlopCounterMode` counts 2 x MACs of every dense matmul, conv and attention op
(shared/DESIGN.md, "Measurement rules"). It cannot see spconv's kernels (their FLOPs would be missing) and it
would count the plain sparse backend's padded gathers (too many), so inside every sparse convolution its
count is replaced by 2 x active rulebook pairs x Cin/groups x Cout (`compress.sparse.active_pairs`).

A layer with weights whose forward shows FlopCounterMode nothing (a custom CUDA op, a third-party conv
whose kernel torch does not dispatch) is reported as uncounted, by name, never silently left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.layers import is_sparse_conv
from compress.sparse import active_pairs, sparse_flops

SPARSE_METHOD = "2 x active rulebook pairs (centre offset included) x Cin/groups x Cout, on the example batch"
ZERO_FLOP_KINDS = (nn.Embedding, nn.EmbeddingBag)  # lookups: weights but no multiplications, by definition


@dataclass
class FlopCount:
    """One counted forward pass: total FLOPs (2 x MACs) and what it is made of."""

    total: float
    layers: dict[str, float] = field(default_factory=dict)  # per conv / linear / sparse conv layer
    shapes: dict[str, list] = field(default_factory=dict)  # per dense layer and call: (input shape, output shape)
    sparse: dict[str, float] = field(default_factory=dict)  # per sparse conv layer
    sparse_pairs: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, str] = field(default_factory=dict)  # module name -> why its FLOPs are missing

    def report(self) -> dict[str, Any]:
        return {
            "counter": "torch.utils.flop_counter.FlopCounterMode (2 x MACs)",
            "sparse_convolutions": SPARSE_METHOD if self.sparse else None,
            "sparse_gflops": sum(self.sparse.values()) / 1e9,
            "uncounted": [{"module": name, "reason": why} for name, why in sorted(self.uncounted.items())],
        }


def _weighted(module: nn.Module) -> bool:
    """Has a weight matrix of its own (a layer that multiplies), not only norms' vectors or a bias."""
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def dense_layer_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> float:
    """FLOPs (2 x MACs) of one call of a conv or linear layer, from its observed input and output sizes."""
    if isinstance(module, nn.Linear):
        return 2.0 * (inputs[0].numel() // module.in_features) * module.in_features * module.out_features
    # A conv's MACs per output element are in/groups x kernel; a transposed conv's per input element.
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    positions = inputs[0].shape[2:] if transposed else output.shape[2:]
    macs = output.shape[0] * module.out_channels * module.in_channels // module.groups * math.prod(module.kernel_size)
    return 2.0 * macs * math.prod(positions)


def count_flops(model: nn.Module, run: Callable[[], Any], layer_types: tuple[type, ...] = ()) -> FlopCount:
    """Count one forward pass `run()` of `model` (in its current mode, without gradients where possible).

    Layers of `layer_types` (conv, linear) are also counted one by one from their observed sizes, with their
    input and output shapes (`layers`, `shapes`): a pruning graph scales these with the kept widths."""
    names = {m: name for name, m in model.named_modules()}
    sparse = {m for m in model.modules() if is_sparse_conv(m)}
    watched = [
        m
        for m in model.modules()
        if m in sparse or isinstance(m, layer_types) or (_weighted(m) and not isinstance(m, ZERO_FLOP_KINDS))
    ]
    result = FlopCount(total=0.0)
    seen_inside: dict[nn.Module, float] = {}
    entries: dict[nn.Module, list[float]] = {}
    ran: set[nn.Module] = set()
    counter: FlopCounterMode | None = None

    def before(module: nn.Module, _inputs: tuple) -> None:
        entries.setdefault(module, []).append(counter.get_total_flops())

    def after(module: nn.Module, inputs: tuple, output: Any) -> None:
        inside = counter.get_total_flops() - entries[module].pop()
        ran.add(module)
        seen_inside[module] = seen_inside.get(module, 0.0) + inside
        name = names[module]
        if module in sparse:
            pairs = active_pairs(module, inputs, output)
            if pairs is None:
                result.uncounted[name] = "sparse convolution whose rulebook and geometry are unknown"
                return
            flops = sparse_flops(module, pairs)
            result.sparse[name] = result.sparse.get(name, 0.0) + flops
            result.sparse_pairs[name] = result.sparse_pairs.get(name, 0) + pairs
            result.layers[name] = result.layers.get(name, 0.0) + flops
            return  # no dense shapes: latency tables time sparse convs with the rest of the model
        elif isinstance(module, layer_types):
            flops = dense_layer_flops(module, inputs, output)
            shapes = (list(inputs[0].shape), list(output.shape))
        else:
            return
        result.layers[name] = result.layers.get(name, 0.0) + flops
        result.shapes.setdefault(name, []).append(shapes)

    def attempt(grad: bool) -> float:
        nonlocal counter
        entries.clear()
        seen_inside.clear()
        ran.clear()
        for table in (result.layers, result.shapes, result.sparse, result.sparse_pairs, result.uncounted):
            table.clear()
        counter = FlopCounterMode(display=False)
        handles = [m.register_forward_pre_hook(before) for m in watched]
        handles += [m.register_forward_hook(after) for m in watched]
        try:
            with torch.set_grad_enabled(grad), counter:
                run()
        finally:
            for h in handles:
                h.remove()
        return float(counter.get_total_flops())

    try:
        total = attempt(grad=False)
    except AssertionError as error:
        # torch's module tracker (inside FlopCounterMode) cannot hook a parameter passed straight into a
        # submodule under no_grad (learned queries fed to attention): count that model with gradients on.
        if "gradient function" not in str(error):
            raise
        total = attempt(grad=True)
    inside_sparse = sum(seen_inside.get(m, 0.0) for m in sparse if not _nested_in(m, sparse, names))
    result.total = total - inside_sparse + sum(result.sparse.values())
    for module in watched:
        if module in sparse or module not in ran:
            continue
        if seen_inside.get(module, 0.0) == 0.0 and not _has_counted_child(module, seen_inside):
            result.uncounted[names[module]] = f"{type(module).__name__}: FlopCounterMode sees no operation in it"
    return result


def _nested_in(module: nn.Module, sparse: set[nn.Module], names: dict[nn.Module, str]) -> bool:
    """A sparse conv inside another sparse conv (counted once, by the outer one)."""
    name = names[module]
    return any(other is not module and name.startswith(names[other] + ".") for other in sparse)


def _has_counted_child(module: nn.Module, seen_inside: dict[nn.Module, float]) -> bool:
    return any(seen_inside.get(child, 0.0) > 0 for child in module.modules() if child is not module)
