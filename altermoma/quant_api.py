"""`altermoma.quantize`: INT8 post-training quantization of any model described by a `Task`.

    import altermoma
    report = altermoma.quantize(model, task, train_batches, skip=("backbone.conv1",))
    altermoma.export_onnx(model, example_inputs, "model_int8.onnx")   # a Q/DQ graph
    altermoma.save_quantized(model, "int8/", report)
    altermoma.load_quantized(build_my_model(), "int8/")               # same architecture, same widths

Calibrate on training data, never on the data you evaluate on. See `export.quantize` and docs/quantize.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from common.task import Task
from export.quantize import QuantizeConfig
from export.quantize import quantize as _quantize


def quantize(
    model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    config: QuantizeConfig | None = None,
    *,
    skip: Sequence[str] = (),
    method: str = "max",
    fuse_conv_bn: bool = True,
    share_quantizers: bool = True,
    quantize_residual_adds: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """INT8 PTQ of `model` in place (ModelOpt fake-quant; exports as QuantizeLinear/DequantizeLinear).

    `batches` (from the training split) run through `task.forward`; `config` overrides the keyword options:
    `skip` module names stay floating point, `method` is the calibration ("max", "mse", "histogram"),
    `fuse_conv_bn` folds BatchNorm into the preceding conv first, `share_quantizers` gives quantizers
    reading one tensor one scale, `quantize_residual_adds` puts one quantizer on both inputs of every residual
    Add (found from a forward pass). Returns the report (fused pairs, quantizer table, errors vs FP)."""
    if config is None:
        config = QuantizeConfig(
            fuse_conv_bn=fuse_conv_bn,
            share_quantizers=share_quantizers,
            quantize_residual_adds=quantize_residual_adds,
            skip=tuple(skip),
            method=method,
        )
    return _quantize(model, task, batches, config, progress=progress)
