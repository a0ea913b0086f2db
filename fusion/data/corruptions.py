"""Sensor corruptions for robustness evaluation: what a failing or degraded camera or LiDAR delivers.

A fusion model is deployed because it should keep working when one sensor degrades; pruning may remove
exactly the cross-modal redundancy that carries that. Each corruption here is one small numpy function on
what a sensor delivers, before the model's preprocessing:

- camera corruptions act on a sample's images (N, 3, H, W), uint8 in 0..255 or float in [0, 1] (the same
  dtype comes back);
- LiDAR corruptions act on the raw point cloud (P, F), x, y, z first, BEFORE pillarisation or voxelisation
  (`fusion.data.dataset.make_sample`'s `points_transform`, `NuScenesDataset.points`), so a dropped ring or a
  lost sector changes the pillars exactly as a real sensor would.

Severity 1..5 maps to the parameters in the tables below (documented in docs/robustness.md); on/off
failures (`cameras_off`, `camera_off_<i>`, `lidar_off`) have no severity. Randomness (noise, dropout, patch
positions, the direction of a calibration error) comes only from the generator passed in, which
`sample_generator` seeds from (seed, corruption, severity, sample index): never from a global RNG, so a
corrupted scene is the same whatever order, subset or thread count evaluates it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusion.config import Config
from fusion.data.render import gaussian_blur

SEVERITIES = (1, 2, 3, 4, 5)

# Severity 1..5 -> parameter (index severity - 1).
SECTOR_DEG = (120.0, 90.0, 60.0, 45.0, 30.0)  # LiDAR azimuth kept, centred on the vehicle's forward direction
BEAM_STEP = (2, 4, 8, 16, 32)  # keep every k-th ring: 32 beams -> 16, 8, 4, 2, 1
POINT_DROP = (0.3, 0.5, 0.7, 0.85, 0.95)  # fraction of LiDAR points lost
EXTRINSIC = ((0.5, 0.05), (1.0, 0.1), (2.0, 0.2), (3.0, 0.3), (5.0, 0.5))  # (rotation degrees, shift metres)
NOISE_SIGMA = (0.04, 0.08, 0.12, 0.18, 0.25)  # Gaussian pixel noise std, images in [0, 1]
BLUR_SIGMA = (0.75, 1.25, 2.0, 3.0, 4.0)  # Gaussian blur std in pixels of the model's input images
DARK_FACTOR = (0.5, 0.3, 0.2, 0.1, 0.05)  # exposure: brightness multiplied by this
OCCLUSION_AREA = (0.1, 0.2, 0.3, 0.45, 0.6)  # share of each image covered by one black patch (dirt, a sticker)

# name -> (sensor, severity table or None for on/off); `camera_off_<i>` is one entry per camera.
GRADED = {
    "lidar_sector": ("lidar", SECTOR_DEG),
    "lidar_beams": ("lidar", BEAM_STEP),
    "point_dropout": ("lidar", POINT_DROP),
    "extrinsic": ("lidar", EXTRINSIC),
    "camera_noise": ("camera", NOISE_SIGMA),
    "camera_blur": ("camera", BLUR_SIGMA),
    "camera_dark": ("camera", DARK_FACTOR),
    "camera_occlusion": ("camera", OCCLUSION_AREA),
}
ON_OFF = {"cameras_off": "camera", "lidar_off": "lidar"}  # and camera_off_<i>, camera
CAMERA_OFF = "camera_off_"
SENSOR_FAILURES = ("cameras_off", "camera_off", "lidar_off", "lidar_sector", "lidar_beams", "point_dropout")


class CorruptionError(ValueError):
    """An unknown corruption name or a severity out of range."""


@dataclass(frozen=True)
class Sensors:
    """Where the data's sensors are, as the corruptions need it.

    lidar_origin: the LiDAR's position in the points' frame (synthetic: (0, 0, mount height) in the ego frame;
    nuScenes: the origin of the key-frame LiDAR frame). forward_deg: azimuth of the vehicle's forward
    direction in that frame (synthetic: 0, the ego x axis; nuScenes: 90, the LIDAR_TOP frame's y axis).
    beams, elevation_deg: the LiDAR's rings, evenly spaced over the elevation range (rings are recovered
    from each point's elevation). camera_noise: the sensor's own pixel noise std, which darkness keeps.
    """

    num_cameras: int
    camera_names: tuple[str, ...]
    lidar_origin: tuple[float, float, float]
    forward_deg: float
    beams: int
    elevation_deg: tuple[float, float]
    camera_noise: float


def sensors_of(config: Config, kind: str = "synthetic") -> Sensors:
    """The sensors of a data kind ("synthetic" or "nuscenes") under a config."""
    rig, lidar = config.rig, config.lidar
    names = tuple(rig.channels) or tuple(
        f"camera {i} (yaw {360 * i // rig.num_cameras} deg)" for i in range(rig.num_cameras)
    )
    synthetic = kind == "synthetic"
    return Sensors(
        num_cameras=rig.num_cameras,
        camera_names=names,
        lidar_origin=(0.0, 0.0, lidar.mount_height) if synthetic else (0.0, 0.0, 0.0),
        forward_deg=0.0 if synthetic else 90.0,
        beams=lidar.num_beams,
        elevation_deg=tuple(lidar.elevation_deg),
        camera_noise=config.data.camera_noise if synthetic else 0.02,
    )


# ---- camera ---------------------------------------------------------------------------------------------


def cameras_off(images: np.ndarray) -> np.ndarray:
    """Every camera delivers black frames (all zeros)."""
    return np.zeros_like(images)


def camera_off(images: np.ndarray, camera: int) -> np.ndarray:
    """Camera `camera` (index in the rig's order) delivers black frames; the others are untouched."""
    out = images.copy(order="K")  # the memory layout the renderer gave (it decides conv kernels' rounding)
    out[camera] = 0
    return out


def image_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of std `sigma` (images in [0, 1]), clipped to the valid range."""
    unit = _unit(images)
    return _back(unit + rng.normal(0.0, sigma, size=unit.shape), images)


def image_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of std `sigma` pixels (defocus, a wet lens), each camera and channel separately."""
    unit = _unit(images).transpose(0, 2, 3, 1)  # (N, H, W, 3), as the renderer blurs
    return _back(gaussian_blur(unit, sigma).transpose(0, 3, 1, 2), images)


def image_dark(images: np.ndarray, factor: float, sensor_noise: float, rng: np.random.Generator) -> np.ndarray:
    """A darker exposure: brightness times `factor`, while the sensor's own noise (std `sensor_noise`) stays.

    The image already carries noise of std `sensor_noise`, which scaling shrinks to `factor * sensor_noise`;
    noise of std `sensor_noise * sqrt(1 - factor**2)` restores it, so the result has the statistics of a scene
    rendered at brightness x factor (the renderer's `camera_brightness`), not of a scaled clean image."""
    unit = _unit(images)
    extra = rng.normal(0.0, sensor_noise * math.sqrt(max(0.0, 1.0 - factor**2)), size=unit.shape)
    return _back(unit * factor + extra, images)


def image_occlusion(images: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """One black rectangle per camera covering `area` of the image (the image's aspect ratio), at a random place."""
    out = images.copy(order="K")
    height, width = images.shape[-2:]
    patch_h = min(height, max(1, round(height * math.sqrt(area))))
    patch_w = min(width, max(1, round(width * math.sqrt(area))))
    for camera in range(images.shape[0]):
        top = int(rng.integers(0, height - patch_h + 1))
        left = int(rng.integers(0, width - patch_w + 1))
        out[camera, :, top : top + patch_h, left : left + patch_w] = 0
    return out


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def _back(unit: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and return in `like`'s dtype (uint8: rounded to 0..255, as a camera quantises)."""
    unit = np.clip(unit, 0.0, 1.0)
    if like.dtype == np.uint8:
        return np.round(unit * 255.0).astype(np.uint8)
    return unit.astype(like.dtype)


# ---- LiDAR ----------------------------------------------------------------------------------------------


def lidar_off(points: np.ndarray) -> np.ndarray:
    """The LiDAR delivers no points."""
    return points[:0].copy()


def azimuth_deg(points: np.ndarray, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Azimuth of each point around the sensor, degrees in [-180, 180), counter-clockwise from the x axis."""
    angle = np.degrees(np.arctan2(points[:, 1] - origin[1], points[:, 0] - origin[0]))
    return (angle + 180.0) % 360.0 - 180.0


def lidar_sector(
    points: np.ndarray, fov_deg: float, forward_deg: float = 0.0, origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Only the points within `fov_deg` of azimuth centred on `forward_deg` are kept (a blocked or failed
    part of the spin: e.g. 120 degrees keeps the front third)."""
    offset = (azimuth_deg(points, origin) - forward_deg + 180.0) % 360.0 - 180.0
    return points[np.abs(offset) <= fov_deg / 2.0]


def ring_index(
    points: np.ndarray, beams: int, elevation_deg: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """The ring (0 = lowest beam) of each point, from its elevation seen from the sensor: rings are evenly
    spaced over `elevation_deg` (as `fusion.geometry.lidar_rays` casts them and nuScenes' HDL-32E nearly is)."""
    low, high = elevation_deg
    rel = points[:, :3].astype(np.float64) - np.asarray(origin, dtype=np.float64)
    elevation = np.degrees(np.arctan2(rel[:, 2], np.hypot(rel[:, 0], rel[:, 1])))
    ring = np.round((elevation - low) / max(high - low, 1e-9) * (beams - 1))
    return np.clip(ring, 0, beams - 1).astype(np.int64)


def reduce_beams(
    points: np.ndarray,
    step: int,
    beams: int,
    elevation_deg: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A LiDAR with fewer beams: only rings 0, step, 2*step, ... are kept (32 beams, step 2: 16 beams)."""
    return points[ring_index(points, beams, elevation_deg, origin) % step == 0]


def drop_points(points: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each point is lost independently with probability `fraction` (rain, a dirty window, a weak return)."""
    return points[rng.random(len(points)) >= fraction]


def random_rotation(degrees: float, rng: np.random.Generator) -> np.ndarray:
    """A 3x3 rotation by `degrees` about an axis drawn uniformly on the sphere (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def miscalibrate(
    points: np.ndarray,
    degrees: float,
    metres: float,
    rng: np.random.Generator,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A camera-LiDAR extrinsic error: the points turn by `degrees` about a random axis through the LiDAR and
    shift by `metres` in a random direction, so they no longer line up with the cameras (which keep their
    calibration). Returns the moved points; `extrinsic_error` gives the same rotation and shift."""
    rotation, shift = extrinsic_error(degrees, metres, rng)
    out = points.copy()
    centre = np.asarray(origin, dtype=np.float64)
    xyz = (points[:, :3].astype(np.float64) - centre) @ rotation.T + centre + shift
    out[:, :3] = xyz.astype(points.dtype)
    return out


def extrinsic_error(degrees: float, metres: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rotation 3x3, shift (3,)) of one miscalibration: the draws `miscalibrate` makes, in its order."""
    rotation = random_rotation(degrees, rng)
    direction = rng.normal(size=3)
    return rotation, metres * direction / np.linalg.norm(direction)


# ---- names, severities and one sample --------------------------------------------------------------------


def all_names(num_cameras: int) -> list[str]:
    """Every corruption name for a rig of `num_cameras` cameras, sensor failures first."""
    cameras = [f"{CAMERA_OFF}{i}" for i in range(num_cameras)]
    return ["cameras_off", *cameras, "lidar_off", *GRADED]


def parse_names(text: str | Sequence[str], num_cameras: int) -> list[str]:
    """Corruption names from a comma-separated list (or a sequence), checked. `camera_off` stands for every
    `camera_off_<i>`, `sensor_failures` for the sensor failures (cameras and LiDAR off, one camera off,
    sector, beams, dropout), `all` for every corruption. Duplicates are dropped, the order kept."""
    words = [w.strip() for w in (text.split(",") if isinstance(text, str) else text)]
    known = all_names(num_cameras)
    names: list[str] = []
    for word in words:
        if word == "all":
            expanded = known
        elif word == "sensor_failures":
            expanded = parse_names(SENSOR_FAILURES, num_cameras)
        elif word == "camera_off":
            expanded = [n for n in known if n.startswith(CAMERA_OFF)]
        elif word in known:
            expanded = [word]
        else:
            hint = f" (this rig has cameras 0..{num_cameras - 1})" if word.startswith(CAMERA_OFF) else ""
            raise CorruptionError(
                f"unknown corruption {word!r}{hint}; choose from {', '.join(known)} "
                "(or camera_off, sensor_failures, all)"
            )
        names += [n for n in expanded if n not in names]
    if not names:
        raise CorruptionError("no corruption named")
    return names


def check_severities(severities: Sequence[int]) -> tuple[int, ...]:
    """Severities as a sorted tuple, each 1..5."""
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise CorruptionError(f"severities must be among 1..5, got {list(severities)}")
    return tuple(sorted(set(int(s) for s in severities)))


def sensor_of(name: str) -> str:
    """ "camera" or "lidar": which sensor's data a corruption changes."""
    if name.startswith(CAMERA_OFF):
        return "camera"
    return ON_OFF[name] if name in ON_OFF else GRADED[name][0]


def levels(name: str, severities: Sequence[int]) -> tuple[int | None, ...]:
    """The severities a corruption is evaluated at: the requested ones, or (None,) for an on/off failure."""
    return tuple(severities) if name in GRADED else (None,)


def parameter(name: str, severity: int | None, sensors: Sensors) -> str:
    """What a corruption at a severity does, in words (the tables' `parameter` column)."""
    if name == "cameras_off":
        return f"all {sensors.num_cameras} cameras black"
    if name.startswith(CAMERA_OFF):
        return f"{sensors.camera_names[int(name[len(CAMERA_OFF) :])]} black"
    if name == "lidar_off":
        return "no LiDAR points"
    value = GRADED[name][1][severity - 1]
    return {
        "lidar_sector": lambda: f"front {value:g} deg kept",
        "lidar_beams": lambda: f"{len(range(0, sensors.beams, value))} of {sensors.beams} beams",
        "point_dropout": lambda: f"{value:.0%} of points lost",
        "extrinsic": lambda: f"{value[0]:g} deg, {value[1]:g} m",
        "camera_noise": lambda: f"noise std {value:g}",
        "camera_blur": lambda: f"blur std {value:g} px",
        "camera_dark": lambda: f"brightness x{value:g}",
        "camera_occlusion": lambda: f"{value:.0%} of each image covered",
    }[name]()


def sample_generator(seed: int, name: str, severity: int | None, index: int) -> np.random.Generator:
    """The generator of one corrupted sample (or batch): a function of (seed, corruption, severity, index) only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity or 0, index])


def corrupt_images(
    images: np.ndarray, name: str, severity: int | None, rng: np.random.Generator, sensors: Sensors
) -> np.ndarray:
    """One sample's images (N, 3, H, W) under a camera corruption."""
    if name == "cameras_off":
        return cameras_off(images)
    if name.startswith(CAMERA_OFF):
        return camera_off(images, int(name[len(CAMERA_OFF) :]))
    value = GRADED[name][1][severity - 1]
    if name == "camera_noise":
        return image_noise(images, value, rng)
    if name == "camera_blur":
        return image_blur(images, value)
    if name == "camera_dark":
        return image_dark(images, value, sensors.camera_noise, rng)
    if name == "camera_occlusion":
        return image_occlusion(images, value, rng)
    raise CorruptionError(f"{name} is not a camera corruption")


def corrupt_points(
    points: np.ndarray, name: str, severity: int | None, rng: np.random.Generator, sensors: Sensors
) -> np.ndarray:
    """One raw point cloud (P, F) under a LiDAR corruption."""
    origin = sensors.lidar_origin
    if name == "lidar_off":
        return lidar_off(points)
    value = GRADED[name][1][severity - 1]
    if name == "lidar_sector":
        return lidar_sector(points, value, sensors.forward_deg, origin)
    if name == "lidar_beams":
        return reduce_beams(points, value, sensors.beams, sensors.elevation_deg, origin)
    if name == "point_dropout":
        return drop_points(points, value, rng)
    if name == "extrinsic":
        return miscalibrate(points, value[0], value[1], rng, origin)
    raise CorruptionError(f"{name} is not a LiDAR corruption")
