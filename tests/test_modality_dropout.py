"""Modality dropout during fine-tuning: a dropped sample has black images or an empty sweep's LiDAR inputs,
never both, at the rate asked for, the same drops for the same seed, and p = 0 fine-tunes bit for bit as before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import fusion.finetune as F
from altermoma.cli import main
from fusion.checkpoint import CheckpointError
from fusion.data.sparse_inputs import lidar_arrays
from fusion.models.bevfusion import build_model
from fusion.train import batch_indices, fit

SHIPPED = Path(__file__).resolve().parent.parent / "fusion" / "weights"
LIDAR_KEYS = ("pillars", "pillar_map")


def empty_sweep(config) -> dict[str, np.ndarray]:
    return lidar_arrays(np.zeros((0, config.lidar.point_features), np.float32), config, np.random.default_rng(0))


def same(a: dict, b: dict, keys) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in keys)


def test_dropped_samples_lose_exactly_one_sensor(tiny_config, tiny_samples):
    empty = empty_sweep(tiny_config)
    assert not empty["pillars"].any() and not same(tiny_samples[0], empty, LIDAR_KEYS)  # a real sweep differs
    data = F.ModalityDropout(tiny_samples, 0.6, seed=3, config=tiny_config)
    seen = {"camera": 0, "lidar": 0, None: 0}
    for step in range(6):
        for index, clean in enumerate(tiny_samples):
            dropped = F.dropped_modality(0.6, 3, step, index)
            sample = data[index]
            seen[dropped] += 1
            others = [k for k in clean if k not in ("images", *LIDAR_KEYS)]
            assert same(sample, clean, others)  # targets and labels are never touched
            if dropped == "camera":
                assert sample["images"].dtype == clean["images"].dtype and not sample["images"].any()
                assert same(sample, clean, LIDAR_KEYS)
            elif dropped == "lidar":
                assert same(sample, empty, LIDAR_KEYS) and np.array_equal(sample["images"], clean["images"])
            else:
                assert same(sample, clean, clean.keys())
            assert sample["images"].any() or not same(sample, empty, LIDAR_KEYS)  # never both
        data.advance()
    assert min(seen.values()) > 0  # 48 draws at p = 0.6 saw every case
    assert clean["images"].any()  # the stored samples are never changed in place


def test_rate_is_p_split_evenly_and_never_both():
    for p in (0.3, 0.8):
        draws = [F.dropped_modality(p, 0, step, index) for step in range(60) for index in range(60)]
        camera, lidar = draws.count("camera") / len(draws), draws.count("lidar") / len(draws)
        assert camera == pytest.approx(p / 2, abs=0.025) and lidar == pytest.approx(p / 2, abs=0.025)
        assert set(draws) <= {"camera", "lidar", None}  # one answer per draw: never both sensors
    assert {F.dropped_modality(0.0, 0, s, i) for s in range(20) for i in range(20)} == {None}


def test_same_seed_same_drops_in_any_order():
    def drops(seed: int, order) -> dict:
        return {(s, i): F.dropped_modality(0.4, seed, s, i) for s in range(20) for i in order}

    forward = drops(7, range(30))
    assert forward == drops(7, list(reversed(range(30))))  # reading order (batch composition) changes nothing
    assert forward != drops(8, range(30))
    by_step = [[forward[(s, i)] for i in range(30)] for s in range(20)]
    assert by_step[0] != by_step[1]  # a sample is dropped afresh at every step


def test_probability_is_checked():
    for bad in (1.0, -0.1, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="modality dropout"):
            F.check_modality_dropout(bad)
    assert F.check_modality_dropout(0) == 0.0


def tuned_model(config):
    torch.manual_seed(0)
    return build_model(config, "fusion")


def test_p0_fine_tunes_bit_for_bit_as_before(tiny_config, tiny_samples):
    tune = F.FinetuneConfig(steps=1, batch_size=1, threads=1)  # modality_dropout 0.0
    ours = F.finetune(tuned_model(tiny_config), tune, train_set=tiny_samples[:4], progress=False)
    train = dataclasses.replace(  # the fine-tune as it was before the option existed: fit on the samples
        tiny_config.train, steps=1, lr=tune.lr, batch_size=1, warmup_steps=0, seed=0, threads=1, checkpoint_every=1
    )
    before = fit(tuned_model(tiny_config), tiny_samples[:4], train, progress=False)
    for (name, a), b in zip(ours.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), name


def test_fit_reads_each_step_with_its_drops_and_resume_keeps_p(tiny_config, tiny_samples, tmp_path, monkeypatch):
    calls = []
    real = F.dropped_modality
    monkeypatch.setattr(
        F, "dropped_modality", lambda p, seed, step, i: calls.append((step, i)) or real(p, seed, step, i)
    )
    tune = F.FinetuneConfig(steps=1, batch_size=1, threads=1, seed=5, modality_dropout=0.5)
    run, data = tmp_path / "run", tiny_samples[:4]
    F.finetune(tuned_model(tiny_config), tune, run, train_set=data, progress=False)
    assert calls == [(0, batch_indices(4, 1, 5, 0)[0])]  # the trainer's step and batch
    longer = dataclasses.replace(tune, steps=2)
    F.finetune(tuned_model(tiny_config), longer, run, resume=True, train_set=data, progress=False)
    assert calls[1:] == [(1, batch_indices(4, 1, 5, 1)[0])]  # a resumed run goes on with the next step's drops
    with pytest.raises(CheckpointError, match="modality dropout was 0.5, now 0"):
        again = dataclasses.replace(tune, steps=2, modality_dropout=0.0)
        F.finetune(tuned_model(tiny_config), again, run, resume=True, train_set=data, progress=False)
    with pytest.raises(ValueError, match="needs a fusion model"):
        F.finetune(build_model(tiny_config, "lidar"), tune, train_set=data, progress=False)


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "half"])
def test_cli_refuses_a_probability_outside_0_1(value, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(out), "--modality-dropout", value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--modality-dropout" in err[0]
    assert main(["pipeline", "--out", str(out), "--modality-dropout", value]) == 2
    assert not out.exists()


def test_cli_refuses_dropout_where_it_does_not_apply(tmp_path, capsys):
    out = tmp_path / "out"
    lidar = ["finetune", "--checkpoint", str(SHIPPED / "tiny-lidar"), "--out", str(out), "--modality-dropout", "0.3"]
    task = ["finetune", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--task", "x.py:setup", "--out", str(out)]
    for argv, words in ((lidar, "needs a fusion model"), ([*task, "--modality-dropout", "0.3"], "--task models")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
    assert not out.exists()


def test_cli_finetune_seed_changes_the_data_order_and_is_recorded(tmp_path, capsys):
    from safetensors.torch import load_file

    from fusion.checkpoint import WEIGHTS, read_metadata

    def tune(seed: str, name: str) -> dict:
        out = tmp_path / name
        argv = ["finetune", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(out), "--steps", "1"]
        assert main([*argv, "--scenes", "4", "--threads", "1", "--seed", seed]) == 0
        assert read_metadata(out)["finetune"]["seed"] == int(seed)
        return load_file(out / WEIGHTS)

    first, again, other = tune("0", "a"), tune("0", "b"), tune("3", "c")
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same seed: the same weights
    assert any(not torch.equal(first[k], other[k]) for k in first)  # another seed: other batches
    capsys.readouterr()
    assert (
        main(["finetune", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(tmp_path / "d"), "--seed", "-1"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--seed" in err[0]
