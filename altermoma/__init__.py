"""altermoma: AlterMOMA pruning, fine-tuning and deployment export for camera-LiDAR fusion models.

The public API (imported lazily, so `altermoma --help` stays fast):

    Task, Setup, prune, finetune, save_pruned, load_pruned, export_onnx,
    quantize, QuantizeConfig, save_quantized, load_quantized (INT8 Q/DQ; needs the `quant` extra),
    robustness (metrics under sensor failures and corruptions)

See `altermoma.api` and the README's "Use it on your own model".
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Task",
    "Setup",
    "prune",
    "finetune",
    "save_pruned",
    "load_pruned",
    "export_onnx",
    "quantize",
    "QuantizeConfig",
    "save_quantized",
    "load_quantized",
    "robustness",
]

_WHERE = {
    "Task": ("common.task", "Task"),
    "Setup": ("altermoma.api", "Setup"),
    "prune": ("altermoma.api", "prune"),
    "finetune": ("altermoma.api", "finetune"),
    "save_pruned": ("compress.checkpoint", "save_pruned"),
    "load_pruned": ("compress.checkpoint", "load_pruned"),
    "export_onnx": ("export.onnx", "export_onnx"),
    "quantize": ("altermoma.quant_api", "quantize"),
    "QuantizeConfig": ("export.quantize", "QuantizeConfig"),
    "save_quantized": ("export.quantize", "save_quantized"),
    "load_quantized": ("export.quantize", "load_quantized"),
    "robustness": ("altermoma.robust", "robustness"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'altermoma' has no attribute {name!r}")
    import importlib

    module, attribute = _WHERE[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
