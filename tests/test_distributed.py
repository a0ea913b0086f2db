"""Distributed runs on the CPU: 2 gloo processes on 127.0.0.1, started by the tests themselves.

What must hold: N processes score like one process over the same global scoring set and keep the same
channels; a distributed fine-tune with global batch B takes one process's steps with batch B; rank 0
alone writes; a failing rank stops the job with its rank named and no output; a killed fine-tune
resumes. Library-level checks use `torch.multiprocessing.spawn`; CLI-level ones run `torchrun`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from common import ddp, dist
from common.io import FAULT_ENV, MANIFEST

ROOT = Path(__file__).resolve().parent.parent
TINY_FUSION = ROOT / "fusion" / "weights" / "tiny-fusion"
WORLD = 2
SCORE_RTOL = 1e-6  # max |distributed - single| over all channels, relative to the largest |score|
# A distributed fine-tune (2 ranks x B/2 samples, sync BN, global loss normalisers) against one process
# with B samples. Both compute the same gradient in another summation order, and train-mode BatchNorm
# makes float32 rounding visible: measured on the tiny model, the single-process gradient is 2.1e-5
# (relative L2) from a float64 one, the distributed one 1.6e-6 (its BatchNorm statistics are float64).
# AdamW then normalises every coordinate, so a weight whose gradient is at rounding level moves +-lr
# either way: after 3 steps 0.02% of the weights differed by more than lr/10 (at most 2 lr) and the
# weights differed by 0.4% of the update's norm. The bounds leave a margin over those measurements.
LOSS_RTOL = 1e-4  # measured 3e-5 after 2 steps
UPDATE_RTOL = 0.02  # |theta_dist - theta_single| / |theta_single - theta_0|, measured 0.004
OUTLIER_SHARE = 1e-3  # weights off by more than lr / 10, measured 2e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        dist.TIMEOUT_ENV: "600",  # a hang guard: a busy machine may hold one rank back for minutes
        dist.BACKEND_ENV: "gloo",
    }


def _rank_main(rank: int, port: int, job: Callable[[Path], None], out: Path) -> None:
    os.environ.update(_rank_env(rank, port))
    torch.set_num_threads(1)
    dist.init_from_env()
    job(out)
    dist.shutdown()


def _run_ranks(job: Callable[[Path], None], out: Path) -> list[dict]:
    """Run `job(out)` on 2 gloo ranks (as torchrun would start them); returns what each rank saved."""
    mp.spawn(_rank_main, args=(_free_port(), job, out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_same_training(trained: dict, single: dict, start: dict, lr: float) -> None:
    """Weights trained distributed vs in one process, from `start` (see the tolerances above)."""
    keys = [k for k, v in single.items() if v.is_floating_point() and "running" not in k]
    diff = torch.cat([(trained[k].double() - single[k].double()).flatten() for k in keys])
    update = torch.cat([(single[k].double() - start[k].double()).flatten() for k in keys])
    assert float(diff.norm() / update.norm()) <= UPDATE_RTOL, float(diff.norm() / update.norm())
    assert float((diff.abs() > lr / 10).double().mean()) <= OUTLIER_SHARE
    stats = [k for k in single if "running" in k]  # BatchNorm statistics: measured 5e-6 apart (relative L2)
    diff = torch.cat([(trained[k].double() - single[k].double()).flatten() for k in stats])
    assert float(diff.norm() / torch.cat([single[k].double().flatten() for k in stats]).norm()) <= 1e-4
    assert all(torch.equal(trained[k], v) for k, v in single.items() if not v.is_floating_point())


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))
    return diff / max(float(y.double().abs().max()) for y in b)


# ---- scoring and selection ----------------------------------------------------------------------
def _request(method: str):
    from compress.altereva import AlterEvaConfig
    from compress.request import PruneRequest

    return PruneRequest(method=method, target_gflops=0.5, altereva=AlterEvaConfig(reactivation_steps=1)).validate()


def _prune_recording_scores(method: str) -> tuple[list[torch.Tensor], dict]:
    """Prune the tiny fusion model; returns (the scores this rank computed, before any broadcast; widths)."""
    import compress.oneshot as oneshot
    from compress.prune import prune
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    model, _ = load_checkpoint(TINY_FUSION)
    batches = scoring_set(model.config, 2, 2)
    recorded: list[list[torch.Tensor]] = []
    original = oneshot.channel_scores

    def recording(*args, **kwargs):
        scores = original(*args, **kwargs)
        recorded.append([s.clone() for s in scores])
        return scores

    oneshot.channel_scores = recording
    try:
        report = prune(model, reference_task(model), batches, _request(method), example_batch=first_sample(batches[0]))
    finally:
        oneshot.channel_scores = original
    return recorded[0], report["widths"]


SCORED = ("altereva",)  # its DeCI term is SNIP's score: one prune per process covers both reductions


def _score_job(out: Path) -> None:
    result = {method: _prune_recording_scores(method) for method in SCORED}
    torch.save(result, out / f"rank{dist.rank()}.pt")


@pytest.mark.slow  # two torchrun jobs scoring the tiny model; default set: test_thread_repro's torchrun selection
def test_two_ranks_score_and_select_like_one_process(tmp_path):
    ranks = _run_ranks(_score_job, tmp_path)
    for method in SCORED:
        scores, widths = _prune_recording_scores(method)
        for rank, saved in enumerate(ranks):
            rank_scores, rank_widths = saved[method]
            assert _relative(rank_scores, scores) <= SCORE_RTOL, (method, rank, _relative(rank_scores, scores))
            assert rank_widths == widths, (method, rank)


# ---- fine-tuning ---------------------------------------------------------------------------------
def _tiny_train(config, steps: int = 3):
    return dataclasses.replace(config.train, steps=steps, batch_size=4, lr=5e-4, warmup_steps=1, threads=1)


def _samples():
    from fusion.config import get_config
    from fusion.data.dataset import make_sample
    from fusion.task import SCORING_STREAM

    config = get_config("tiny")
    return [make_sample(config, SCORING_STREAM + 7, i) for i in range(8)]


def _fit_job(out: Path) -> None:
    import fusion.train as train_module
    from fusion.checkpoint import load_checkpoint, read_metadata

    saves = []
    original = train_module.save_checkpoint
    train_module.save_checkpoint = lambda *a, **k: saves.append(a[0]) or original(*a, **k)
    model, _ = load_checkpoint(TINY_FUSION)
    train_module.fit(model, _samples(), _tiny_train(model.config), out / "ft", progress=False, sync_bn=True)
    result = {"state": model.state_dict(), "saves": len(saves), "meta": read_metadata(out / "ft")}
    result["generic"] = _generic_finetune()
    torch.save(result, out / f"rank{dist.rank()}.pt")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # a bias before BatchNorm has a zero gradient
        self.body = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.body(x)


def _generic_finetune() -> dict[str, torch.Tensor]:
    """`compress.finetune` on a small conv net with a mean-squared loss, global batch 4."""
    from common.task import Task
    from compress.finetune import finetune

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6, generator=generator), torch.randn(4, 2, 6, 6, generator=generator))]
    task = Task(partition={"fusion": ["body."]}, loss=lambda out, b: ((out - b[1]) ** 2).mean(), inputs=lambda b: b[0])
    model = SmallNet()
    finetune(model, task, batches * 3, steps=3, lr=1e-2, progress=False, sync_bn=True)
    return model.state_dict()


@pytest.mark.slow  # a torchrun fine-tune beside a one-process one
def test_two_ranks_fine_tune_like_one_process_and_rank_0_writes_once(tmp_path):
    from fusion.checkpoint import load_checkpoint, read_metadata
    from fusion.train import fit

    ranks = _run_ranks(_fit_job, tmp_path)
    model, _ = load_checkpoint(TINY_FUSION)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, _samples(), _tiny_train(model.config), tmp_path / "single", progress=False)
    single_loss = read_metadata(tmp_path / "single")["last_loss"]
    generic = _generic_finetune()
    assert [r["saves"] for r in ranks] == [1, 0]  # one checkpoint (3 steps, no intermediate), by rank 0
    assert ranks[0]["meta"]["distributed"] == {"world_size": 2, "sync_bn": True}
    assert abs(ranks[0]["meta"]["last_loss"] - single_loss) <= LOSS_RTOL * abs(single_loss)
    for saved in ranks:
        _assert_same_training(saved["state"], model.state_dict(), start, lr=5e-4)
        _assert_same_training(saved["generic"], generic, SmallNet().state_dict(), lr=1e-2)
    for name, value in ranks[0]["state"].items():  # DDP keeps the ranks bitwise equal
        assert torch.equal(value, ranks[1]["state"][name]), name


# ---- helpers, in one process ----------------------------------------------------------------------
def test_helpers_are_no_ops_in_one_process():
    t = torch.arange(4.0)
    dist.all_reduce_sum_(t)
    dist.broadcast_(t)
    assert t.tolist() == [0, 1, 2, 3] and dist.world() == 1 and dist.is_main()
    assert list(dist.shard_range(5)) == [0, 1, 2, 3, 4] and dist.all_gather_object("x") == ["x"]
    model = SmallNet()
    assert ddp.wrap(model, sync_bn=True) is model and type(model.body[1]) is nn.BatchNorm2d


def test_a_batch_splits_along_dim_0_into_equal_slices():
    batch = {"x": torch.arange(8).view(4, 2), "meta": "keep", "pair": (torch.arange(4), torch.tensor(3.0))}
    first, second = ddp.split_batch(batch, 0, 2), ddp.split_batch(batch, 1, 2)
    assert first["x"].tolist() == [[0, 1], [2, 3]] and second["pair"][0].tolist() == [2, 3]
    assert first["meta"] == "keep" and float(second["pair"][1]) == 3.0
    with pytest.raises(ValueError, match="does not split evenly"):
        ddp.split_batch(torch.zeros(3, 1), 0, 2)


def test_the_digest_tells_tensors_apart():
    assert dist.digest([torch.zeros(2)]) == dist.digest([torch.zeros(2)])
    assert dist.digest([torch.zeros(2)]) != dist.digest([torch.zeros(3)])
    assert dist.digest({"a": torch.ones(2)}) != dist.digest({"a": torch.tensor([1.0, 1.0 + 1e-7])})


# ---- the CLI under torchrun -----------------------------------------------------------------------
def _torchrun(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "altermoma", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", dist.TIMEOUT_ENV: "600"}
    environment.pop(FAULT_ENV, None)
    environment.update(env or {})
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


FAILING_TASK = """
import os
import torch
from torch import nn
import altermoma

calls = []


def loss(outputs, batch):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("injected failure in the loss")
    return ((outputs - batch[1]) ** 2).mean()


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    batches = [(torch.randn(4, 3, 6, 6), torch.randn(4, 2, 6, 6)) for _ in range(2)]
    task = altermoma.Task(partition={"fusion": ["0.", "2."]}, loss=loss, inputs=lambda b: b[0])
    return altermoma.Setup(model=model, task=task, scoring_batches=batches)
"""


@pytest.mark.slow  # a torchrun job; default set: test_thread_repro's torchrun selection
def test_a_failing_rank_stops_the_job_with_its_rank_named_and_writes_nothing(tmp_path):
    from compress.checkpoint import save_pruned

    (tmp_path / "user_task.py").write_text(FAILING_TASK)
    save_pruned(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)), tmp_path / "pruned", {})
    args = ["finetune", "--task", "user_task.py:setup", "--checkpoint", "pruned", "--out", "out", "--steps", "4"]
    run = _torchrun([*args, "--threads", "1"], tmp_path)
    assert run.returncode != 0
    assert "rank 1/2: failed: RuntimeError: injected failure in the loss" in run.stderr, run.stderr[-3000:]
    assert "rank: 1" in run.stderr  # torchrun's summary names the failed rank too
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nothing half-written


@pytest.mark.slow  # 2 torchrun jobs + a reference fine-tune; default set: resume (test_train), kill mid-write (test_faults)
def test_a_killed_distributed_fine_tune_resumes_to_one_checkpoint(tmp_path):
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes
    from fusion.finetune import FinetuneConfig, finetune

    args = ["finetune", "--checkpoint", str(TINY_FUSION), "--out", "out", "--steps", "6", "--scenes", "8"]
    args += ["--threads", "1", "--sync-bn"]
    # A checkpoint passes 10 fault points; the 13th is in the second one (step 4): rank 0 dies writing it.
    killed = _torchrun(args, tmp_path, {FAULT_ENV: "13"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    _, meta = load_checkpoint(tmp_path / "out")
    assert meta["step"] == 2  # the last complete checkpoint, whole
    resumed = _torchrun([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("fine-tuned 6 steps") == 1  # rank 0 alone prints
    model, meta = load_checkpoint(tmp_path / "out")
    assert meta["step"] == 6 and (tmp_path / "out" / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # one checkpoint, no staging leftovers

    single, _ = load_checkpoint(TINY_FUSION)
    start = {k: v.clone() for k, v in single.state_dict().items()}
    config = FinetuneConfig(steps=6, scenes=8, threads=1)
    finetune(single, config, progress=False, train_set=SyntheticScenes(single.config, "train", 8, progress=False))
    _assert_same_training(model.state_dict(), single.state_dict(), start, lr=config.lr)


def test_digest_reads_primitives_and_objects_by_value():
    """Digest encodes values without pickling: equal values agree, any changed field disagrees."""
    from dataclasses import dataclass

    @dataclass
    class Meta:
        name: str
        scale: float

    assert dist.digest([1, 2.5, "a", None]) == dist.digest([1, 2.5, "a", None])
    assert dist.digest([1, 2.5]) != dist.digest([1, 2.5 + 1e-12])
    assert dist.digest(1) != dist.digest(1.0) != dist.digest("1")
    assert dist.digest(Meta("a", 1.0)) == dist.digest(Meta("a", 1.0))
    assert dist.digest(Meta("a", 1.0)) != dist.digest(Meta("a", 2.0))
    assert dist.digest({"k": (1, 2)}) != dist.digest({"k": [1, 2]})
