"""nuScenes data path: per-calibration camera geometry, the writer of nuScenes-format roots, the reader.

A written root is read back and compared with what was rendered (boxes, points, calibrations, images),
the per-sample geometry is checked against the model's fixed-rig buffers, a model trains on a written
root, and each kind of bad data gets an error naming the file or token.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fusion.config import get_config
from fusion.data.camera_geometry import (
    CameraCalibration,
    FrustumCache,
    bake_calibration,
    frustum_cells_for,
    frustum_points,
    num_frustum_points,
    resize_crop,
    rig_calibration,
)
from fusion.data.dataset import collate, model_inputs
from fusion.data.nuscenes import NuScenesDataset
from fusion.data.nuscenes_tables import DETECTION_CLASSES, NuScenesFormatError, pose_matrix
from fusion.data.nuscenes_write import RENDER_OFFSET_X, write_nuscenes_root
from fusion.models.bevfusion import build_model, example_inputs, pool_method_as
from fusion.models.lss import frustum_cells


@pytest.fixture(scope="module")
def config():
    return get_config("nuscenes-tiny")


@pytest.fixture(scope="module")
def root(tmp_path_factory, config):
    """Two scenes (one of mini_val, one of mini_train), 3 key frames each, 2 sweeps per key frame."""
    out = tmp_path_factory.mktemp("nuscenes") / "root"
    summary = write_nuscenes_root(out, scenes=2, config=config, samples_per_scene=3, progress=False, keep_truth=True)
    return out, summary


def calibration_with_random_extrinsics(config, seed: int) -> CameraCalibration:
    """The preset's rig, each camera turned and moved a little (another car), images resized and cropped."""
    rig = rig_calibration(config)
    rng = np.random.default_rng(seed)
    transforms = rig.camera_to_frame.copy()
    for t in transforms:
        a, b = rng.normal(0.0, 0.05, size=2)
        turn = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
        t[:3, :3] = turn @ t[:3, :3] @ tilt
        t[:3, 3] += rng.normal(0.0, 0.3, size=3)
    h, w = config.rig.image_height, config.rig.image_width
    aug = resize_crop(round(h * 1.6), round(w * 1.25), h, w)[3]
    k = rig.intrinsics.copy() * 1.25
    k[:, 2, 2] = 1.0
    return CameraCalibration(k, transforms, np.tile(aug, (config.rig.num_cameras, 1, 1)))


# ------------------------------------------------------------------------------------------ presets


def test_nuscenes_presets():
    full = get_config("nuscenes")
    assert (full.rig.num_cameras, full.rig.image_height, full.rig.image_width) == (6, 256, 704)
    assert (full.grid.x_range, full.grid.size_x, full.lidar.sweeps, full.lidar.point_features) == (
        (-54.0, 54.0),
        180,
        9,
        5,
    )
    assert full.data.classes == DETECTION_CLASSES and not full.model.seg_head
    tiny = get_config("nuscenes-tiny")
    assert tiny.rig.num_cameras == 6 and tiny.grid.x_range == (-54.0, 54.0) and tiny.data.classes == DETECTION_CLASSES
    assert get_config("tiny").lidar.point_features == 4 and get_config("tiny").rig.channels == ()


# ------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("preset", ["tiny", "nuscenes-tiny", "r50"])
def test_rig_calibration_gives_the_models_constant_cells(preset):
    config = get_config(preset)
    cells = frustum_cells_for(config, rig_calibration(config))
    assert cells.shape == (num_frustum_points(config),)
    np.testing.assert_array_equal(cells, frustum_cells(config))


@pytest.mark.parametrize("preset", ["tiny", "nuscenes-tiny"])
def test_forward_with_rig_frustum_cells_equals_fixed_rig_forward(preset):
    torch.manual_seed(0)
    config = get_config(preset)
    model = build_model(config).eval()
    inputs = example_inputs(config, batch_size=2)
    cells = torch.from_numpy(frustum_cells_for(config, rig_calibration(config))).expand(2, -1)
    with torch.no_grad():
        fixed = model(**inputs)
        per_sample = model(**inputs, frustum_cells=cells)
    for key in fixed:
        torch.testing.assert_close(per_sample[key], fixed[key], rtol=0, atol=1e-6)


def test_per_sample_geometry_differs_per_sample_and_bakes_for_export(config):
    """Two calibrations in one batch pool differently; baking one into the buffers reproduces its sample
    in both pooling forms (the fixed-rig export path)."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    inputs = example_inputs(config, batch_size=1)
    other = calibration_with_random_extrinsics(config, seed=1)
    cells = [frustum_cells_for(config, rig_calibration(config)), frustum_cells_for(config, other)]
    assert (cells[0] != cells[1]).mean() > 0.2
    images = torch.cat([inputs["images"], inputs["images"]])
    with torch.no_grad():
        both = model.camera(images, torch.from_numpy(np.stack(cells)))  # camera BEV features (2, C, Y, X)
        assert (both[0] - both[1]).abs().max() > 0.1 * both.abs().max()
        bake_calibration(model, config, other)
        for method in ("scatter", "cumsum"):
            with pool_method_as(model, method):
                baked = model.camera(inputs["images"])
            torch.testing.assert_close(baked[0], both[1], rtol=1e-5, atol=1e-5)
        model(**inputs)  # the whole model runs with the baked geometry


def test_cells_outside_the_grid_add_nothing(config):
    model = build_model(config).eval()
    pool = model.camera.vtransform.pool
    points = torch.rand(1, 3, num_frustum_points(config))
    outside = torch.full((1, points.shape[2]), -1, dtype=torch.int64)
    outside[0, :5] = pool.num_cells + 7  # out of range is dropped too
    assert pool(points, outside).abs().max() == 0
    one = outside.clone()
    one[0, 10] = 3
    canvas = pool(points, one)
    assert canvas.shape == (1, 3, pool.num_cells)
    torch.testing.assert_close(canvas[0, :, 3], points[0, :, 10])
    assert canvas.abs().sum() == canvas[0, :, 3].abs().sum()


def test_frustum_cache_computes_once_per_calibration(config):
    cache = FrustumCache(config, max_entries=2)
    rig, other = rig_calibration(config), calibration_with_random_extrinsics(config, seed=2)
    first = cache(rig)
    assert cache(rig) is first and cache.misses == 1
    cache(other)
    assert cache.misses == 2 and not first.flags.writeable


def test_resize_crop_matrix_matches_pillow():
    """A bright pixel of the raw image lands where the matrix says, after Pillow's resize and crop."""
    raw = np.zeros((135, 240, 3), dtype=np.uint8)
    raw[100:102, 60:62] = 255  # a 2x2 block centred at raw (u, v) = (61, 101), continuous coordinates
    _, (new_h, new_w), (top, left), aug = resize_crop(135, 240, 64, 192)
    assert (new_h, new_w, top, left) == (108, 192, 44, 0)
    image = Image.fromarray(raw).resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + 192, top + 64))
    pixels = np.asarray(image).astype(float).sum(-1)
    v, u = np.unravel_index(pixels.argmax(), pixels.shape)
    expected = aug @ [61.0, 101.0, 1.0]
    assert abs(u + 0.5 - expected[0]) <= 1.0 and abs(v + 0.5 - expected[1]) <= 1.0
    with pytest.raises(ValueError, match="rows high"):
        resize_crop(40, 240, 64, 192)


# ------------------------------------------------------------------------------------------ round trip


def test_written_root_has_official_layout(root):
    out, summary = root
    assert summary["scenes"] == ["scene-0103", "scene-0061"]  # mini_val, mini_train
    tables = {p.stem for p in (out / "v1.0-mini").glob("*.json")}
    assert len(tables) == 13
    assert len(list((out / "samples" / "CAM_FRONT").glob("*.jpg"))) == 6
    assert len(list((out / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))) == 6
    assert len(list((out / "sweeps" / "LIDAR_TOP").glob("*.pcd.bin"))) == 12
    calibrated = json.loads((out / "v1.0-mini" / "calibrated_sensor.json").read_text())
    cameras = [c for c in calibrated if c["camera_intrinsic"]]
    assert len(cameras) == 12 and len(calibrated) == 14  # 6 cameras + LIDAR_TOP per log
    categories = {c["name"] for c in json.loads((out / "v1.0-mini" / "category.json").read_text())}
    assert {"vehicle.car", "human.pedestrian.adult"} <= categories
    maps = json.loads((out / "v1.0-mini" / "map.json").read_text())
    assert all((out / m["filename"]).is_file() for m in maps)


def test_round_trip_boxes_points_calibrations(root, config):
    out, summary = root
    truth = summary["truth"]
    total_boxes = 0
    for split in ("mini_train", "mini_val"):
        dataset = NuScenesDataset(config, out, "v1.0-mini", split)
        assert len(dataset) == 3
        for index in range(len(dataset)):
            sample = dataset[index]
            plan, expected = dataset.plans[index], dict(truth[sample["sample_token"]])
            x, y = expected["boxes"][:, 0], expected["boxes"][:, 1]
            inside = (np.abs(x) < 54.0) & (np.abs(y) < 54.0)  # the reader keeps boxes on the BEV grid
            for key in ("boxes", "labels", "velocities"):
                expected[key] = expected[key][inside]
            count = len(expected["boxes"])
            total_boxes += count
            np.testing.assert_array_equal(sample["labels"][:count], expected["labels"])
            assert (sample["labels"][count:] == -1).all()
            np.testing.assert_allclose(sample["boxes"][:count, :6], expected["boxes"][:, :6], atol=1e-4)
            yaw_error = np.angle(np.exp(1j * (sample["boxes"][:count, 6] - expected["boxes"][:, 6])))
            assert np.abs(yaw_error).max() < 1e-5
            np.testing.assert_allclose(sample["velocities"][:count], expected["velocities"], atol=1e-4)
            np.testing.assert_allclose(sample["lidar_to_global"], expected["lidar_to_global"], atol=1e-9)
            np.testing.assert_allclose(sample["camera_to_lidar"], expected["camera_to_lidar"], atol=1e-9)
            np.testing.assert_allclose(sample["camera_intrinsics"][0], expected["intrinsics"], atol=1e-9)
            # Points: every file moved into the key-frame LiDAR frame, time lag as the fifth column.
            points = dataset.points(plan)
            merged = []
            for k, file in enumerate(expected["files"]):
                xyz = file["lidar_points"].astype(np.float32).astype(np.float64)
                if k > 0:
                    keep = np.hypot(xyz[:, 0], xyz[:, 1]) >= 1.0
                    xyz, intensity = xyz[keep], file["intensity"][keep]
                else:
                    intensity = file["intensity"]
                moved = xyz @ file["to_key"][:3, :3].T + file["to_key"][:3, 3]
                merged.append(np.c_[moved, intensity, np.full(len(moved), file["time_lag"])])
            merged = np.concatenate(merged)
            assert points.shape == merged.shape and points.dtype == np.float32
            np.testing.assert_allclose(points[:, :3], merged[:, :3], atol=2e-4)
            np.testing.assert_allclose(points[:, 3], merged[:, 3], atol=1e-5)
            np.testing.assert_allclose(points[:, 4], merged[:, 4], atol=1e-6)
            np.testing.assert_allclose(np.unique(points[:, 4]), [0.0, 1 / 6, 2 / 6], atol=1e-6)
            # Images: the rendered ones, resized and cropped, within JPEG error.
            h, w = config.rig.image_height, config.rig.image_width
            raw = expected["images"]
            _, (new_h, new_w), (top, left), _ = resize_crop(raw.shape[2], raw.shape[3], h, w)
            for n in range(raw.shape[0]):
                reference = Image.fromarray(raw[n].transpose(1, 2, 0)).resize((new_w, new_h), Image.BILINEAR)
                reference = np.asarray(reference.crop((left, top, left + w, top + h))).transpose(2, 0, 1)
                assert np.abs(sample["images"][n].astype(float) - reference).mean() < 3.0
    assert total_boxes > 20


def test_read_calibration_lifts_along_the_rendered_rays(root, config):
    """The frustum points of the calibration read back equal the renderer's own camera rays, expressed in
    the LiDAR frame (the raw images' rig, no augmentation): the geometry the model pools with is the one
    the pixels were drawn with."""
    out, summary = root
    dataset = NuScenesDataset(config, out, "v1.0-mini", "mini_val")
    plan = dataset.plans[0]
    raw_h, raw_w = summary["camera_size"]
    raw_config = get_config("nuscenes-tiny", {"rig.image_height": 160, "rig.image_width": 256})
    raw_config.rig.image_height, raw_config.rig.image_width = raw_h, raw_w  # the rendered size (not a multiple of 32)
    read = CameraCalibration(plan.intrinsics, plan.camera_to_lidar, np.tile(np.eye(3), (6, 1, 1)))
    rendered = rig_calibration(raw_config)  # rays of the renderer, in its render frame
    records = json.loads((out / "v1.0-mini" / "calibrated_sensor.json").read_text())
    lidar_to_ego = pose_matrix(next(r for r in records if not r["camera_intrinsic"]))
    render_to_lidar = np.linalg.inv(lidar_to_ego)
    render_to_lidar[:3, 3] += render_to_lidar[:3, :3] @ [RENDER_OFFSET_X, 0.0, 0.0]  # render origin = ego + offset
    points_rendered = frustum_points(raw_config, rendered)
    moved = points_rendered @ render_to_lidar[:3, :3].T + render_to_lidar[:3, 3]
    np.testing.assert_allclose(frustum_points(raw_config, read), moved, atol=1e-6)
    # And the LiDAR sits RENDER_OFFSET_X ahead of the ego origin, as written.
    assert abs(plan.camera_to_lidar[0, 2, 3] - (config.rig.mount_height - config.lidar.mount_height)) < 1e-9
    assert RENDER_OFFSET_X > 0


def test_streaming_dataset_holds_no_tables_and_collates(root, config):
    out, _ = root
    dataset = NuScenesDataset(config, out, "v1.0-mini", "val", sweeps=1)  # "val" is read as mini_val
    assert dataset.split == "mini_val" and not hasattr(dataset, "tables")
    batch = collate([dataset[0], dataset[1]])
    assert batch["sample_token"] == dataset.sample_tokens[:2]
    assert (
        batch["frustum_cells"].shape == (2, num_frustum_points(config)) and batch["frustum_cells"].dtype == torch.int64
    )
    assert batch["images"].dtype == torch.float32 and batch["pillars"].shape[1] == 10
    np.testing.assert_allclose(np.unique(dataset.points(dataset.plans[0])[:, 4]), [0.0, 1 / 6], atol=1e-6)
    assert "frustum_cells" in model_inputs(batch)


@pytest.mark.slow  # default set: training on a written root lowers the velocity loss (test_velocity_head.py)
def test_a_few_training_steps_on_a_written_root(root, config):
    torch.manual_seed(0)
    from fusion.losses import task_loss

    out, _ = root
    dataset = NuScenesDataset(config, out, "v1.0-mini", "mini_train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate, num_workers=0)
    batch = next(iter(loader))
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(2):
        loss, _ = task_loss(model(**model_inputs(batch)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ bad data


def copy_root(root, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(root[0], out)
    return out


def test_missing_sample_file_names_it(root, config, tmp_path):
    out = copy_root(root, tmp_path)
    victim = sorted((out / "samples" / "CAM_BACK").glob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(NuScenesFormatError, match=f"missing camera image .*{re.escape(victim.name)}"):
        for split in ("mini_train", "mini_val"):
            NuScenesDataset(config, out, "v1.0-mini", split)
    dataset = NuScenesDataset(config, out, "v1.0-mini", "mini_val", check_files=False)  # streaming finds it too
    with pytest.raises(NuScenesFormatError, match=re.escape(victim.name)):
        for i in range(len(dataset)):
            dataset[i]


def test_truncated_pcd_bin_names_it(root, config, tmp_path):
    out = copy_root(root, tmp_path)
    victim = sorted((out / "sweeps" / "LIDAR_TOP").glob("*.pcd.bin"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 7])
    with pytest.raises(NuScenesFormatError, match=f"truncated LiDAR file .*{re.escape(victim.name)}"):
        for split in ("mini_train", "mini_val"):
            NuScenesDataset(config, out, "v1.0-mini", split)


def test_unknown_category_names_the_annotation(root, config, tmp_path):
    out = copy_root(root, tmp_path)
    path = out / "v1.0-mini" / "category.json"
    categories = json.loads(path.read_text())
    for record in categories:
        if record["name"] == "vehicle.car":
            record["name"] = "vehicle.hovercraft"
    path.write_text(json.dumps(categories))
    with pytest.raises(
        NuScenesFormatError, match="sample_annotation '[0-9a-f]+': unknown category 'vehicle.hovercraft'"
    ):
        NuScenesDataset(config, out, "v1.0-mini", "mini_val")


def test_missing_table_and_version(root, config, tmp_path):
    out = copy_root(root, tmp_path)
    with pytest.raises(NuScenesFormatError, match="v1.0-trainval does not exist; present: v1.0-mini"):
        NuScenesDataset(config, out, "v1.0-trainval", "val")
    (out / "v1.0-mini" / "ego_pose.json").unlink()
    with pytest.raises(NuScenesFormatError, match="missing table .*ego_pose.json"):
        NuScenesDataset(config, out, "v1.0-mini", "mini_val")


def test_wrong_config_is_refused(root):
    with pytest.raises(ValueError, match="not the nuScenes detection classes"):
        NuScenesDataset(get_config("tiny"), root[0], "v1.0-mini", "mini_val")


def test_cli_export_nuscenes(tmp_path, capsys):
    from altermoma.cli import main

    out = tmp_path / "root"
    args = ["data", "export-nuscenes", "--out", str(out), "--scenes", "1", "--samples-per-scene", "2", "--sweeps", "1"]
    assert main(args) == 0
    assert "1 scenes (scene-0103)" in capsys.readouterr().out
    assert len(NuScenesDataset(get_config("nuscenes-tiny"), out, "v1.0-mini", "mini_val")) == 2
    assert main(args) == 0  # a root this command wrote is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*args[:3], str(tmp_path / "mine"), *args[4:]]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--scenes", "11"]) == 2
