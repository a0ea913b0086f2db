"""PKU-style camera-LiDAR fusion: a small model of our own design, for "bring your own model".

What this is
------------
A complete, self-contained fusion detector written in plain PyTorch + numpy (no registries, nothing
imported from this repository's `fusion`, `compress` or `export` packages). It exists to show that the
toolkit prunes, fine-tunes, saves and exports a model it has never seen, so it deliberately contains
what real users' models contain and the reference BEVFusion does not:

- camera branch (`camera`): conv stem; a depthwise-separable block (depthwise 3x3 conv with
  `groups == channels`, then a 1x1 pointwise conv); a *grouped* 3x3 conv (`groups=2`, not depthwise);
  a squeeze-excitation block made of `nn.Linear` layers; a view transform (`camera.vtransform`) that
  holds only buffers (a fixed int64 gather index and per-camera weights, no parameters and no
  sort/unique/nonzero in forward) and maps every camera's feature cells into a 16x16 BEV grid; then
  a 3x3 "BEV adapter" conv (a conv between the view transform and the fuser's concat);
- LiDAR branch (`lidar`): a per-point MLP (Linear -> LayerNorm -> ReLU -> Linear) whose features are
  summed into BEV cells with `scatter_add_` on a zero canvas (one extra dummy cell for padded points,
  dropped afterwards), then two 3x3 convs with a residual add;
- fuser (`fuser`), as in "BEVFusion (PKU)" dynamic fusion: channel concat, 3x3 conv, then channel
  attention (global pool -> 1x1 conv -> sigmoid -> multiply);
- heads (`heads`) returning a dict: a class `heatmap`, a `box` regression map and a `scene`
  classification from a global pool and `nn.Linear`.

It differs from the reference BEVFusion (LSS depth distribution + pillar encoder + transposed-conv
decoder, a tuple of outputs, `protected_modules()`/`pruning_trace()` hooks) in every branch, takes a
single dict batch with keyword tensors, and has no toolkit-specific methods at all.

Writing your own setup
----------------------
The toolkit needs four things from you, all in one file like this one:

1. a model built by a function (`build_model`);
2. batches: a list of dicts of tensors (`make_batches`), containing model inputs and targets;
3. `inputs(batch) -> dict` picking the model's keyword inputs out of a batch, and
   `loss(outputs, batch) -> scalar tensor`;
4. a partition of the parameter names into modalities by prefix (`PARTITION`).

Then a `setup()` function returns `altermoma.Setup(model=..., task=altermoma.Task(...), ...)`, and the
CLI takes it as `--task path/to/file.py:setup`, for example::

    altermoma prune --task examples/pku_fusion.py:setup --method altereva --target-gflops 0.5 --out pruned/
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CAMERAS = 2
IMAGE_H, IMAGE_W = 32, 64
FEAT_H, FEAT_W = 8, 16  # camera feature map (stride 4)
BEV = 16  # BEV grid is BEV x BEV cells of 1 m
NUM_CELLS = BEV * BEV
DUMMY_CELL = NUM_CELLS  # padded points scatter here; the cell is dropped
NUM_POINTS = 512
NUM_CLASSES = 3
NUM_SCENES = 5
# Camera c sees BEV rows CAMERA_ROWS[c][0] <= i < CAMERA_ROWS[c][1] (overlapping in rows 6..9).
CAMERA_ROWS = ((0, 10), (6, 16))

PARTITION = {"camera": ("camera.",), "lidar": ("lidar.",), "fusion": ("fuser.", "heads.")}


# ---------------------------------------------------------------------------------------------
# geometry shared by the view transform and the data generator
# ---------------------------------------------------------------------------------------------
def camera_cell(camera: int, i: int, j: int) -> tuple[int, int] | None:
    """Feature-map cell (h, w) of camera `camera` that sees BEV cell (i, j), or None if unseen."""
    lo, hi = CAMERA_ROWS[camera]
    if not lo <= i < hi:
        return None
    h = (i - lo) * FEAT_H // (hi - lo)
    return h, j


def view_tables() -> tuple[np.ndarray, np.ndarray]:
    """(index, weight), each (N_cam, 256): which flat feature cell of each camera every BEV cell reads,
    and the weight of that camera in the BEV cell (1 / number of cameras that see it, or 0)."""
    index = np.zeros((NUM_CAMERAS, NUM_CELLS), dtype=np.int64)
    weight = np.zeros((NUM_CAMERAS, NUM_CELLS), dtype=np.float32)
    for i in range(BEV):
        for j in range(BEV):
            seen = [(c, camera_cell(c, i, j)) for c in range(NUM_CAMERAS)]
            seen = [(c, hw) for c, hw in seen if hw is not None]
            for c, (h, w) in seen:
                index[c, i * BEV + j] = h * FEAT_W + w
                weight[c, i * BEV + j] = 1.0 / len(seen)
    return index, weight


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.dw_bn = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dw_bn(self.depthwise(x)))
        return F.relu(self.pw_bn(self.pointwise(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class ViewTransform(nn.Module):
    """Camera features (B*N, C, H, W) -> BEV (B, C, 16, 16) by a fixed gather; buffers only."""

    def __init__(self):
        super().__init__()
        index, weight = view_tables()
        self.register_buffer("index", torch.from_numpy(index))  # (N, 256) int64
        self.register_buffer("weight", torch.from_numpy(weight))  # (N, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c, h, w = x.shape
        n = self.index.shape[0]
        x = x.view(bn // n, n, c, h * w)
        idx = self.index.view(1, n, 1, NUM_CELLS).expand(bn // n, n, c, NUM_CELLS)
        bev = torch.gather(x, 3, idx) * self.weight.view(1, n, 1, NUM_CELLS)
        return bev.sum(dim=1).view(bn // n, c, BEV, BEV)


class CameraBranch(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = conv_bn(3, width, 3, stride=2)  # 16 x 32
        self.dw = DepthwiseSeparable(width, width * 3 // 2)
        self.grouped = nn.Conv2d(width * 3 // 2, width * 3 // 2, 3, 2, 1, groups=2, bias=False)  # 8 x 16
        self.grouped_bn = nn.BatchNorm2d(width * 3 // 2)
        self.se = SqueezeExcite(width * 3 // 2, width // 2)
        self.vtransform = ViewTransform()
        self.adapter = conv_bn(width * 3 // 2, width * 2)  # the conv between view transform and concat

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, n = images.shape[:2]
        x = images.view(b * n, *images.shape[2:])
        x = self.dw(self.stem(x))
        x = F.relu(self.grouped_bn(self.grouped(x)))
        x = self.se(x)
        return self.adapter(self.vtransform(x))


class LidarBranch(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(4, width // 2)
        self.norm = nn.LayerNorm(width // 2)
        self.fc2 = nn.Linear(width // 2, width)
        self.conv1 = conv_bn(width, width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, points: torch.Tensor, point_cells: torch.Tensor) -> torch.Tensor:
        feats = self.fc2(F.relu(self.norm(self.fc1(points))))  # (B, P, C)
        b, p, c = feats.shape
        canvas = feats.new_zeros(b, c, NUM_CELLS + 1)
        canvas = canvas.scatter_add(2, point_cells.unsqueeze(1).expand(b, c, p), feats.transpose(1, 2))
        x = canvas[:, :, :NUM_CELLS].reshape(b, c, BEV, BEV)  # drop the dummy cell
        y = self.bn2(self.conv2(self.conv1(x)))
        return F.relu(x + y)


class Fuser(nn.Module):
    """PKU-style fuser: concat, 3x3 conv, channel attention."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv_bn(cin, cout)
        self.attention = nn.Conv2d(cout, cout, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([camera, lidar], dim=1))
        return x * torch.sigmoid(self.attention(F.adaptive_avg_pool2d(x, 1)))


class DenseHead(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, bias: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, 1, 1)
        self.out = nn.Conv2d(hidden, cout, 1)
        nn.init.constant_(self.out.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)))


class Heads(nn.Module):
    def __init__(self, cin: int, hidden: int = 32):
        super().__init__()
        self.heatmap = DenseHead(cin, hidden, NUM_CLASSES, bias=-2.19)
        self.box = DenseHead(cin, hidden, 4)
        self.scene = nn.Linear(cin, NUM_SCENES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "heatmap": self.heatmap(x),
            "box": self.box(x),
            "scene": self.scene(x.mean(dim=(2, 3))),
        }


class PKUFusion(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.camera = CameraBranch(width)
        self.lidar = LidarBranch(width)
        self.fuser = Fuser(width * 2 + width, width * 2)
        self.heads = Heads(width * 2, width)

    def forward(self, images: torch.Tensor, points: torch.Tensor, point_cells: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.fuser(self.camera(images), self.lidar(points, point_cells)))


def build_model(seed: int = 0, width: int = 32) -> PKUFusion:
    """A freshly initialised model; the same seed gives the same weights (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PKUFusion(width)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
CLASS_COLOURS = np.array([[1.0, -0.6, -0.6], [-0.6, 1.0, -0.6], [-0.6, -0.6, 1.0]], dtype=np.float32)
CLASS_SIZES = np.array([[0.6, 1.0], [0.8, 1.6], [1.2, 2.4]], dtype=np.float32)  # (w, l) in cells
CLASS_HEIGHTS = np.array([0.5, 1.0, 1.8], dtype=np.float32)
CLASS_INTENSITY = np.array([0.2, 0.5, 0.9], dtype=np.float32)
POINTS_PER_OBJECT = 48
HEATMAP_SIGMA = 0.8


def make_scene(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One synthetic scene: 0-5 objects in BEV cells, seen by both sensors through the shared geometry."""
    images = rng.normal(0.0, 0.15, (NUM_CAMERAS, 3, IMAGE_H, IMAGE_W)).astype(np.float32)
    heatmap = np.zeros((NUM_CLASSES, BEV, BEV), dtype=np.float32)
    box = np.zeros((4, BEV, BEV), dtype=np.float32)
    box_mask = np.zeros((BEV, BEV), dtype=np.float32)
    n_objects = int(rng.integers(0, 6))
    cells = rng.choice(NUM_CELLS, size=n_objects, replace=False)
    centres = (np.arange(BEV, dtype=np.float32) + 0.5)[:, None]
    points = []
    for cell in cells:
        i, j = divmod(int(cell), BEV)
        k = int(rng.integers(0, NUM_CLASSES))
        u, v = rng.uniform(0.2, 0.8, 2).astype(np.float32)
        x, y = i + u, j + v
        w, length = CLASS_SIZES[k] * np.exp(rng.normal(0.0, 0.1, 2)).astype(np.float32)
        # targets: Gaussian heatmap (peak 1 at the object's cell), box at the object's cell
        d2 = (centres - x) ** 2 + (centres.T - y) ** 2
        heatmap[k] = np.maximum(heatmap[k], np.exp(-d2 / (2 * HEATMAP_SIGMA**2)))
        heatmap[k, i, j] = 1.0
        box[:, i, j] = (u - 0.5, v - 0.5, np.log(w), np.log(length))
        box_mask[i, j] = 1.0
        # camera: a coloured patch (brightness grows with height) on every camera that sees the cell
        for c in range(NUM_CAMERAS):
            hw = camera_cell(c, i, j)
            if hw is not None:
                h, ww = hw
                patch = images[c, :, 4 * h : 4 * h + 4, 4 * ww : 4 * ww + 4]
                patch += (CLASS_COLOURS[k] * (0.6 + 0.4 * CLASS_HEIGHTS[k]))[:, None, None]
        # LiDAR: points on the object's footprint
        px = x + rng.uniform(-w / 2, w / 2, POINTS_PER_OBJECT)
        py = y + rng.uniform(-length / 2, length / 2, POINTS_PER_OBJECT)
        pz = rng.uniform(0.0, CLASS_HEIGHTS[k], POINTS_PER_OBJECT)
        pi = CLASS_INTENSITY[k] + rng.normal(0.0, 0.05, POINTS_PER_OBJECT)
        points.append(np.stack([px, py, pz, pi], 1))
    n_real = int(rng.integers(384, NUM_POINTS + 1))
    n_ground = max(0, n_real - sum(len(p) for p in points))
    ground = np.stack(
        [
            rng.uniform(0, BEV, n_ground),
            rng.uniform(0, BEV, n_ground),
            rng.normal(0.0, 0.05, n_ground),
            rng.uniform(0.0, 0.3, n_ground),
        ],
        1,
    )
    real = np.concatenate([*points, ground], 0)[:n_real].astype(np.float32)
    real[:, :2] = np.clip(real[:, :2], 0.0, BEV - 1e-3)
    real = real[rng.permutation(len(real))]
    pts = np.zeros((NUM_POINTS, 4), dtype=np.float32)
    pts[:n_real] = real
    point_cells = np.full(NUM_POINTS, DUMMY_CELL, dtype=np.int64)
    point_cells[:n_real] = np.floor(real[:, 0]).astype(np.int64) * BEV + np.floor(real[:, 1]).astype(np.int64)
    return {
        "images": images,
        "points": pts,
        "point_cells": point_cells,
        "heatmap": heatmap,
        "box": box,
        "box_mask": box_mask,
        "scene": np.int64(min(n_objects, NUM_SCENES - 1)),
    }


def make_batches(num_batches: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`num_batches` batches of `batch_size` scenes; deterministic given `seed`."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        scenes = [make_scene(rng) for _ in range(batch_size)]
        batches.append({key: torch.from_numpy(np.stack([s[key] for s in scenes])) for key in scenes[0]})
    return batches


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword inputs out of a batch."""
    return {key: batch[key] for key in ("images", "points", "point_cells")}


def loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Heatmap BCE + masked L1 on boxes + scene cross-entropy."""
    heat = F.binary_cross_entropy_with_logits(outputs["heatmap"], batch["heatmap"])
    mask = batch["box_mask"].unsqueeze(1)
    box = (F.l1_loss(outputs["box"], batch["box"], reduction="none") * mask).sum() / (4 * mask.sum()).clamp(min=1)
    scene = F.cross_entropy(outputs["scene"], batch["scene"])
    return 10.0 * heat + box + 0.5 * scene


def train(model: nn.Module, steps: int = 100, lr: float = 3e-3, seed: int = 0, history: list | None = None) -> float:
    """Plain AdamW pretraining on `make_batches(32, 4, seed)`; returns the last step's loss."""
    batches = make_batches(32, 4, seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    value = float("nan")
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimiser.zero_grad(set_to_none=True)
        objective = loss(model(**inputs(batch)), batch)
        objective.backward()
        optimiser.step()
        value = float(objective.detach())
        if history is not None:
            history.append(value)
    model.eval()
    return value


def setup():
    """The toolkit's entry point: `altermoma prune --task examples/pku_fusion.py:setup ...`."""
    import altermoma

    task = altermoma.Task(partition=PARTITION, loss=loss, inputs=inputs)
    return altermoma.Setup(
        model=build_model(),
        task=task,
        scoring_batches=make_batches(4, 2, seed=1000),
        train_batches=make_batches(32, 4, seed=0),
    )
