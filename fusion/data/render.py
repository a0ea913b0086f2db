"""Sensor simulation by ray casting against a flat ground and oriented boxes (vectorised numpy).

The same intersection routine serves the camera (one ray per pixel) and the spinning LiDAR (one ray
per beam and azimuth step), so both sensors see exactly the same world.
"""

from __future__ import annotations

import numpy as np

from fusion.config import CameraRig, DataConfig, LidarConfig
from fusion.data.scenes import Scene, map_layers
from fusion.geometry import camera_to_ego, lidar_rays, pixel_rays

SKY = np.array([0.55, 0.7, 0.92])
ASPHALT = np.array([0.32, 0.32, 0.34])
GRASS = np.array([0.28, 0.42, 0.2])
MARKING = np.array([0.92, 0.92, 0.88])
LIGHT = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])
CHUNK = 65536  # rays per batch: bounds memory at (CHUNK, boxes, 3) floats


def intersect(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray):
    """Nearest hit of each ray (R, 3) from `origin` with the ground plane z = 0 or a box.

    Returns t (R,) (inf where nothing is hit), box index (R,) (-1 for ground or nothing), the hit point
    in the box's own frame (R, 3) and the hit face's normal in the ego frame (R, 3).
    """
    r = len(dirs)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < -1e-6, -origin[2] / dirs[:, 2], np.inf)
    t_best, box_id = t_ground, np.full(r, -1, dtype=np.int64)
    local_hit, normal = np.zeros((r, 3)), np.tile([0.0, 0.0, 1.0], (r, 1))
    if len(boxes) == 0:
        return t_best, box_id, local_hit, normal

    cos, sin = np.cos(boxes[:, 6]).astype(np.float32), np.sin(boxes[:, 6]).astype(np.float32)  # (K,)
    rel = (origin[None, :] - boxes[:, :3]).astype(np.float32)  # (K, 3)
    # Slab test in each box's own frame, one (R, K) array per axis: reductions over a trailing
    # axis of length 3 are several times slower in numpy than elementwise maxima.
    d = dirs.astype(np.float32)
    origin_local = (cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1], rel[:, 2])
    dir_local = (
        d[:, None, 0] * cos + d[:, None, 1] * sin,
        -d[:, None, 0] * sin + d[:, None, 1] * cos,
        np.broadcast_to(d[:, None, 2], (r, len(boxes))),
    )
    half = (boxes[:, 3:6] / 2.0).astype(np.float32)
    t_enter = np.full((r, len(boxes)), -np.inf, dtype=np.float32)
    t_exit = np.full((r, len(boxes)), np.inf, dtype=np.float32)
    face = np.zeros((r, len(boxes)), dtype=np.int8)
    for axis in range(3):
        inv = 1.0 / np.where(np.abs(dir_local[axis]) < 1e-9, np.float32(1e-9), dir_local[axis])
        t1 = (-half[:, axis] - origin_local[axis]) * inv
        t2 = (half[:, axis] - origin_local[axis]) * inv
        low = np.minimum(t1, t2)
        face = np.where(low > t_enter, np.int8(axis), face)
        t_enter = np.maximum(t_enter, low)
        t_exit = np.minimum(t_exit, np.maximum(t1, t2))
    hit = (t_exit >= t_enter) & (t_enter > 1e-4)
    t_box = np.where(hit, t_enter, np.inf)
    nearest = t_box.argmin(-1)
    t_near = t_box[np.arange(r), nearest].astype(np.float64)
    use_box = t_near < t_best
    t_best = np.where(use_box, t_near, t_best)
    box_id = np.where(use_box, nearest, -1)

    rows = np.nonzero(use_box)[0]
    k = nearest[rows]
    o_k = np.stack([o[k] for o in origin_local], -1)
    d_k = np.stack([dl[rows, k] for dl in dir_local], -1)
    local_hit[rows] = o_k + t_near[rows, None] * d_k
    axis = face[rows, k]
    sign = -np.sign(d_k[np.arange(len(rows)), axis])
    n_local = np.zeros((len(rows), 3))
    n_local[np.arange(len(rows)), axis] = sign
    normal[rows] = np.stack(
        [
            cos[k] * n_local[:, 0] - sin[k] * n_local[:, 1],
            sin[k] * n_local[:, 0] + cos[k] * n_local[:, 1],
            n_local[:, 2],
        ],
        -1,
    )
    return t_best, box_id, local_hit, normal


def _intersect_chunked(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray):
    parts = [intersect(origin, dirs[i : i + CHUNK], boxes) for i in range(0, len(dirs), CHUNK)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _box_colour(scene: Scene, box_id: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Per-class paint schemes: the appearance cue only the camera has."""
    boxes = scene.boxes[box_id]
    kinds = np.array(scene.kinds)[box_id]
    body, accent = scene.colours[box_id], scene.accents[box_id]
    height_frac = (local[:, 2] + boxes[:, 5] / 2) / boxes[:, 5]  # 0 at the bottom, 1 at the top
    length_frac = (local[:, 0] + boxes[:, 3] / 2) / boxes[:, 3]  # 0 at the rear, 1 at the front
    use_accent = np.zeros(len(box_id), dtype=bool)
    use_accent |= (kinds == "car") & (height_frac > 0.62)  # windows
    use_accent |= (kinds == "truck") & (length_frac > 0.78)  # cab
    use_accent |= (kinds == "pedestrian") & (height_frac < 0.5)  # trousers
    use_accent |= (kinds == "bicycle") & (height_frac < 0.45)  # wheels
    use_accent |= (kinds == "hedge") & (np.sin(7.0 * local[:, 0]) * np.sin(9.0 * local[:, 2]) > 0.3)  # foliage
    colour = np.where(use_accent[:, None], accent, body)
    colour = np.where(((kinds == "pedestrian") & (height_frac > 0.88))[:, None], [0.85, 0.65, 0.5], colour)  # face
    colour = np.where(((kinds == "truck") & (height_frac < 0.18))[:, None], [0.08, 0.08, 0.08], colour)  # chassis
    return colour


def render_cameras(scene: Scene, rig: CameraRig, data: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Images (N, 3, H, W) uint8 of every camera of the rig."""
    rays = pixel_rays(rig).reshape(-1, 3)  # camera depth 1 along each ray
    dirs = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    _, origins = camera_to_ego(rig)
    t, box_id, local, normal = _intersect_chunked(origins[0], dirs, scene.boxes)  # all cameras share one origin
    hit_point = origins[0] + t[:, None] * dirs

    colour = np.tile(SKY, (len(dirs), 1)) * (1.0 - 0.3 * np.clip(dirs[:, 2:3], 0, 1))
    ground = np.isfinite(t) & (box_id < 0)
    drivable, divider = map_layers(scene.roads, scene.lanes, hit_point[ground, :2])
    texture = 0.04 * np.sin(3.1 * hit_point[ground, 0]) * np.sin(2.7 * hit_point[ground, 1])
    ground_colour = np.where(drivable[:, None], ASPHALT, GRASS) + texture[:, None]
    colour[ground] = np.where(divider[:, None], MARKING, ground_colour)
    on_box = box_id >= 0
    shade = 0.45 + 0.55 * np.clip(normal[on_box] @ LIGHT, 0.0, 1.0)
    colour[on_box] = _box_colour(scene, box_id[on_box], local[on_box]) * shade[:, None]
    haze = 1.0 - np.exp(-np.where(np.isfinite(t), t, 1e3) / data.camera_haze_range)  # distant things fade
    colour = colour * (1.0 - haze[:, None]) + SKY * haze[:, None]
    if data.camera_blur > 0:  # optics blur the scene before the sensor adds its noise
        shape = (rig.num_cameras, rig.image_height, rig.image_width, 3)
        colour = gaussian_blur(colour.reshape(shape), data.camera_blur).reshape(-1, 3)

    colour = colour * data.camera_brightness + rng.normal(0.0, data.camera_noise, size=colour.shape)
    image = np.clip(colour, 0.0, 1.0).reshape(rig.num_cameras, rig.image_height, rig.image_width, 3)
    return np.round(image * 255.0).astype(np.uint8).transpose(0, 3, 1, 2)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of images (N, H, W, C) over H and W, edges replicated."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(images, pad, mode="edge")
        size = images.shape[axis]
        images = sum(w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(kernel))
    return images


def scan_lidar(scene: Scene, lidar: LidarConfig, data: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """One sweep: points (P, 4) as x, y, z, intensity, with range noise, dropout and lost beams."""
    dirs = lidar_rays(lidar)
    if data.lidar_beam_dropout > 0:
        keep = rng.random(lidar.num_beams) >= data.lidar_beam_dropout
        dirs = dirs[keep]
    dirs = dirs.reshape(-1, 3)
    origin = np.array([0.0, 0.0, lidar.mount_height])
    t, box_id, _, normal = _intersect_chunked(origin, dirs, scene.boxes)
    returned = (t < lidar.max_range) & (rng.random(len(t)) >= data.lidar_point_dropout)
    t, box_id, dirs, normal = t[returned], box_id[returned], dirs[returned], normal[returned]
    t = t + rng.normal(0.0, lidar.range_noise, size=len(t))
    points = origin + t[:, None] * dirs

    on_ground = box_id < 0
    drivable, divider = map_layers(scene.roads, scene.lanes, points[on_ground, :2])
    intensity = np.empty(len(t))
    intensity[on_ground] = np.where(divider, 0.7, np.where(drivable, 0.12, 0.22))
    # Lambertian falloff: grazing returns are weaker; the surface reflectivity is not class-specific.
    incidence = np.abs(np.sum(normal[~on_ground] * dirs[~on_ground], axis=-1))
    intensity[~on_ground] = scene.reflectivity[box_id[~on_ground]] * (0.4 + 0.6 * incidence)
    intensity = np.clip(intensity + rng.normal(0.0, 0.03, size=len(t)), 0.0, 1.0)
    return np.concatenate([points, intensity[:, None]], axis=1).astype(np.float32)


def bev_map(scene: Scene, grid_x: np.ndarray, grid_y: np.ndarray, cell: float, supersample: int = 4) -> np.ndarray:
    """Map-segmentation target (2, H, W): a cell belongs to a layer if any of its sub-samples does."""
    offsets = ((np.arange(supersample) + 0.5) / supersample - 0.5) * cell
    ox, oy = np.meshgrid(offsets, offsets, indexing="ij")
    xs = grid_x[..., None] + ox.reshape(-1)
    ys = grid_y[..., None] + oy.reshape(-1)
    drivable, divider = map_layers(scene.roads, scene.lanes, np.stack([xs, ys], axis=-1))
    return np.stack([drivable.mean(-1) >= 0.5, divider.any(-1)]).astype(np.uint8)
