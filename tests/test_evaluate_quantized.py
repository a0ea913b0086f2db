"""`altermoma evaluate` takes an `altermoma quantize` folder and scores its fake-quant model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from altermoma.cli import main

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights" / "tiny-fusion"


@pytest.mark.slow  # calibrates and evaluates the tiny model; default set: the Q/DQ unit tests in test_quantize
def test_evaluate_scores_a_quantized_checkpoint_close_to_its_float_source(tmp_path):
    # imported here, not at module level: importing ModelOpt takes ~14 s, which every xdist worker would pay while
    # collecting, for a test the default run deselects
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the `quant` extra) is not installed")
    quantized = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", str(SHIPPED), "--out", str(quantized), "--calib-scenes", "2"]) == 0
    scores = {}
    for name, checkpoint in (("fp32", SHIPPED), ("int8", quantized)):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--scenes", "8", "--json", str(out)]) == 0
        scores[name] = json.loads(out.read_text())
    assert scores["int8"] != scores["fp32"]  # the quantizers act
    assert abs(scores["int8"]["mAP"] - scores["fp32"]["mAP"]) < 0.05
