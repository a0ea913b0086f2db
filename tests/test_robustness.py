"""Robustness evaluation: each corruption does what it says and grows with severity, the corrupted LiDAR is
pillarised from the corrupted sweep, seeds reproduce bit for bit, the table's clean column is `evaluate`'s,
and the command refuses bad arguments with one `error:` line before writing anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from altermoma.cli import main
from fusion.data import corruptions as C
from fusion.geometry import lidar_rays

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "fusion" / "weights"


@pytest.fixture(scope="module")
def sensors(tiny_config):
    return C.sensors_of(tiny_config, "synthetic")


@pytest.fixture(scope="module")
def sweep(tiny_config):
    """One rendered LiDAR sweep (P, 4) of a synthetic scene, in the ego frame."""
    from fusion.data.render import scan_lidar
    from fusion.data.scenes import sample_scene

    rng = np.random.default_rng([5, 0])
    scene = sample_scene(rng, tiny_config.grid, tiny_config.data)
    return scan_lidar(scene, tiny_config.lidar, tiny_config.data, rng)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(4, 3, 32, 48), dtype=np.uint8)


def gen(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- cameras ------------------------------------------------------------------------------------------------


def test_camera_off_blacks_out_that_camera_only(images, sensors):
    for camera in range(4):
        out = C.corrupt_images(images, f"camera_off_{camera}", None, gen(), sensors)
        assert (out[camera] == 0).all()
        others = [i for i in range(4) if i != camera]
        assert np.array_equal(out[others], images[others])
    assert not C.corrupt_images(images, "cameras_off", None, gen(), sensors).any()
    assert images.any()  # the input is never changed in place


def test_image_corruptions_grow_with_severity(images, sensors):
    ref = images.astype(float)
    change, blur_edges, brightness, black = [], [], [], []
    for severity in C.SEVERITIES:
        noisy = C.corrupt_images(images, "camera_noise", severity, gen(), sensors)
        change.append(np.abs(noisy.astype(float) - ref).mean())
        blurred = C.corrupt_images(images, "camera_blur", severity, gen(), sensors).astype(float)
        blur_edges.append(np.abs(np.diff(blurred, axis=-1)).mean())
        brightness.append(C.corrupt_images(images, "camera_dark", severity, gen(), sensors).astype(float).mean())
        occluded = C.corrupt_images(images, "camera_occlusion", severity, gen(), sensors)
        patch = (occluded == 0).all(axis=1) & (images != 0).any(axis=1)  # pixels blacked out by the patch
        black.append(patch.mean(axis=(1, 2)))
        assert occluded.dtype == noisy.dtype == np.uint8 and occluded.shape == images.shape
    assert change == sorted(change) and blur_edges == sorted(blur_edges, reverse=True)
    assert brightness == sorted(brightness, reverse=True)
    assert brightness[0] == pytest.approx(ref.mean() * C.DARK_FACTOR[0], rel=0.05)
    for covered, area in zip(black, C.OCCLUSION_AREA):  # each camera: one patch of the documented area
        assert covered == pytest.approx(np.full(4, area), abs=0.03)
    floats = C.image_noise(images / 255.0, 0.1, gen())  # float images in [0, 1] come back as floats
    assert floats.dtype == np.float64 and 0.0 <= floats.min() and floats.max() <= 1.0


# ---- LiDAR ------------------------------------------------------------------------------------------------


def test_lidar_off_and_sector(sweep, sensors):
    assert C.corrupt_points(sweep, "lidar_off", None, gen(), sensors).shape == (0, 4)
    counts = []
    for severity, fov in zip(C.SEVERITIES, C.SECTOR_DEG):
        kept = C.corrupt_points(sweep, "lidar_sector", severity, gen(), sensors)
        assert (np.abs(C.azimuth_deg(kept)) <= fov / 2).all()  # synthetic: forward is the ego x axis
        outside = np.abs(C.azimuth_deg(sweep)) > fov / 2
        assert len(kept) == len(sweep) - outside.sum()
        counts.append(len(kept))
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == pytest.approx(len(sweep) / 3, rel=0.25)  # 120 of 360 degrees (the scene is not uniform)
    front = C.lidar_sector(sweep, 60.0, forward_deg=90.0)  # nuScenes' LiDAR frame looks along +y
    assert (np.abs(C.azimuth_deg(front) - 90.0) <= 30.0).all()


def test_ring_of_every_point_is_its_beam_and_beams_reduced_keep_the_right_rings(tiny_config, sweep, sensors):
    lidar = tiny_config.lidar
    dirs = lidar_rays(lidar)  # (beams, azimuths, 3): points on every beam at random ranges, float32 as rendered
    ranges = np.random.default_rng(1).uniform(2.0, 40.0, size=dirs.shape[:2] + (1,))
    points = (np.array(sensors.lidar_origin) + ranges * dirs).reshape(-1, 3).astype(np.float32)
    beam = np.repeat(np.arange(lidar.num_beams), dirs.shape[1])
    assert np.array_equal(C.ring_index(points, lidar.num_beams, lidar.elevation_deg, sensors.lidar_origin), beam)
    for severity, step in zip(C.SEVERITIES, C.BEAM_STEP):
        kept = C.corrupt_points(points, "lidar_beams", severity, gen(), sensors)
        rings = np.unique(C.ring_index(kept, lidar.num_beams, lidar.elevation_deg, sensors.lidar_origin))
        assert np.array_equal(rings, np.arange(0, lidar.num_beams, step))  # 32 -> 16, 8, 4, 2, 1 beams
        assert len(kept) == len(rings) * dirs.shape[1]
    rendered = C.ring_index(sweep, lidar.num_beams, lidar.elevation_deg, sensors.lidar_origin)
    elevation = np.degrees(np.arctan2(sweep[:, 2] - lidar.mount_height, np.hypot(sweep[:, 0], sweep[:, 1])))
    beam_elevations = np.linspace(*lidar.elevation_deg, lidar.num_beams)
    assert np.abs(elevation - beam_elevations[rendered]).max() < 1e-3  # the renderer's range noise keeps the ray


def test_point_dropout_keeps_the_documented_fraction(sweep, sensors):
    kept = [len(C.corrupt_points(sweep, "point_dropout", s, gen(s), sensors)) / len(sweep) for s in C.SEVERITIES]
    for fraction, drop in zip(kept, C.POINT_DROP):
        assert fraction == pytest.approx(1 - drop, abs=4 * math.sqrt(drop * (1 - drop) / len(sweep)))
    assert kept == sorted(kept, reverse=True)


def test_extrinsic_error_is_the_documented_rigid_motion_about_the_lidar(sweep, sensors):
    origin = np.array(sensors.lidar_origin)
    for severity, (degrees, metres) in zip(C.SEVERITIES, C.EXTRINSIC):
        moved = C.corrupt_points(sweep, "extrinsic", severity, gen(7), sensors)
        rotation, shift = C.extrinsic_error(degrees, metres, gen(7))  # the same draws
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.linalg.det(rotation) == pytest.approx(1.0)
        angle = math.degrees(math.acos((np.trace(rotation) - 1) / 2))
        assert angle == pytest.approx(degrees, abs=1e-6) and np.linalg.norm(shift) == pytest.approx(metres)
        expected = (sweep[:, :3] - origin) @ rotation.T + origin + shift
        assert np.abs(moved[:, :3] - expected).max() < 1e-4
        assert np.array_equal(moved[:, 3], sweep[:, 3])  # intensity unchanged


def test_names_expand_and_unknown_names_and_severities_are_refused():
    assert C.parse_names("camera_off,lidar_off", 4) == [f"camera_off_{i}" for i in range(4)] + ["lidar_off"]
    assert C.parse_names("all", 2) == C.all_names(2)
    assert "lidar_beams" in C.parse_names("sensor_failures", 4) and "camera_blur" not in C.parse_names(
        "sensor_failures", 4
    )
    with pytest.raises(C.CorruptionError, match="unknown corruption 'fog'"):
        C.parse_names("lidar_off,fog", 4)
    with pytest.raises(C.CorruptionError, match="cameras 0..3"):
        C.parse_names("camera_off_4", 4)
    with pytest.raises(C.CorruptionError, match="1..5"):
        C.check_severities([0, 3])


# ---- the data path ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def val(tiny_config):
    from fusion.data.source import DataSource, open_split

    return open_split(tiny_config, DataSource(), "val", num_scenes=2, progress=False)


def test_corrupted_sweep_is_pillarised_and_everything_else_stays_clean(tiny_config, val):
    """make_sample's points_transform: the identity gives the clean sample bit for bit; LiDAR off leaves the
    pillars empty and every other array (images, targets) clean, and is what CorruptedScenes serves without
    rendering the scene again."""
    from altermoma.robust import CorruptedScenes
    from fusion.data.dataset import make_sample

    clean = make_sample(tiny_config, 1, 0)
    same = make_sample(tiny_config, 1, 0, points_transform=lambda p: p)
    assert all(np.array_equal(clean[k], same[k]) and clean[k].strides == same[k].strides for k in clean)
    off = make_sample(tiny_config, 1, 0, points_transform=C.lidar_off)
    assert clean["pillar_map"].any() and not off["pillar_map"].any() and not off["pillars"].any()
    assert all(np.array_equal(clean[k], off[k]) for k in clean if k not in ("pillars", "pillar_map"))
    served = CorruptedScenes(val, "lidar_off", None)[0]  # val scene 0 is stream 1, scene 0
    assert all(np.array_equal(served[k], off[k]) for k in off) and served.keys() == off.keys()


@pytest.fixture(scope="module")
def fusion_model():
    from fusion.checkpoint import load_checkpoint

    return load_checkpoint(SHIPPED / "tiny-fusion")[0]


def test_clean_column_is_evaluate_and_a_rerun_reproduces_bit_for_bit(val, fusion_model):
    import altermoma
    from altermoma.robust import CorruptedScenes, markdown_table
    from fusion.evaluate import evaluate

    result = altermoma.robustness(fusion_model, None, val, ["lidar_off", "camera_noise"], [2], seed=3, progress=False)
    clean = evaluate(fusion_model, val, progress=False)
    assert result["clean"]["model"] == {k: v for k, v in clean.items() if isinstance(v, float)}
    assert f"| clean | | | {clean['mAP']:.4f} |" in markdown_table(result)
    rows = {(r["corruption"], r["severity"]): r for r in result["rows"]}
    assert set(rows) == {("lidar_off", None), ("camera_noise", 2)}
    again = evaluate(fusion_model, CorruptedScenes(val, "camera_noise", 2, seed=3), progress=False)
    assert rows["camera_noise", 2]["metrics"]["mAP"] == again["mAP"]  # the same noise, drawn again
    assert rows["lidar_off", None]["ratios"]["mAP"] == rows["lidar_off", None]["metrics"]["mAP"] / clean["mAP"]
    first = CorruptedScenes(val, "camera_noise", 2, seed=3)[1]["images"]
    assert np.array_equal(first, CorruptedScenes(val, "camera_noise", 2, seed=3)[1]["images"])
    assert not np.array_equal(first, CorruptedScenes(val, "camera_noise", 2, seed=4)[1]["images"])
    pillars = CorruptedScenes(val, "camera_noise", 2, seed=3)[1]["pillars"]
    assert np.array_equal(pillars, val[1]["pillars"])  # a camera corruption leaves the LiDAR alone


def test_own_model_with_a_task_and_callable_corruptions():
    """A user model: batches of their own format, corruptions as callables, scored by the Task's mean loss."""
    from altermoma.robust import robustness
    from common.task import Task

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    task = Task(
        {"fusion": ["weight", "bias"]}, loss=lambda out, b: ((out - b["y"]) ** 2).mean(), inputs=lambda b: (b["x"],)
    )
    seen = []

    def noise(batch, severity, rng):
        seen.append(rng.random())
        return {**batch, "x": batch["x"] + severity * torch.from_numpy(rng.normal(size=(4, 3))).float()}

    result = robustness({"mine": model}, task, batches, {"noise": noise}, severities=[1, 5], seed=0, progress=False)
    losses = [r["metrics"]["loss"] for r in result["rows"]]
    assert losses[1] > losses[0] > result["clean"]["mine"]["loss"]
    assert [r["ratios"]["loss"] for r in result["rows"]] == [v / result["clean"]["mine"]["loss"] for v in losses]
    again = robustness({"mine": model}, task, batches, {"noise": noise}, severities=[1, 5], seed=0, progress=False)
    assert again["rows"] == result["rows"] and seen[:6] == seen[6:]
    with pytest.raises(ValueError, match="reference data sets"):
        robustness(model, task, batches, ["lidar_off"], progress=False)


# ---- the command ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corruptions", "lidar_off,fog"], "unknown corruption 'fog'"),
        (["--corruptions", "camera_off_9"], "cameras 0..3"),
        (["--severity", "6"], "must be 1..5"),
        (["--severities", "1,0"], "must be 1..5"),
        (["--checkpoint", str(SHIPPED / "tiny-balanced-lidar")], "reads other inputs"),
    ],
)
def test_command_refuses_bad_arguments_with_one_error_line(tmp_path, capsys, extra, message):
    out = tmp_path / "r"
    argv = ["robustness", "--checkpoint", str(SHIPPED / "tiny-fusion"), "--out", str(out), "--scenes", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_command_refuses_an_out_folder_that_is_an_input(capsys):
    checkpoint = str(SHIPPED / "tiny-camera")
    before = sorted(p.name for p in Path(checkpoint).iterdir())
    assert main(["robustness", "--checkpoint", checkpoint, "--out", checkpoint]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--out" in err[0]
    assert sorted(p.name for p in Path(checkpoint).iterdir()) == before


@pytest.mark.slow
def test_command_writes_table_plots_and_json_on_shipped_checkpoints(tmp_path, capsys):
    out = tmp_path / "r"
    models = [str(SHIPPED / f"tiny-{m}") for m in ("fusion", "camera", "lidar")]
    argv = ["robustness", *(w for m in models for w in ("--checkpoint", m)), "--out", str(out), "--scenes", "4"]
    assert main([*argv, "--severities", "1,3", "--corruptions", "sensor_failures,camera_dark", "--threads", "1"]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["models"] == models and report["scenes"] == 4
    names = {r["corruption"] for r in report["rows"]}
    assert names == {"cameras_off", *(f"camera_off_{i}" for i in range(4)), "lidar_off", "lidar_sector"} | {
        "lidar_beams",
        "point_dropout",
        "camera_dark",
    }
    rows = {(r["model"], r["corruption"], r["severity"]): r["metrics"]["mAP"] for r in report["rows"]}
    assert rows[models[2], "lidar_off", None] == 0.0 and rows[models[1], "cameras_off", None] == 0.0
    assert rows[models[2], "cameras_off", None] == report["clean"][models[2]]["mAP"]  # LiDAR-only: cameras unread
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        ["lidar_sector.png", "lidar_beams.png", "point_dropout.png", "camera_dark.png", "sensor_failures.png"]
    )
    assert "| clean |" in (out / "robustness.md").read_text() and "| clean |" in capsys.readouterr().out
    json_file = tmp_path / "e.json"
    assert (
        main(["evaluate", "--checkpoint", models[0], "--scenes", "4", "--threads", "1", "--json", str(json_file)]) == 0
    )
    assert json.loads(json_file.read_text())["mAP"] == report["clean"][models[0]]["mAP"]


@pytest.mark.slow
def test_sparse_encoder_and_a_nuscenes_root(tmp_path):
    """LiDAR off reaches the sparse voxel encoder as an empty cloud; on a nuScenes root the sweeps are corrupted
    as they are read and the whole split is scored with the nuScenes metric."""
    from altermoma.robust import CorruptedScenes, robustness
    from fusion.checkpoint import save_checkpoint
    from fusion.config import get_config
    from fusion.data.dataset import collate, make_sample, model_inputs
    from fusion.data.nuscenes import NuScenesDataset
    from fusion.models.bevfusion import build_model

    config = get_config("bevfusion-tiny")
    sample = make_sample(config, 1, 0, points_transform=C.lidar_off)
    with torch.no_grad():
        outputs = build_model(config, "fusion").eval()(**model_inputs(collate([sample])))
    assert torch.isfinite(outputs["query_heatmap"]).all()

    root = tmp_path / "nus"
    argv = ["data", "export-nuscenes", "--out", str(root), "--scenes", "2", "--samples-per-scene", "2"]
    assert main(argv) == 0
    config = get_config("nuscenes-tiny")
    data = NuScenesDataset(config, root, "v1.0-mini", "val")
    clean, off = data[0], CorruptedScenes(data, "lidar_off", None)[0]
    assert clean["pillar_map"].any() and not off["pillar_map"].any()
    assert np.array_equal(clean["images"], off["images"]) and clean["sample_token"] == off["sample_token"]
    sector = CorruptedScenes(data, "lidar_sector", 3)[0]  # 60 degrees around the LiDAR frame's +y: ahead
    occupied = np.flatnonzero(sector["pillar_map"])
    assert 0 < len(occupied) < (clean["pillar_map"] > 0).sum()
    assert (occupied // config.grid.size_x >= config.grid.size_y // 2 - 1).all()  # every pillar at y >= 0
    torch.manual_seed(0)
    model = build_model(config, "fusion")
    result = robustness(model, None, data, ["lidar_off", "camera_off_0"], progress=False)
    assert {r["corruption"] for r in result["rows"]} == {"lidar_off", "camera_off_0"}
    save_checkpoint(tmp_path / "ckpt", model, {})
    out = tmp_path / "r"
    cli = ["robustness", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--corruptions", "lidar_beams"]
    assert main([*cli, "--severity", "2", "--data", "nuscenes", "--dataroot", str(root), "--threads", "1"]) == 0
    assert json.loads((out / "robustness.json").read_text())["data"] == "nuscenes"


def test_the_failsafe_method_of_the_robustness_benchmark_is_altereva_with_the_failure_weight(tmp_path):
    from benchmarks.robustness_compare import prune_step

    step = prune_step(Path("fusion/weights/tiny-fusion"), "altereva-failsafe", 2, 0.5, tmp_path / "p", 1)
    argv = step.argv
    assert argv[argv.index("--method") + 1] == "altereva" and argv[argv.index("--failure-weight") + 1] == "1"
    assert argv[argv.index("--seed") + 1] == "2" and not step.done()
    plain = prune_step(Path("fusion/weights/tiny-fusion"), "snip", 0, 0.5, tmp_path / "q", 1).argv
    assert "--failure-weight" not in plain and plain[plain.index("--method") + 1] == "snip"


def test_a_model_pruned_under_other_altereva_defaults_is_not_a_done_step(tmp_path, monkeypatch):
    """The benchmark resumes finished steps; a model AlterEva pruned before its defaults moved is not one."""
    import dataclasses

    import benchmarks.robustness_compare as bench
    from compress.altereva import AlterEvaConfig

    options = dataclasses.asdict(AlterEvaConfig())
    request = {"method": "altereva", "seed": 0, "target_gflops": 0.5, "altereva": options}
    meta = {"pruning": {"request": request}}
    monkeypatch.setattr(bench, "checkpoint_meta", lambda folder: meta)
    step = bench.prune_step(Path("fusion/weights/tiny-fusion"), "altereva", 0, 0.5, tmp_path / "p", 1)
    assert step.done()
    old = {k: v for k, v in options.items() if k != "failure_weight"}  # made before that option existed
    meta["pruning"]["request"]["altereva"] = old | {"reactivation_optimizer": "adamw", "subtract_noise": False}
    assert not step.done()
    meta["pruning"]["request"] = {"method": "snip", "seed": 0, "target_gflops": 0.5}
    assert bench.prune_step(Path("fusion/weights/tiny-fusion"), "snip", 0, 0.5, tmp_path / "q", 1).done()
