"""Structured (channel) pruning through torch-pruning's dependency graph, with our own selection loop.

torch-pruning tells us which layers are coupled (a conv's output channels, its BatchNorm, the next
layers' input channels, through residual adds and concats); everything else is ours, because its
built-in importances and global pruner have known defects (see shared/notes/torch-pruning.md):
- channel scores from signed saliencies summed over the whole group, at root indices;
- FLOPs predicted analytically per layer from the kept widths, so a bisection over one global
  threshold can hit a GFLOPs target without re-running the model;
- a per-group cap and widths rounded to `round_to`, then physical removal group by group.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from common.layers import is_sparse_conv, layer_channels, weight_dims
from common.task import Task
from compress.flops import FlopCount, count_flops
from compress.partition import Partition
from compress.sparse import sparse_pruners, sparse_unsupported_reason
from compress.tracing import sparse_outputs_visible, trace_shapes_recorded

LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)  # dense layers that mix channels; with sparse convolutions (`is_layer`) the roots of channel groups
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
TRANSPOSED = nn.modules.conv._ConvTransposeNd


CUSTOM_FUNCTION = re.compile(r"\w+Backward")  # a Python autograd.Function's node; torch's own end in a digit


class PruningError(ValueError):
    """A pruning request that cannot be met."""


@dataclass
class GroupItem:
    layer: str  # module name (a parameter's name for kind "parameter")
    kind: str  # "out" or "in"; for a group's extras "attention" (an MHA embedding) or "parameter"
    idxs: torch.Tensor  # channel indices in the layer's own coordinates
    root_idxs: torch.Tensor  # the root channel each of them belongs to
    dim: int | None = None  # a loose parameter's channel dim


@dataclass
class ChannelGroup:
    """Root channels that are removed together, the layers they touch, and (for a group that feeds
    `nn.MultiheadAttention`'s embedding) the attention head each root channel sits in."""

    root: str
    part: str
    channels: int
    items: list[GroupItem]
    heads: torch.Tensor | None = None  # per root channel, its head; None: no attention in the group
    extras: list[GroupItem] = field(default_factory=list)  # attention embeddings, loose parameters (zeroed too)

    @property
    def num_heads(self) -> int:
        return 1 if self.heads is None else int(self.heads.max()) + 1

    def step(self, round_to: int) -> int:
        """Widths move in steps of `round_to` (1 for groups narrower than it); an attention group's steps also
        keep every head equally wide."""
        step = round_to if self.channels >= round_to else 1
        if self.heads is None:
            return step
        step = math.lcm(step, self.num_heads)
        return step if step <= self.channels else self.num_heads

    def removal_order(self, score: torch.Tensor) -> torch.Tensor:
        """Root channels in the order they are removed: lowest score first (ties by position); in an attention
        group the heads take turns, so every prefix of whole rounds removes as many channels from each head."""
        if self.heads is None:
            return torch.argsort(score, stable=True)
        per_head = [
            members[torch.argsort(score[members], stable=True)]
            for members in (torch.nonzero(self.heads == h).flatten() for h in range(self.num_heads))
        ]
        return torch.stack(per_head, dim=1).flatten()

    def choose(self, score: torch.Tensor, count: int) -> torch.Tensor:
        """Bool mask of the `count` root channels removed first."""
        mask = torch.zeros(self.channels, dtype=torch.bool)
        mask[self.removal_order(score)[:count]] = True
        return mask


def is_layer(module: nn.Module) -> bool:
    """A layer that mixes channels (dense conv, linear, or spconv-style sparse conv): a group root, counted."""
    return isinstance(module, LAYERS) or is_sparse_conv(module)


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every group holds one input channel: it prunes together with its producer."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def unprunable_reason(module: nn.Module) -> str | None:
    """Why torch-pruning cannot remove single channels of this layer (None: it can)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module):
        return f"grouped convolution (groups={module.groups})"
    if isinstance(module, nn.GroupNorm) and module.num_groups not in (1, module.num_channels):
        return f"GroupNorm with {module.num_groups} groups"
    if is_sparse_conv(module):
        return sparse_unsupported_reason(module)
    return None


def _signed_sum(
    module: nn.Module, name: str, kind: str, idxs: torch.Tensor, saliency: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Sum of one layer's signed saliencies belonging to each channel in `idxs` (one small rule per layer kind)."""
    weight = saliency.get(f"{name}.weight")
    bias = saliency.get(f"{name}.bias")
    if weight is None:
        return torch.zeros(len(idxs))
    if isinstance(module, NORMS):
        total = weight[idxs]
        return total + bias[idxs] if bias is not None else total
    # Output channels sit on dim 0 of conv/linear weights, on dim 1 of transposed-conv weights; sparse convs
    # keep inputs last. A depthwise conv's items are all "out" (torch-pruning prunes its in and out as one).
    dim = weight_dims(module)[0 if kind == "out" else 1]
    per_channel = weight.transpose(0, dim).flatten(1).sum(1) if weight.dim() > 1 else weight
    total = per_channel[idxs]
    if kind == "out" and bias is not None:
        total = total + bias[idxs]
    return total


def global_ranks(scores: list[torch.Tensor], tiebreak: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each channel's position (0 = pruned first) in one global order: score, then tie-break, then position."""
    flat = torch.cat([s.double() for s in scores])
    order = torch.arange(len(flat))
    if tiebreak is not None:
        order = torch.argsort(torch.cat([t.double() for t in tiebreak]), stable=True)
    order = order[torch.argsort(flat[order], stable=True)]
    ranks = torch.empty(len(flat), dtype=torch.float64)
    ranks[order] = torch.arange(len(flat), dtype=torch.float64)
    return list(torch.split(ranks, [len(s) for s in scores]))


def min_kept(channels: int, round_to: int, max_group_ratio: float) -> int:
    """The fewest channels a group may keep: the per-group cap rounded up to whole `round_to` blocks (at
    least one), so a capped group keeps a multiple of `round_to` like every other (never above its width)."""
    floor = max(1, math.ceil(channels * (1.0 - max_group_ratio)))
    return min(channels, math.ceil(floor / round_to) * round_to) if channels >= round_to else floor


def channel_count(module: nn.Module, kind: str) -> int:
    """How many output ("out") or input ("in") channels a layer has; a norm's features either way."""
    if isinstance(module, NORMS):
        return int(module.weight.shape[0]) if module.weight is not None else 0
    size = int(module.weight.shape[weight_dims(module)[0 if kind == "out" else 1]])
    return size * module.groups if kind == "in" and isinstance(module, nn.modules.conv._ConvNd) else size


def trace(model: nn.Module, task: Task, example_batch: Any) -> tuple[tp.DependencyGraph, Any]:
    """torch-pruning's dependency graph of `model` on the example batch, and the outputs it traced."""
    args, kwargs = task.arguments(example_batch)
    outputs: list[Any] = []

    def forward(m: nn.Module, _inputs: Any) -> Any:
        outputs.append(m(*args, **kwargs))
        return outputs[-1]

    was_training = model.training
    try:
        with (
            task.tracing(model),
            sparse_outputs_visible(model),
            trace_shapes_recorded(),
            torch.enable_grad(),
            warnings.catch_warnings(),
        ):
            # loose parameters (learned queries) are coupled or reported by `ChannelGraph.left_whole`
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=(args, kwargs), forward_fn=forward, customized_pruners=sparse_pruners(model)
            )
    except (RuntimeError, ValueError, ZeroDivisionError, IndexError, KeyError) as error:
        if not outputs:
            raise  # the model itself failed on the example batch: the user's error, with its traceback
        message = str(error).splitlines()[0] if str(error) else ""
        raise PruningError(f"torch-pruning could not trace the model: {type(error).__name__}: {message}") from error
    finally:
        model.train(was_training)  # build_dependency leaves the model in eval mode
    return dg, outputs[-1]


def output_layers(dg: tp.DependencyGraph, outputs: Any, names: dict[nn.Module, str]) -> set[str]:
    """Names of the channel-mixing layers whose output reaches a model output without passing another.

    Walks the traced graph forward from each layer through everything that keeps channels (norms,
    activations, adds, concats, depthwise convs, gathers); reaching a model output means the layer's
    channels are output channels (class scores, box parameters), which must never be pruned.
    """
    roots = {t.grad_fn for t in tp.utils.flatten_as_list(outputs) if isinstance(t, torch.Tensor)}
    roots.discard(None)
    nodes = list(dg.module2node.values())
    terminal = {node for node in nodes if not node.outputs or node.grad_fn in roots}
    protected = set()
    for node in nodes:
        if not is_layer(node.module) or is_depthwise(node.module):
            continue
        stack, seen = [node], {node}
        while stack:
            current = stack.pop()
            if current in terminal:
                protected.add(names[node.module])
                break
            for nxt in current.outputs:
                mixes = is_layer(nxt.module) and not is_depthwise(nxt.module)
                if nxt not in seen and not mixes:
                    seen.add(nxt)
                    stack.append(nxt)
    return protected


def named_layers(model: nn.Module, names: Sequence[str]) -> set[str]:
    """The channel-mixing layers a task protects by name (a layer, or every layer under a module prefix)."""
    layers = [name for name, m in model.named_modules() if is_layer(m)]
    found = set()
    for wanted in names:
        prefix = wanted.rstrip(".")
        matches = [n for n in layers if n == prefix or n.startswith(prefix + ".")]
        if not matches:
            raise PruningError(f"protected module {wanted!r} is not a conv or linear layer, nor contains one")
        found.update(matches)
    return found


def protected_layers(model: nn.Module, task: Task, example_batch: Any) -> set[str]:
    """Output layers found from the graph, plus the task's own protected modules."""
    dg, outputs = trace(model, task, example_batch)
    names = {module: name for name, module in model.named_modules()}
    return output_layers(dg, outputs, names) | named_layers(model, task.protected)


def _torch_pruning_kinds() -> tuple[type, ...]:
    """Module classes torch-pruning has a pruner for (MultiheadAttention, PReLU, Embedding, LSTM, ...)."""
    kinds = []
    for optype in tp.dependency.graph.DependencyGraph().REGISTERED_PRUNERS:
        try:
            cls = tp.ops.type2class(optype)
        except (KeyError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            kinds.append(cls)
    return tuple(kinds)


class ChannelGraph:
    """The prunable channel groups of a model and the FLOPs of every layer as a function of widths.

    Built from the model and its task alone. Output layers are protected automatically: a layer whose
    output reaches a model output without passing another channel-mixing layer (a head's last conv)
    keeps every channel, found from the traced graph, not from names. The task's `protected` names
    add more. Groups torch-pruning cannot cut correctly (a grouped, non-depthwise conv; a GroupNorm
    with several groups) are left whole and listed in `unprunable`.
    """

    def __init__(self, model: nn.Module, task: Task, example_batch: Any):
        self.model = model
        self.names = {module: name for name, module in model.named_modules()}
        self.partition = Partition.of(model, task.partition)
        self.dg, outputs = trace(model, task, example_batch)
        self.protected = output_layers(self.dg, outputs, self.names) | named_layers(model, task.protected)
        del outputs
        self.groups: list[ChannelGroup] = []
        self._covered: list[set[str]] = []  # per group, the parameter names its pruning changes
        self._reported: set[str] = set()  # parameters of groups reported in `unprunable`
        self.unprunable: list[dict[str, str]] = []
        self._handlers = []
        ignored = [m for m in model.modules() if self.names.get(m) in self.protected]
        modules = dict(model.named_modules())
        self.task, self.example_batch = task, example_batch
        self._param_names = {p: n for n, p in model.named_parameters()}
        opaque = self._opaque_parameters()
        for group in self._all_groups(ignored):
            root_module = group[0].dep.target.module
            root = self.names[root_module]
            reasons = [
                f"{self.names[item.dep.target.module]}: {reason}"
                for item in group
                if (reason := unprunable_reason(item.dep.target.module)) is not None
            ]
            if reasons:
                self.unprunable.append({"root": root, "reason": "; ".join(dict.fromkeys(reasons))})
                continue
            items, extras = [], {}
            for item in group:
                module = item.dep.target.module
                idxs, root_idxs = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
                if is_layer(module) or isinstance(module, NORMS):
                    kind = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                    items.append(GroupItem(self.names[module], kind, idxs, root_idxs))
                elif isinstance(module, nn.MultiheadAttention):
                    extras[self.names[module]] = GroupItem(self.names[module], "attention", idxs, root_idxs)
                elif isinstance(module, nn.Parameter) and (name := self._param_names.get(module)) is not None:
                    dim = self.dg.module2node[module].pruning_dim if module in self.dg.module2node else -1
                    extras[name] = GroupItem(name, "parameter", idxs, root_idxs, dim)
            heads, reason = self._attention_heads(
                [e for e in extras.values() if e.kind == "attention"], len(group[0].idxs), modules
            )
            if reason is not None:
                self.unprunable.append({"root": root, "reason": reason})
                continue
            outside = [i for i in items if len(i.idxs) and int(i.idxs.max()) >= channel_count(modules[i.layer], i.kind)]
            if outside:
                bad = outside[0]
                reason = (
                    f"torch-pruning maps its channels outside {bad.layer}'s {channel_count(modules[bad.layer], bad.kind)} "
                    f"{'output' if bad.kind == 'out' else 'input'} channels (a reshape between layers?)"
                )
                self.unprunable.append({"root": root, "reason": reason})
                continue
            touched = self._touched_parameters(group)
            if opaque_used := sorted(touched & set(opaque)):
                name = opaque_used[0]
                reason = f"couples {name}, which feeds {opaque[name]} (an op no pruner knows)"
                self.unprunable.append({"root": root, "reason": reason})
                self._reported.update(touched - set(opaque))  # named with their group in `unprunable`
                continue
            part = self.partition.part_of(root) or "fusion"
            self.groups.append(ChannelGroup(root, part, len(group[0].idxs), items, heads, list(extras.values())))
            self._covered.append(touched)
            self._handlers.append((root_module, group[0].dep.handler))
        self._drop_overlapping_groups()
        self.layer_flops, self.rest_flops = self._measure_flops(*task.arguments(example_batch))

    @staticmethod
    def _attention_heads(
        attentions: list[GroupItem], channels: int, modules: dict[str, nn.Module]
    ) -> tuple[torch.Tensor | None, str | None]:
        """(per root channel, the attention head it sits in; or why the group must stay whole).

        `nn.MultiheadAttention` ties its embedding to the q/k/v widths: removing embedding channel c removes
        q, k and v channel c of head c // head_dim. Pruning stays exact when every head loses as many channels
        (and the softmax scale is restored, `prune`), so selection keeps heads equally wide."""
        if not attentions:
            return None, None
        combined = torch.zeros(channels, dtype=torch.long)
        for item in attentions:
            mha = modules[item.layer]
            if not mha._qkv_same_embed_dim:
                return None, f"{item.layer}: MultiheadAttention with its own key/value widths (kdim/vdim)"
            head = torch.full((channels,), -1, dtype=torch.long)
            head[item.root_idxs] = item.idxs // (mha.embed_dim // mha.num_heads)
            if bool((head < 0).any()):
                return None, f"only part of its channels reach {item.layer}'s attention heads"
            combined = combined * mha.num_heads + head
        heads = torch.unique(combined, return_inverse=True)[1]
        sizes = torch.bincount(heads)
        if bool((sizes != sizes[0]).any()):
            return None, "its channels fall unevenly into attention heads"
        return heads, None

    def _opaque_parameters(self) -> dict[str, str]:
        """Loose parameters that feed an op torch-pruning cannot read (a custom autograd Function, e.g. a
        third-party CUDA kernel): parameter name -> op. torch-pruning would cut their last dim as if the op
        were element-wise; the groups touching them are left whole instead."""
        found = {}
        for key, node in self.dg.module2node.items():
            if not isinstance(key, nn.Parameter) or key not in self._param_names:
                continue
            for consumer in node.outputs:
                op = getattr(consumer.module, "_grad_fn", None)
                if isinstance(op, str) and CUSTOM_FUNCTION.fullmatch(op):
                    found[self._param_names[key]] = op
        return found

    def _touched_parameters(self, group) -> set[str]:
        """Names of every parameter a torch-pruning group changes: its layers' own, and loose parameters
        (learned queries, embeddings) torch-pruning couples in as unwrapped parameters."""
        touched = set()
        for item in group:
            target = item.dep.target.module
            if isinstance(target, nn.Parameter):
                if target in self._param_names:
                    touched.add(self._param_names[target])
            elif target in self.names:
                # torch-pruning's own pruners for composite modules (MultiheadAttention's out_proj) cut children too
                recurse = not (is_layer(target) or isinstance(target, NORMS))
                prefix = self.names[target]
                params = target.named_parameters(recurse=recurse)
                touched.update(f"{prefix}.{n}" if prefix else n for n, _ in params)
        return touched

    def left_whole(self) -> dict[str, Any]:
        """Every parameter no pruning here can change, by module, with the reason and the parameter share.

        Protected layers and unprunable groups are reported on their own; this names the rest: layer kinds
        no pruner knows (a custom op, a third-party conv), loose parameters coupled to no group, layers that
        never ran on the example batch. Nothing with parameters is left out of a report silently."""
        covered = set().union(self._reported, *self._covered)
        reported = set(self.protected) | {u["root"] for u in self.unprunable}
        total = sum(p.numel() for p in self.model.parameters())
        entries, count = [], 0
        for name, module in self.model.named_modules():
            own = [(f"{name}.{n}" if name else n, p) for n, p in module.named_parameters(recurse=False)]
            loose = [(n, p) for n, p in own if n not in covered]
            if not loose or name in reported:
                continue
            known = is_layer(module) or isinstance(module, NORMS)
            if known and module in self.dg.module2node:
                continue  # a known layer coupled only to protected or unprunable channels: reported there
            if known:
                reason = "never ran on the example batch"
            elif isinstance(module, _torch_pruning_kinds()):
                reason = f"{type(module).__name__}: coupled to no prunable group"
            else:
                reason = f"{type(module).__name__}: no pruner knows this layer kind (left whole)"
            params = sum(p.numel() for _, p in loose)
            count += params
            entries.append(
                {
                    "module": name or "(model)",
                    "parameters": [n for n, _ in loose],
                    "params": params,
                    "share": params / total if total else 0.0,
                    "reason": reason,
                }
            )
        return {"modules": entries, "params": count, "share": count / total if total else 0.0}

    def _all_groups(self, ignored: list[nn.Module]):
        """torch-pruning's `get_all_groups`, one root at a time, so that a root whose group torch-pruning
        cannot build (an index mapping it gets wrong) is left whole and reported instead of stopping
        everything. Same order and the same rules otherwise."""
        ignored = ignored + list(self.dg.IGNORED_LAYERS_IN_TRACING)
        visited: set[nn.Module] = set()
        for module in list(self.dg.module2node):
            if module in ignored or module in visited or not is_layer(module):
                continue
            pruner = self.dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            channels = list(range(pruner.get_out_channels(module)))
            try:
                group = self.dg.get_pruning_group(module, pruner.prune_out_channels, channels)
            except Exception as error:  # noqa: BLE001 - torch-pruning's own failure: leave the group whole
                reason = f"torch-pruning cannot build its group ({type(error).__name__}: {error})"
                self.unprunable.append({"root": self.names[module], "reason": reason.splitlines()[0][:300]})
                visited.add(module)
                continue
            prunable = True
            for dep, _ in group:
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(dep.target.module)
                    prunable = prunable and dep.target.module not in ignored
            if prunable:
                yield group

    def _drop_overlapping_groups(self) -> None:
        """Leave whole every group whose output channels another group also claims.

        A correct dependency graph splits a model's output channels into disjoint groups. Overlap
        means torch-pruning coupled channels that are not coupled (a reshape right before a concat
        shifts its index mapping: camera channel k tied to LiDAR channel k), and pruning either group
        would cut the wrong channels of the other.
        """
        owners: dict[str, list[int]] = {}
        for i, group in enumerate(self.groups):
            for layer in dict.fromkeys(item.layer for item in group.items if item.kind == "out"):
                owners.setdefault(layer, []).append(i)
        clashing = {i for claimants in owners.values() if len(claimants) > 1 for i in claimants}
        if not clashing:
            return
        for i in sorted(clashing):
            others = sorted({self.groups[j].root for c in owners.values() if i in c for j in c if j != i})
            self.unprunable.append(
                {
                    "root": self.groups[i].root,
                    "reason": f"torch-pruning couples its channels with {', '.join(others)} (often a reshape before "
                    "a concat; a conv after the reshape avoids it)",
                }
            )
        self.groups = [g for i, g in enumerate(self.groups) if i not in clashing]
        self._handlers = [h for i, h in enumerate(self._handlers) if i not in clashing]
        self._covered = [c for i, c in enumerate(self._covered) if i not in clashing]

    def _measure_flops(self, args: tuple, kwargs: dict) -> tuple[dict[str, float], float]:
        """FLOPs (2 x MACs) of every conv/linear/sparse conv layer at full width, from its observed sizes (a
        sparse conv's from its active rulebook pairs), and the rest: what the toolkit's counter
        (`compress.flops`) counts in the same forward beyond those layers (attention matmuls, einsums), so a
        GFLOPs target is met on the count the report measures. `flop_count` keeps the whole count (sparse
        FLOPs and uncounted layers, for the report).

        Also records each layer's input and output shapes per call (`layer_shapes`): latency tables are
        measured at these real feature-map sizes and checked against them."""
        was_training = self.model.training
        try:
            self.model.eval()
            self.flop_count: FlopCount = count_flops(self.model, lambda: self.model(*args, **kwargs), LAYERS)
        finally:
            self.model.train(was_training)
        self.layer_shapes = self.flop_count.shapes
        flops = self.flop_count.layers
        return dict(flops), max(0.0, self.flop_count.total - sum(flops.values()))

    # ---- scores -------------------------------------------------------------------------------
    def torch_pruning_groups(self) -> list:
        """torch-pruning's own group object for each of `groups`, all root channels (for its importances)."""
        return [
            self.dg.get_pruning_group(module, handler, list(range(group.channels)))
            for group, (module, handler) in zip(self.groups, self._handlers)
        ]

    def channel_saliency(self, saliency: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per group, the signed saliency sum of each root channel over every coupled layer."""
        modules = dict(self.model.named_modules())
        result = []
        for group in self.groups:
            total = torch.zeros(group.channels, dtype=torch.float64)
            for item in group.items:
                contribution = _signed_sum(modules[item.layer], item.layer, item.kind, item.idxs, saliency)
                total.index_add_(0, item.root_idxs, contribution.double())
            result.append(total)
        return result

    # ---- widths and FLOPs -------------------------------------------------------------------
    def flops(self, pruned: list[torch.Tensor] | None = None) -> dict[str, float]:
        """FLOPs per layer after removing the `pruned` root channels (bool masks per group)."""
        removed_out: dict[str, int] = {}
        removed_in: dict[str, int] = {}
        for group, mask in zip(self.groups, pruned or []):
            for item in group.items:
                count = int(mask[item.root_idxs].sum())
                target = removed_out if item.kind == "out" else removed_in
                target[item.layer] = target.get(item.layer, 0) + count
        modules = dict(self.model.named_modules())
        result = {}
        for name, base in self.layer_flops.items():
            c_in, c_out = layer_channels(modules[name])
            result[name] = base * (c_out - removed_out.get(name, 0)) / c_out * (c_in - removed_in.get(name, 0)) / c_in
        return result

    def total_flops(self, pruned: list[torch.Tensor] | None = None) -> float:
        """Predicted FLOPs of the whole model: the layers at their pruned widths, plus everything else
        FlopCounterMode counts (matmuls outside conv/linear layers), held constant."""
        return sum(self.flops(pruned).values()) + self.rest_flops

    def select(
        self, scores: list[torch.Tensor], threshold: float, round_to: int, max_group_ratio: float
    ) -> list[torch.Tensor]:
        """Channels to prune: below the global threshold, capped per group, kept widths rounded up."""
        pruned = []
        for group, score in zip(self.groups, scores):
            n, step = group.channels, group.step(round_to)
            kept = n - int((score < threshold).sum())
            if step > 1:
                kept = min(n, math.ceil(max(kept, 1) / step) * step)
            kept = max(kept, min_kept(n, step, max_group_ratio))
            pruned.append(group.choose(score, n - kept))
        return pruned

    def max_reduction(self, round_to: int, max_group_ratio: float) -> float:
        """The largest FLOPs reduction any threshold can reach under the cap."""
        everything = [torch.zeros(g.channels) for g in self.groups]
        return 1.0 - self.total_flops(self.select(everything, math.inf, round_to, max_group_ratio)) / self.total_flops()

    def threshold_for(
        self,
        scores: list[torch.Tensor],
        target: float,
        mode: str,
        round_to: int,
        max_group_ratio: float,
        tiebreak: list[torch.Tensor] | None = None,
        tolerance: float = 0.01,
    ) -> list[torch.Tensor]:
        """Bisection on one global threshold so the FLOPs (mode "flops") or channel reduction hits `target`.

        If the nearest threshold still misses by more than `tolerance`, single width steps close the gap.

        The threshold runs over global ranks, not raw values: dead channels all score exactly 0, and a
        value threshold would drop hundreds of tied channels at once. Ties go to `tiebreak` (lower is
        pruned first; the caller passes channel magnitudes), then to position.
        """
        ranks = global_ranks(scores, tiebreak)
        base_flops = self.total_flops()
        total_channels = sum(g.channels for g in self.groups)

        def reduction(masks: list[torch.Tensor]) -> float:
            if mode == "flops":
                return 1.0 - self.total_flops(masks) / base_flops
            return sum(int(m.sum()) for m in masks) / total_channels

        low, high = 0, total_channels
        best, best_gap = None, math.inf
        while low <= high:
            mid = (low + high) // 2
            masks = self.select(ranks, mid, round_to, max_group_ratio)
            achieved = reduction(masks)
            if abs(achieved - target) < best_gap:
                best, best_gap = masks, abs(achieved - target)
            if achieved < target:
                low = mid + 1
            else:
                high = mid - 1
        if best_gap > tolerance:
            best = self._close_gap(best, ranks, target, reduction, round_to, max_group_ratio, tolerance)
        return best

    def _close_gap(self, masks, ranks, target, reduction, round_to, max_group_ratio, tolerance):
        """Move single width steps (one `round_to` block of one group) while that brings us nearer the target.

        One rank step of the global threshold can drop a whole block of a FLOP-heavy layer at once: with
        random scores that missed a 30% target by 2.3 points. Each move prunes the group's next-lowest
        ranked block or restores its highest-ranked pruned one, so the order inside a group is kept.
        When no single step helps but the gap is still wide (every step of the one group left overshoots,
        as with 32-channel layers at round_to 8), one step across the target is tried, followed by
        steps back: the few smallest crossings, keeping whichever lands nearest.
        """

        def moves(masks, frozen=-1):
            """(group, masks after one width step of that group), for every group but `frozen`."""
            for i, (group, rank) in enumerate(zip(self.groups, ranks)):
                if i == frozen:
                    continue
                n, kept = group.channels, group.channels - int(masks[i].sum())
                step = group.step(round_to)
                for new_kept in ((kept - 1) // step * step, min(n, (kept // step + 1) * step)):
                    if new_kept != kept and new_kept >= min_kept(n, step, max_group_ratio):
                        yield i, masks[:i] + [group.choose(rank, n - new_kept)] + masks[i + 1 :]

        def greedy(masks, frozen=-1):
            gap = abs(reduction(masks) - target)
            while gap > tolerance:
                best, best_gap = None, gap
                for _, trial in moves(masks, frozen):
                    trial_gap = abs(reduction(trial) - target)
                    if trial_gap < best_gap:
                        best, best_gap = trial, trial_gap
                if best is None:
                    break
                masks, gap = best, best_gap
            return masks, gap

        masks, gap = greedy([m.clone() for m in masks])
        if gap > tolerance:
            side = reduction(masks) > target
            crossings = []
            for k, (group, trial) in enumerate(moves(masks)):
                achieved = reduction(trial)
                if (achieved > target) != side:
                    crossings.append((abs(achieved - target), k, group, trial))
            crossings.sort(key=lambda c: c[:2])
            for _, _, group, trial in crossings[:8]:  # the crossing group stays put: a step back there undoes it
                candidate, candidate_gap = greedy(trial, frozen=group)
                if candidate_gap < gap:
                    masks, gap = candidate, candidate_gap
        return masks

    # ---- removal ----------------------------------------------------------------------------
    def zero_channels(self, pruned: list[torch.Tensor]) -> None:
        """Zero every coupled parameter of the pruned channels (the reference for zero-then-prune tests). A
        LayerNorm over pruned channels also gets a forward hook (it normalises over the kept ones), which no
        state dict restores: zero a copy of the model."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for group, mask in zip(self.groups, pruned):
                for item in group.items:
                    idxs = item.idxs[mask[item.root_idxs]]
                    if len(idxs) == 0:
                        continue
                    m = modules[item.layer]
                    dim = 0 if isinstance(m, NORMS) else weight_dims(m)[0 if item.kind == "out" else 1]
                    m.weight.index_fill_(dim, idxs, 0.0)
                    if m.bias is not None and (item.kind == "out" or isinstance(m, NORMS)):
                        m.bias.index_fill_(0, idxs, 0.0)
                    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                        _normalize_over_kept_channels(m, idxs)
                for item in group.extras:
                    idxs = item.idxs[mask[item.root_idxs]]
                    if len(idxs):
                        _zero_extra(self.model, modules, item, idxs)

    def prune(self, pruned: list[torch.Tensor]) -> None:
        """Physically remove the pruned channels, group by group. Attention that lost channels gets its query
        projection rescaled by sqrt(new head_dim / old head_dim): its softmax scale 1/sqrt(head_dim) follows the
        width, and the rescale makes the pruned model compute what the zeroed one does."""
        modules = dict(self.model.named_modules())
        for group, (module, handler), mask in zip(self.groups, self._handlers, pruned):
            idxs = torch.nonzero(mask).flatten().tolist()
            if not idxs:
                continue
            attention = [modules[e.layer] for e in group.extras if e.kind == "attention"]
            before = [mha.embed_dim // mha.num_heads for mha in attention]
            self.dg.get_pruning_group(module, handler, idxs).prune()
            for mha, head_dim in zip(attention, before):
                _rescale_queries(mha, head_dim)

    def pruned_copy_error(self, pruned: list[torch.Tensor], only: Sequence[int] | None = None) -> str | None:
        """Prune a copy of the model (all groups, or the groups `only`) and run it on the example batch:
        None if it runs, else the error. The model itself is not touched."""
        model = copy.deepcopy(self.model)
        try:
            dg, _ = trace(model, self.task, self.example_batch)
            modules = dict(model.named_modules())
            for i, (group, mask) in enumerate(zip(self.groups, pruned)):
                idxs = torch.nonzero(mask).flatten().tolist()
                if idxs and (only is None or i in only):
                    root = modules[group.root]
                    dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs).prune()
            model.eval()
            counted = count_flops(model, lambda: self.task.forward(model, self.example_batch))
        except Exception as error:  # noqa: BLE001 - any failure of the pruned copy is the answer
            return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        if only is None:
            self.copy_flops = counted.total  # measured, for `measured_reduction`
        return None

    def measured_reduction(self, pruned: list[torch.Tensor]) -> float:
        """The GFLOPs reduction FlopCounterMode measures on a pruned copy (the model is not touched)."""
        error = self.pruned_copy_error(pruned)
        if error is not None:
            raise PruningError(f"the pruned model does not run ({error})")
        return 1.0 - self.copy_flops / self.total_flops()

    def groups_breaking_the_model(self, pruned: list[torch.Tensor]) -> dict[int, str]:
        """Groups whose pruning alone stops the model from running (a channel count hard-coded in a
        reshape, say), found by bisection over the groups with pruned channels; {} if the pruned copy runs."""
        if self.pruned_copy_error(pruned) is None:
            return {}

        def search(candidates: list[int]) -> dict[int, str]:
            error = self.pruned_copy_error(pruned, candidates)
            if error is None:
                return {}
            if len(candidates) == 1:
                return {candidates[0]: error}
            half = len(candidates) // 2
            return {**search(candidates[:half]), **search(candidates[half:])}

        touched = [i for i, mask in enumerate(pruned) if bool(mask.any())]
        found = search(touched)
        if not found:
            raise PruningError(
                f"the pruned model does not run ({self.pruned_copy_error(pruned)}), and no single group is to blame"
            )
        return found

    def leave_whole(self, indices: dict[int, str]) -> None:
        """Move groups out of the prunable set, recording why."""
        for i, reason in sorted(indices.items()):
            self.unprunable.append({"root": self.groups[i].root, "reason": reason})
        self.groups = [g for i, g in enumerate(self.groups) if i not in indices]
        self._handlers = [h for i, h in enumerate(self._handlers) if i not in indices]
        self._covered = [c for i, c in enumerate(self._covered) if i not in indices]

    def widths(self) -> dict[str, int]:
        """Current output width of every group's root layer."""
        modules = dict(self.model.named_modules())
        result = {}
        for group in self.groups:
            result[group.root] = layer_channels(modules[group.root])[1]
        return result


def _normalize_over_kept_channels(norm: nn.LayerNorm, removed: torch.Tensor) -> None:
    """Make a zeroed LayerNorm compute what the pruned one will: zeroed inputs still count in its mean and
    variance, removed ones do not (a transformer's residual stream, Swin's patch merging). Statistics are
    taken over the kept channels only, by a forward hook on this (reference) copy; the removed channels
    stay zero (their weight and bias are zeroed)."""
    keep = getattr(norm, "altermoma_kept_channels", None)
    if keep is None:
        keep = torch.ones(norm.normalized_shape[0], dtype=torch.bool)
        norm.register_forward_hook(_kept_channel_layer_norm)
    keep = keep.clone()
    keep[removed] = False
    norm.altermoma_kept_channels = keep


def _kept_channel_layer_norm(norm: nn.LayerNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    keep = norm.altermoma_kept_channels.to(output.device)
    weight = None if norm.weight is None else norm.weight[keep]
    bias = None if norm.bias is None else norm.bias[keep]
    kept = nn.functional.layer_norm(inputs[0][..., keep], (int(keep.sum()),), weight, bias, norm.eps)
    result = torch.zeros_like(output)
    result[..., keep] = kept
    return result


def _zero_extra(model: nn.Module, modules: dict[str, nn.Module], item: GroupItem, idxs: torch.Tensor) -> None:
    """Zero what a group's removal of `idxs` takes from an attention embedding or a loose parameter."""
    if item.kind == "parameter":
        param = dict(model.named_parameters())[item.layer]
        param.index_fill_(item.dim % param.dim(), idxs, 0.0)
        return
    mha = modules[item.layer]
    e = mha.embed_dim
    rows = torch.cat([idxs, idxs + e, idxs + 2 * e])
    mha.in_proj_weight.index_fill_(0, rows, 0.0)
    mha.in_proj_weight.index_fill_(1, idxs, 0.0)
    if mha.in_proj_bias is not None:
        mha.in_proj_bias.index_fill_(0, rows, 0.0)
    mha.out_proj.weight.index_fill_(0, idxs, 0.0)
    mha.out_proj.weight.index_fill_(1, idxs, 0.0)
    if mha.out_proj.bias is not None:
        mha.out_proj.bias.index_fill_(0, idxs, 0.0)
    for extra in (mha.bias_k, mha.bias_v):
        if extra is not None:
            extra.index_fill_(2, idxs, 0.0)


def _rescale_queries(mha: nn.MultiheadAttention, old_head_dim: int) -> None:
    """Keep q.k / sqrt(head_dim) as it was after head_dim shrank: scale the query projection."""
    new_head_dim = mha.embed_dim // mha.num_heads
    if new_head_dim == old_head_dim:
        return
    scale = math.sqrt(new_head_dim / old_head_dim)
    with torch.no_grad():
        mha.in_proj_weight[: mha.embed_dim].mul_(scale)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias[: mha.embed_dim].mul_(scale)
