"""Resize a freshly built model's layers to the shapes found in a state dict (a pruned checkpoint).

A pruned checkpoint stores only tensors; rebuilding the model at its original widths and then
giving every layer the stored shapes ("explicit widths") needs neither torch-pruning nor the code
that pruned it. Depthwise convs keep `groups == channels`. Shared by the reference checkpoints
(`fusion.checkpoint`) and the model-agnostic pruned format (`compress.checkpoint`).
"""

from __future__ import annotations

import torch
from torch import nn

from common.layers import is_sparse_conv


class ResizeError(ValueError):
    """A stored tensor that no layer of this model can take."""


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Give every conv/sparse conv/linear/norm layer the channel counts found in `state`; returns the layers resized."""
    resized = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # in_proj_weight, not weight; out_proj is a Linear below
            resized += _resize_attention(name, module, state)
            continue
        key = f"{name}.weight" if name else "weight"
        if key not in state or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        shape = tuple(state[key].shape)
        if shape == tuple(module.weight.shape):
            continue
        _resize_layer(name, module, shape)
        for param_name, _ in list(module.named_parameters(recurse=False)):
            full = f"{name}.{param_name}"
            if full in state:
                setattr(module, param_name, nn.Parameter(torch.empty_like(state[full])))
        for buffer_name, tensor in list(module.named_buffers(recurse=False)):
            full = f"{name}.{buffer_name}"
            if full in state and tensor is not None:
                setattr(module, buffer_name, torch.empty_like(state[full]))
        resized += 1
    return resized


def _resize_attention(name: str, module: nn.MultiheadAttention, state: dict[str, torch.Tensor]) -> int:
    """A packed-projection attention whose embedding was pruned: (3E, E) in_proj_weight, heads kept (head_dim
    shrinks). Returns 1 if resized."""
    prefix = f"{name}." if name else ""
    key = f"{prefix}in_proj_weight"
    if key not in state or module.in_proj_weight is None:
        return 0
    shape = tuple(state[key].shape)
    if shape == tuple(module.in_proj_weight.shape):
        return 0
    embed = shape[1]
    if shape[0] != 3 * embed or embed % module.num_heads:
        raise ResizeError(f"layer {name}: attention with {module.num_heads} heads cannot take in_proj_weight {shape}")
    module.embed_dim = module.kdim = module.vdim = embed
    module.head_dim = embed // module.num_heads
    module.in_proj_weight = nn.Parameter(torch.empty_like(state[key]))
    if module.in_proj_bias is not None and f"{prefix}in_proj_bias" in state:
        module.in_proj_bias = nn.Parameter(torch.empty_like(state[f"{prefix}in_proj_bias"]))
    for bias in ("bias_k", "bias_v"):
        if getattr(module, bias) is not None and f"{prefix}{bias}" in state:
            setattr(module, bias, nn.Parameter(torch.empty_like(state[f"{prefix}{bias}"])))
    return 1


def _resize_layer(name: str, module: nn.Module, shape: tuple[int, ...]) -> None:
    """One small rule per layer kind; anything else cannot change shape."""
    if is_sparse_conv(module) and len(shape) == module.weight.dim():  # (out, *kernel, in)
        if shape[1:-1] != tuple(module.weight.shape[1:-1]):
            raise ResizeError(f"layer {name}: kernel {tuple(module.weight.shape[1:-1])} cannot become {shape[1:-1]}")
        module.out_channels, module.in_channels = shape[0], shape[-1]
    elif isinstance(module, nn.modules.conv._ConvNd) and len(shape) == module.weight.dim():
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if depthwise:  # weight (C * multiplier, 1, k, k): channels and groups shrink together
            multiplier = module.out_channels // module.groups
            if shape[out_dim] % multiplier or shape[in_dim] != module.weight.shape[in_dim]:
                raise ResizeError(f"layer {name}: depthwise conv cannot take a weight of shape {shape}")
            module.groups = shape[out_dim] // multiplier
            module.in_channels, module.out_channels = module.groups, shape[out_dim]
        elif module.groups > 1:
            raise ResizeError(f"layer {name}: grouped conv (groups={module.groups}) cannot change shape to {shape}")
        elif transposed:
            module.in_channels, module.out_channels = shape[0], shape[1]
        else:
            module.out_channels, module.in_channels = shape[0], shape[1]
        if shape[2:] != tuple(module.weight.shape[2:]):
            raise ResizeError(f"layer {name}: kernel {tuple(module.weight.shape[2:])} cannot become {shape[2:]}")
    elif isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        module.num_features = shape[0]
    elif isinstance(module, nn.GroupNorm) and module.num_groups in (1, module.num_channels):
        module.num_groups = 1 if module.num_groups == 1 else shape[0]
        module.num_channels = shape[0]
    elif isinstance(module, nn.LayerNorm) and len(shape) == len(module.normalized_shape):
        module.normalized_shape = shape
    elif isinstance(module, nn.Linear) and len(shape) == 2:
        module.out_features, module.in_features = shape
    elif isinstance(module, nn.PReLU) and len(shape) == 1:
        module.num_parameters = shape[0]
    else:
        raise ResizeError(f"cannot resize layer {name} ({type(module).__name__}) to {shape}")
