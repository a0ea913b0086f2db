"""`python -m benchmarks.gpu --device cpu --quick`: the GPU script's code paths, run on the CPU.

One quick run (a shrunken tiny model, 1 warm-up and 2 timed runs) is shared by the structure tests. No
assertion reads a timing beyond "a positive number": the figures themselves are the GPU run's business.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from benchmarks import gpu
from compress.latency import load_table

SECTIONS = ["environment", "cuda-python", "latency-tiny", "altereva", "latency-table"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-quick")
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_report_has_every_section_and_none_failed(quick):
    _, report, md = quick
    assert report["kind"] == "gpu-figures" and report["status"] == "complete"
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert not section["status"].startswith(("failed", "skipped", "stopped")), (name, section["status"])
        assert section["seconds"] >= 0
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] is True
    for title in (
        "## Environment",
        "## cuda-python",
        "## Latency: tiny",
        "## AlterEva scoring cost",
        "## Latency table",
    ):
        assert title in md


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_environment_records_versions_and_threads(quick):
    env = quick[1]["sections"]["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["threads"] == 1 and env["torch_threads"] == 1 and env["logical_cpus"] >= 1
    assert env["onnxruntime"] and env["numpy"] and env["python"]
    assert env["driver"].startswith("unavailable") and env["gpu"] is None
    assert env["cuda_python"]  # a version, or "not importable: <reason>"


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_latency_per_stage_and_speedups(quick):
    section = quick[1]["sections"]["latency-tiny"]
    pruning = section["pruning"]
    assert pruning["method"] == "magnitude" and pruning["target"] == {"target_gflops": 0.5}
    assert abs(pruning["gflops_reduction"] - 0.5) <= 0.02  # counted, not timed: deterministic
    base, pruned = section["models"]
    assert pruned["gflops"] < base["gflops"]
    for model in (base, pruned):
        eager = model["latency"]["eager-fp32"]
        assert eager["status"] == "ok" and eager["backend"] == "torch-cpu-fp32"
        assert eager["total"]["median_ms"] > 0 and eager["total"]["runs"] == 2
        assert set(eager["stages"]) == set(model["split_flops"]) - {"total"}
        assert all(t["median_ms"] > 0 for t in eager["stages"].values())
    rows = [r for r in section["speedups"] if r["mode"] == "eager-fp32"]
    assert {r["stage"] for r in rows} == set(base["split_flops"])
    total = next(r for r in rows if r["stage"] == "total")
    assert total["speedup"] == pytest.approx(total["base_ms"] / total["pruned_ms"])
    assert total["gflops_ratio"] == pytest.approx(base["split_flops"]["total"]["gflops"] / pruned["gflops"], rel=1e-6)
    assert total["efficiency"] == pytest.approx(total["speedup"] / total["gflops_ratio"])


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_cuda_only_parts_are_marked_unavailable_with_a_reason(quick):
    sections = quick[1]["sections"]
    for model in sections["latency-tiny"]["models"]:
        for mode in ("eager-fp16-autocast", "graph-fp16-autocast"):
            status = model["latency"][mode]["status"]
            assert status.startswith("unavailable: ") and len(status) > len("unavailable: ") + 10
    for row in sections["altereva"]["rows"].values():
        assert row["peak_gpu_mib"].startswith("unavailable: ")
    assert sections["cuda-python"]["status"].startswith(("not importable: ", "unavailable: "))


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_altereva_scoring_cost(quick):
    section = quick[1]["sections"]["altereva"]
    assert section["settings"]["reactivation_steps"] == 1 and section["preset"] == "tiny"
    rows = section["rows"]
    assert rows["forward_backward"]["seconds"] > 0 and rows["altereva"]["seconds"] > 0
    assert rows["altereva"]["x_forward_backward"] == pytest.approx(
        rows["altereva"]["seconds"] / rows["forward_backward"]["seconds"]
    )


@pytest.mark.slow  # the whole script once on the CPU (quick); the default set: budget, refusals, failures
def test_latency_table_and_targeted_prune(quick):
    out, report, _ = quick
    section = report["sections"]["latency-table"]
    table = section["table"]
    assert section["backend"] == "torch-cpu" and table["layers"] > 0 and table["end_to_end_ms"] > 0
    loaded = load_table(out / table["path"])
    assert loaded.backend == "torch-cpu" and len(loaded.layers) == table["layers"]
    targeted = section["targeted"]
    if targeted["status"] != "ok":
        # Only the prune's own refusals, which follow from the measured numbers, may stop this part.
        assert targeted["status"].startswith(("failed: PruningError: ", "failed: LatencyTableError: ")), targeted
        return
    # Whatever the machine's load made of the table's verdict, the prune ran (forced past a "bad" verdict).
    assert (targeted["forced"] is not None) == (table["verdict"] == "bad")
    assert (targeted["fallback"] is None) == ("target_latency" in targeted["pruning"]["target"])
    latency = targeted["pruning"]["latency"]
    assert latency["predicted_after_ms"] <= latency["predicted_before_ms"]
    measured = targeted["measured"]
    assert measured["unpruned_ms"] > 0 and measured["pruned_ms"] > 0
    assert targeted["measured_speedup"] == pytest.approx(measured["unpruned_ms"] / measured["pruned_ms"])


def test_a_bad_table_is_forced_and_an_unreachable_latency_target_falls_back_to_gflops():
    from compress.latency import table_from_costs
    from compress.structured import ChannelGraph
    from fusion.task import first_sample, reference_task, scoring_set

    plan = gpu.quick_plan()
    model = gpu.reference_model(plan.table_preset, plan.overrides)
    example = first_sample(scoring_set(model.config, 1, 1)[0])
    graph = ChannelGraph(model, reference_task(model), example)
    table = table_from_costs(graph, lambda _name, c_in, c_out: 1e-3 * c_in * c_out, backend="torch-cpu")
    layers_ms = table.end_to_end_ms
    # A rest ten times the layers' time: no pruning reaches half the latency; and a "bad" verdict.
    table = replace(table, rest_ms=10 * layers_ms, end_to_end_ms=11 * layers_ms,
                    quality={"verdict": "bad", "reasons": ["made up for the test"]})  # fmt: skip
    pruned, pruning, notes = gpu.prune_against(model, table, "torch-cpu", plan, 1)
    assert "judged bad" in notes["forced"] and "made up for the test" in notes["forced"]
    assert "not reachable" in notes["fallback"]
    assert pruning["target"] == {"target_gflops": 0.5} and abs(pruning["gflops_reduction"] - 0.5) <= 0.02
    latency = pruning["latency"]
    assert latency["predicted_before_ms"] == pytest.approx(11 * layers_ms)
    assert 10 * layers_ms < latency["predicted_after_ms"] < latency["predicted_before_ms"]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_budget_skips_sections_with_the_reason(tmp_path):
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--budget-s", "0.001"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["sections"]["environment"]["status"] == "ok"  # always recorded
    for name in SECTIONS[1:]:
        status = report["sections"][name]["status"]
        assert status.startswith("skipped: time budget: ") and "--budget-s 0.001" in status, status
    assert report["status"] == "complete, 4 skipped"


def test_budget_refuses_what_does_not_fit():
    now = [100.0]
    budget = gpu.Budget(60, clock=lambda: now[0])
    assert budget.refusal(50) is None
    now[0] += 20
    assert budget.refusal(40) is None
    reason = budget.refusal(41)
    assert reason == "skipped: time budget: 40.0 s of --budget-s 60 left, this part needs about 41 s"


def test_a_failing_section_is_recorded_and_the_run_goes_on():
    def broken():
        raise RuntimeError("no such kernel\nsecond line")

    assert gpu.attempt(broken) == {"status": "failed: RuntimeError: no such kernel"}
    assert gpu.attempt(lambda: {"x": 1}) == {"x": 1, "status": "ok"}


def test_the_budget_stops_a_running_section_and_no_handler_swallows_the_stop():
    def endless():
        for _ in range(1000):
            time.sleep(0.01)
        return {"status": "ok"}

    def swallowing():
        try:
            endless()
        except BaseException as stop:  # a cleanup that fails while the stop unwinds
            raise RuntimeError("capture ended badly") from stop

    for fn in (endless, swallowing, lambda: gpu.attempt(swallowing)):
        result = gpu.run_section(fn, gpu.Budget(0.05))
        assert result["status"] == "stopped: the time budget (--budget-s 0.05) ran out during this section"


def test_a_section_the_markdown_cannot_read_is_named_not_fatal():
    lines = gpu.body_lines("altereva", {"status": "ok", "rows": {}})
    assert lines == ["(this section's figures are in gpu.json; formatting them failed: KeyError: 'settings')"]
    assert gpu.body_lines("altereva", {"status": "failed: X: y"}) == ["failed: X: y"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "report"
    assert gpu.main(["--out", str(out)]) == 2
    assert "sees no CUDA device" in _error_line(capsys) and not out.exists()


def test_bad_out_and_presets_are_refused_and_nothing_is_overwritten(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("keep me")
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(taken)]) == 2
    assert "is not a directory" in _error_line(capsys) and taken.read_text() == "keep me"
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "r"), "--presets", "tiny,nope"]) == 2
    assert "unknown preset 'nope'" in _error_line(capsys) and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--device", "cpu", "--out", str(tmp_path / "r"), "--budget-s", "0"])
    assert stop.value.code == 2 and "--budget-s" in _error_line(capsys)
