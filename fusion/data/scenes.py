"""Synthetic driving scenes: a road layout, objects with realistic size priors, and distractors.

The scenes are built so that each sensor is needed. LiDAR measures range precisely but sees only
shape, and the distractors are shaped like the classes: hedges parked along the kerb look like cars,
bollards look like pedestrians. The camera tells them apart by appearance (painted bodies with dark
windows, two-tone clothing, green foliage) but has to infer depth. A fusion model can get both right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusion.config import BEVGrid, DataConfig

LANE_WIDTH = 3.5
KERB_BAND = 4.0  # width of the strip beside a road where parked cars, pedestrians and distractors stand

# Size priors (length, width, height) as uniform ranges, metres; nuScenes-like.
SIZE_PRIORS = {
    "car": ((3.9, 4.9), (1.7, 2.0), (1.4, 1.7)),
    "truck": ((5.5, 9.0), (2.1, 2.6), (2.4, 3.4)),
    "pedestrian": ((0.5, 0.9), (0.5, 0.8), (1.55, 1.9)),
    "bicycle": ((1.6, 1.9), (0.5, 0.7), (1.0, 1.3)),
    # Distractors share the size priors of the class they imitate, so shape alone cannot tell them apart.
    "bollard": ((0.5, 0.9), (0.5, 0.8), (1.55, 1.9)),
    "hedge": ((3.9, 4.9), (1.7, 2.0), (1.4, 1.7)),
}
DISTRACTORS = ("bollard", "hedge")

# Near-infrared (905 nm) reflectivity by surface material, the LiDAR's cue to what a shape is made of:
# painted metal bodies middling, clothing and skin lower, foliage dark and diffuse (the canopy scatters
# the beam), bollards bright (retroreflective bands). `DataConfig.lidar_material_contrast` blends these
# into the material-blind draw: 0 keeps the LiDAR blind to materials.
MATERIAL_REFLECTIVITY = {
    "car": 0.45,
    "truck": 0.5,
    "pedestrian": 0.3,
    "bicycle": 0.35,
    "bollard": 0.85,
    "hedge": 0.08,
}


@dataclass
class Scene:
    """Everything the sensors and the targets need. Boxes are (x, y, z_centre, l, w, h, yaw)."""

    roads: np.ndarray  # (R, 4): centre x, centre y, heading, half width
    lanes: np.ndarray  # (R,) lanes per road
    boxes: np.ndarray  # (K, 7) objects then distractors
    kinds: list[str]  # (K,) kind of each box: a class name or a distractor name
    colours: np.ndarray  # (K, 3) main body colour in [0, 1]
    accents: np.ndarray  # (K, 3) second colour: windows, cab, trousers
    reflectivity: np.ndarray  # (K,) LiDAR intensity of each box's surface
    num_objects: int  # the first num_objects boxes are detection targets


def map_layers(roads: np.ndarray, lanes: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drivable area and lane-divider membership of points (..., 2): the one source of map truth."""
    drivable = np.zeros(xy.shape[:-1], dtype=bool)
    divider = np.zeros(xy.shape[:-1], dtype=bool)
    for (cx, cy, heading, half_width), n_lanes in zip(roads, lanes):
        dx, dy = xy[..., 0] - cx, xy[..., 1] - cy
        along = dx * math.cos(heading) + dy * math.sin(heading)
        across = -dx * math.sin(heading) + dy * math.cos(heading)
        drivable |= np.abs(across) < half_width
        dashed = np.mod(along, 6.0) < 3.0
        lane = 2.0 * half_width / n_lanes
        for k in range(1, int(n_lanes)):
            divider |= (np.abs(across - (-half_width + k * lane)) < 0.12) & dashed
    return drivable, divider & drivable


def _sample_roads(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A road through the ego position, sometimes with a crossing road ahead or behind."""
    lanes = [int(rng.integers(2, 5))]
    heading = rng.normal(0.0, 0.08)
    half = lanes[0] * LANE_WIDTH / 2.0
    # The ego vehicle drives in one of the lanes, so the road centre is offset sideways.
    offset = rng.uniform(-half + LANE_WIDTH / 2, half - LANE_WIDTH / 2)
    roads = [(-offset * math.sin(heading), offset * math.cos(heading), heading, half)]
    if rng.random() < 0.5:
        lanes.append(int(rng.integers(2, 4)))
        along = rng.uniform(-18.0, 18.0)
        cross_heading = heading + math.pi / 2 + rng.normal(0.0, 0.1)
        roads.append((along * math.cos(heading), along * math.sin(heading), cross_heading, lanes[1] * LANE_WIDTH / 2))
    return np.array(roads, dtype=np.float64), np.array(lanes, dtype=np.int64)


def _object_colours(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class appearance: what the camera sees and the LiDAR does not."""
    jitter = rng.normal(0.0, 0.04, size=3)
    if kind == "car":
        palette = np.array([[0.75, 0.1, 0.1], [0.1, 0.2, 0.7], [0.7, 0.7, 0.72], [0.08, 0.08, 0.1], [0.92, 0.92, 0.9]])
        return palette[rng.integers(len(palette))] + jitter, np.array([0.05, 0.07, 0.12])  # dark windows
    if kind == "truck":
        palette = np.array([[0.95, 0.95, 0.92], [0.95, 0.8, 0.1], [0.95, 0.45, 0.05]])
        return np.array([0.82, 0.82, 0.8]) + jitter, palette[rng.integers(len(palette))]  # cargo box, cab
    if kind == "pedestrian":
        shirt = rng.uniform(0.2, 1.0, size=3) * np.eye(3)[rng.integers(3)] + rng.uniform(0.0, 0.3, size=3)
        return shirt, np.array([0.12, 0.12, 0.18]) + jitter  # shirt, trousers
    if kind == "bicycle":
        return np.array([0.1, 0.75, 0.75]) + jitter, np.array([0.1, 0.1, 0.1])
    if kind == "bollard":
        return np.array([0.5, 0.5, 0.52]) + jitter, np.array([0.45, 0.45, 0.47])
    return np.array([0.15, 0.42, 0.12]) + jitter, np.array([0.1, 0.3, 0.08])  # hedge


def _place(kind: str, roads: np.ndarray, lanes: np.ndarray, rng: np.random.Generator, extent: float):
    """A candidate pose (x, y, yaw) for one box: vehicles in lanes or parked, others by the kerb."""
    r = int(rng.integers(len(roads)))
    cx, cy, heading, half = roads[r]
    along = rng.uniform(-extent, extent)
    if kind in ("car", "truck") and rng.random() < 0.6:
        lane = 2.0 * half / lanes[r]
        k = int(rng.integers(lanes[r]))
        across = -half + (k + 0.5) * lane + rng.normal(0.0, 0.2)
        yaw = heading + (0.0 if across < 0 else math.pi) + rng.normal(0.0, 0.05)
    else:
        side = 1.0 if rng.random() < 0.5 else -1.0
        across = side * (half + rng.uniform(0.8, KERB_BAND))
        parked = kind in ("car", "truck", "hedge", "bicycle")
        yaw = heading + (math.pi if rng.random() < 0.5 else 0.0) if parked else rng.uniform(-math.pi, math.pi)
        yaw += rng.normal(0.0, 0.08)
    x = cx + along * math.cos(heading) - across * math.sin(heading)
    y = cy + along * math.sin(heading) + across * math.cos(heading)
    return x, y, math.atan2(math.sin(yaw), math.cos(yaw))


def sample_scene(rng: np.random.Generator, grid: BEVGrid, data: DataConfig) -> Scene:
    """One scene; the same generator state gives the same scene, bit for bit."""
    roads, lanes = _sample_roads(rng)
    extent = max(grid.x_range[1], grid.y_range[1]) - 1.0
    n_objects = int(rng.integers(data.objects_per_scene[0], data.objects_per_scene[1] + 1))
    n_distractors = int(rng.integers(data.distractors_per_scene[0], data.distractors_per_scene[1] + 1))
    class_weights = {"car": 0.5, "truck": 0.15, "pedestrian": 0.25, "bicycle": 0.1}
    names = [c for c in data.classes]
    weights = np.array([class_weights.get(c, 0.2) for c in names])
    wanted = [names[i] for i in rng.choice(len(names), size=n_objects, p=weights / weights.sum())]
    wanted += [DISTRACTORS[i] for i in rng.integers(len(DISTRACTORS), size=n_distractors)]

    boxes, kinds, colours, accents = [], [], [], []
    placed_xy, placed_r = [np.zeros(2)], [3.0]  # the ego vehicle's own footprint
    for kind in wanted:
        (l_lo, l_hi), (w_lo, w_hi), (h_lo, h_hi) = SIZE_PRIORS[kind]
        size = np.array([rng.uniform(l_lo, l_hi), rng.uniform(w_lo, w_hi), rng.uniform(h_lo, h_hi)])
        radius = 0.5 * math.hypot(size[0], size[1]) + 0.3
        for _ in range(20):  # rejection sampling against overlap
            x, y, yaw = _place(kind, roads, lanes, rng, extent)
            inside = grid.x_range[0] < x < grid.x_range[1] and grid.y_range[0] < y < grid.y_range[1]
            clear = np.all(np.hypot(*(np.array(placed_xy) - [x, y]).T) > np.array(placed_r) + radius)
            if inside and clear:
                placed_xy.append(np.array([x, y]))
                placed_r.append(radius)
                boxes.append([x, y, size[2] / 2.0, *size, yaw])
                kinds.append(kind)
                colour, accent = _object_colours(kind, rng)
                colours.append(colour)
                accents.append(accent)
                break
    num_objects = sum(k in data.classes for k in kinds)
    order = np.argsort([k not in data.classes for k in kinds], kind="stable")  # objects first
    boxes_arr = np.array(boxes, dtype=np.float64).reshape(-1, 7)[order]
    kinds = [kinds[i] for i in order]
    reflectivity = rng.uniform(0.2, 0.6, size=len(boxes))  # material-blind
    contrast = data.lidar_material_contrast
    if contrast > 0:
        material = np.array([MATERIAL_REFLECTIVITY[k] for k in kinds])
        reflectivity = (1.0 - contrast) * reflectivity + contrast * material
    return Scene(
        roads=roads,
        lanes=lanes,
        boxes=boxes_arr,
        kinds=kinds,
        colours=np.clip(np.array(colours).reshape(-1, 3)[order], 0.0, 1.0),
        accents=np.clip(np.array(accents).reshape(-1, 3)[order], 0.0, 1.0),
        reflectivity=reflectivity,
        num_objects=num_objects,
    )
