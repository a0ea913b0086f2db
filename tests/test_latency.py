"""Latency harness: `measure` statistics, and a tiny end-to-end bench that writes its three reports and
lists the GPU backends it cannot run here (timings are reported, never asserted)."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from altermoma import bench as latency
from altermoma.bench import BACKENDS, availability, compare, cpu_model, measure
from fusion.checkpoint import save_checkpoint
from fusion.models.bevfusion import build_model

torch.set_num_threads(1)


def test_measure_keys_and_order():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.001 * (len(calls) % 3))

    result = measure(work, warmup=2, runs=9)
    assert len(calls) == 11
    assert {"median_ms", "p90_ms", "p99_ms", "runs"} <= set(result)
    assert result["runs"] == 9
    assert 0 <= result["min_ms"] <= result["median_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    with pytest.raises(ValueError):
        measure(work, runs=0)


def test_availability_lists_every_backend():
    status = availability()
    assert list(status) == list(BACKENDS)
    assert status["torch-cpu-fp32"] == status["ort-cpu-fp32"] == "available"
    for state in status.values():
        assert state == "available" or state.startswith("unavailable: ")
    assert cpu_model()


def test_compare_speedup_efficiency():
    def model(label, gflops, ms):
        return {
            "label": label,
            "gflops": gflops,
            "latency": {"ort-cpu-fp32": {"status": "ok", "total": {"median_ms": ms}}},
        }

    rows = compare([model("base", 4.0, 100.0), model("pruned", 1.0, 50.0)])
    assert [r["model"] for r in rows] == ["base", "pruned"]
    assert rows[1]["speedup"] == pytest.approx(2.0)
    assert rows[1]["gflops_ratio"] == pytest.approx(4.0)
    assert rows[1]["efficiency"] == pytest.approx(0.5)


@pytest.mark.slow  # times the tiny model; benchmark scripts are slow-set
def test_bench_tiny_writes_reports(tiny_config, tmp_path, capsys):
    from altermoma.cli_deploy import add_parsers

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny-fusion", build_model(tiny_config, "fusion"))
    out = tmp_path / "bench"
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    argv = ["bench", "--checkpoint", str(ckpt), "--preset", "tiny", "--threads", "1", "--out", str(out)]
    args = parser.parse_args([*argv, "--runs", "1", "--warmup", "0"])
    args.run(args)  # the CLI handler calls bench()
    assert "ort-cpu-fp32" in capsys.readouterr().out
    for name in ("bench.md", "bench.json", "latency_vs_gflops.png"):
        assert (out / name).is_file()
    assert (out / "latency_vs_gflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "bench.json").read_text())
    assert saved["environment"]["threads"] == 1 and saved["environment"]["cpu"]
    model = saved["models"][0]
    assert model["gflops"] > 0 and model["params"] > 0
    for backend in ("torch-cpu-fp32", "ort-cpu-fp32"):
        lat = model["latency"][backend]
        assert lat["status"] == "ok" and lat["total"]["runs"] == 1
        assert set(lat["stages"]) == {
            "camera_backbone",
            "camera_vtransform",
            "lidar_backbone",
            "fuser_decoder",
            "heads",
        }
    text = (out / "bench.md").read_text()
    if not torch.cuda.is_available():
        for backend in ("torch-cuda-fp32", "torch-cuda-graph-fp16-autocast", "ort-cuda-fp32", "tensorrt-fp16"):
            assert model["latency"][backend]["status"].startswith("unavailable: ")
            assert f"- {backend}: unavailable: " in text
    assert saved["comparison"][0]["efficiency"] == pytest.approx(1.0)


def test_default_model_is_labelled_random_without_shipped_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "SHIPPED", tmp_path)
    [(label, model, source)] = latency.resolve_models(None, "tiny")
    assert "random weights" in label and "random weights" in source
    assert model.config.preset == "tiny" and model.modality == "fusion"
