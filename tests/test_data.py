import numpy as np
import pytest

from fusion.config import get_config
from fusion.data.dataset import SyntheticScenes, collate, make_sample
from fusion.data.pillars import pillarize
from fusion.data.render import intersect
from fusion.data.scenes import SIZE_PRIORS, sample_scene
from fusion.geometry import camera_intrinsics, camera_to_ego, pixel_rays


def test_same_seed_same_scene_bit_for_bit(tiny_config, tiny_samples):
    again = make_sample(tiny_config, tiny_config.data.train_seed, 3)
    for key, value in tiny_samples[3].items():
        assert np.array_equal(value, again[key]), key


def test_different_index_or_seed_gives_different_scenes(tiny_config, tiny_samples):
    other_seed = make_sample(tiny_config, tiny_config.data.val_seed, 3)
    assert not np.array_equal(tiny_samples[3]["images"], tiny_samples[4]["images"])
    assert not np.array_equal(tiny_samples[3]["images"], other_seed["images"])


def test_sample_shapes_and_ranges(tiny_config, tiny_samples):
    c = tiny_config
    s = tiny_samples[0]
    assert s["images"].shape == (c.rig.num_cameras, 3, c.rig.image_height, c.rig.image_width)
    assert s["images"].dtype == np.uint8
    assert s["pillars"].shape == (9, c.lidar.max_pillars, c.lidar.max_points_per_pillar)
    assert s["pillar_map"].shape == (c.grid.size_x * c.grid.size_y,)
    assert s["pillar_map"].max() <= c.lidar.max_pillars
    assert s["heatmap"].shape == (len(c.data.classes), c.grid.size_y, c.grid.size_x)
    assert s["heatmap"].max() == pytest.approx(1.0)
    assert set(np.unique(s["bev_map"])) <= {0, 1}
    labels = s["labels"]
    assert (labels[labels >= 0] < len(c.data.classes)).all()
    assert s["target_mask"].sum() == (labels >= 0).sum()  # every object lies inside the grid


def test_objects_follow_size_priors_and_do_not_overlap(tiny_config):
    rng = np.random.default_rng(123)
    for _ in range(20):
        scene = sample_scene(rng, tiny_config.grid, tiny_config.data)
        for box, kind in zip(scene.boxes, scene.kinds):
            for value, (low, high) in zip(box[3:6], SIZE_PRIORS[kind]):
                assert low <= value <= high
            assert box[2] == pytest.approx(box[5] / 2)  # standing on the ground
        centres = scene.boxes[:, :2]
        radii = 0.5 * np.hypot(scene.boxes[:, 3], scene.boxes[:, 4])
        d = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert (d > radii[:, None] + radii[None]).all()


def test_intersect_hits_box_face_at_expected_range():
    box = np.array([[10.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0]])  # front face at x = 8
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, -0.5 / np.sqrt(1.25)]])
    dirs[2] /= np.linalg.norm(dirs[2])
    t, box_id, _, normal = intersect(np.array([0.0, 0.0, 1.0]), dirs, box)
    assert t[0] == pytest.approx(8.0) and box_id[0] == 0
    assert normal[0] == pytest.approx([-1.0, 0.0, 0.0])
    assert np.isinf(t[1]) and box_id[1] == -1  # horizontal ray to the side: nothing
    assert box_id[2] == -1 and t[2] * dirs[2][2] == pytest.approx(-1.0)  # hits the ground first


def test_pixel_rays_project_back_to_their_pixels(tiny_config):
    rig = tiny_config.rig
    rays = pixel_rays(rig, stride=8)
    rotations, _ = camera_to_ego(rig)
    k = camera_intrinsics(rig)
    for cam in range(rig.num_cameras):
        cam_frame = rays[cam] @ rotations[cam]  # ego -> camera (rotation is orthonormal)
        uv = cam_frame @ k.T
        uv = uv[..., :2] / uv[..., 2:]
        assert uv[0, 0] == pytest.approx([4.0, 4.0])
        assert uv[-1, -1] == pytest.approx([rig.image_width - 4.0, rig.image_height - 4.0])


def test_lidar_is_more_accurate_in_depth_than_camera_depth_bins(tiny_config):
    # The LiDAR range noise is far below the camera's 1 m depth bins: the reason fusion helps.
    assert tiny_config.lidar.range_noise < tiny_config.model.depth_bins[2] / 10


def test_pillarize_groups_points_and_caps_counts(tiny_config):
    grid, lidar = tiny_config.grid, tiny_config.lidar
    points = np.array(
        [[0.1, 0.1, 0.5, 0.3]] * 40 + [[5.2, -3.3, 1.0, 0.9]] + [[100.0, 0.0, 0.0, 0.0]], dtype=np.float32
    )
    features, pillar_map, count = pillarize(points, grid, lidar, np.random.default_rng(0))
    assert count == 2
    occupied = np.nonzero(pillar_map)[0]
    assert len(occupied) == 2 and sorted(pillar_map[occupied]) == [1, 2]
    per_pillar = (np.abs(features).sum(0) > 0).sum(1)
    assert sorted(per_pillar[:2]) == [1, lidar.max_points_per_pillar]  # 40 points capped at M
    # Decoration: the offset to the pillar mean is zero for identical points.
    assert np.allclose(features[4:7, pillar_map[occupied[0]] - 1, :], 0.0, atol=1e-6)


def test_degradation_knobs_change_the_sensors():
    base = get_config("tiny")
    dark = get_config("tiny", {"data.camera_brightness": 0.3})
    sparse = get_config("tiny", {"data.lidar_beam_dropout": 0.5})
    a, b, c = make_sample(base, 0, 0), make_sample(dark, 0, 0), make_sample(sparse, 0, 0)
    assert b["images"].mean() < 0.5 * a["images"].mean()
    assert (c["pillar_map"] > 0).sum() < (a["pillar_map"] > 0).sum()


def test_dataset_and_collate(tiny_config):
    dataset = SyntheticScenes(tiny_config, "val", num_scenes=2, progress=False)
    batch = collate([dataset[0], dataset[1]])
    assert batch["images"].dtype.is_floating_point and float(batch["images"].max()) <= 1.0
    assert batch["pillar_map"].dtype == np.int64 or str(batch["pillar_map"].dtype) == "torch.int64"
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes(tiny_config, "test", num_scenes=1)
