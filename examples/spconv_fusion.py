"""A fusion model made of the parts deployed BEVFusions are made of, for "bring your own model".

What this is
------------
MIT BEVFusion and NVIDIA CUDA-BEVFusion use a spconv sparse voxel encoder for the LiDAR, a TransFusion-style
query head and mmdet3d-style dict inputs. This small, self-contained model (plain PyTorch + spconv; nothing
imported from this repository's packages) has each of them:

- LiDAR (`lidar`): a SECOND-style spconv 2.x encoder: `SubMConv3d` + `BatchNorm1d` + ReLU on the sparse
  features, a residual block whose identity is added with `replace_feature`, a strided `SparseConv3d`, a
  second residual stage, a z-strided `SparseConv3d` (mmdet3d's `conv_out`), then `.dense()` folded to BEV
  with `.view(N, C * D, H, W)`: one sparse channel becomes D input channels of the next 2-D conv;
- camera (`camera`): a conv stem pooled onto the BEV grid (a stand-in for a view transform);
- fuser (`fuser`): concat + 3x3 conv + BatchNorm + ReLU, as MIT's ConvFuser;
- head (`head`): learned queries (an `nn.Parameter` expanded over the batch) cross-attending to the BEV
  features through `nn.MultiheadAttention`, an FFN, class and box branches, plus a dense heatmap conv;
- one positional dict argument, `model(batch)`, as mmdet3d models take.

spconv's CPU build runs forward only (its backward needs CUDA), so on a CPU the toolkit counts, scores with
data-free methods (magnitude, random), prunes, saves and reloads this model; gradient methods and
fine-tuning need it on a GPU. The weights here are random (seeded): train it on a GPU before pruning for
real. Try it::

    pip install spconv==2.3.8          # CPU build; spconv-cu120 etc. on CUDA machines
    altermoma prune --task examples/spconv_fusion.py:setup --method magnitude --target-gflops 0.5 --out runs/sp
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRID = (8, 32, 32)  # voxel grid (z, y, x)
BEV = 16  # BEV cells per side after the encoder's x/y stride of 2
NUM_CLASSES = 3
NUM_QUERIES = 16
MAX_VOXELS = 600
PARTITION = {"camera": ["camera"], "lidar": ["lidar"], "fusion": ["fuser", "head"]}


def _spconv():
    try:
        import spconv.pytorch as spconv
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError("this example needs spconv: pip install spconv==2.3.8 (CPU) or spconv-cu1xx") from error
    return spconv


class SparseBasicBlock(nn.Module):
    """SubMConv3d-BN-ReLU-SubMConv3d-BN plus identity, on the sparse features (mmdet3d's SparseBasicBlock)."""

    def __init__(self, channels: int, key: str):
        super().__init__()
        spconv = _spconv()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=key)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=key)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(F.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features) + x.features)
        return out.replace_feature(F.relu(out.features))


def sparse_stage(spconv, cin: int, cout: int, kernel, stride, padding, key: str | None, subm: bool):
    conv = spconv.SubMConv3d if subm else spconv.SparseConv3d
    return spconv.SparseSequential(
        conv(cin, cout, kernel, stride=stride, padding=padding, bias=False, indice_key=key),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
    )


class SparseEncoder(nn.Module):
    """SECOND-style voxel encoder: (voxel features, coordinates) -> BEV map with depth folded into channels."""

    def __init__(self, in_channels: int = 4, width: int = 16):
        super().__init__()
        spconv = _spconv()
        self.conv_input = sparse_stage(spconv, in_channels, width, 3, 1, 1, "subm1", subm=True)
        self.stage1 = SparseBasicBlock(width, "subm1")
        self.down = sparse_stage(spconv, width, 2 * width, 3, 2, 1, "down1", subm=False)
        self.stage2 = SparseBasicBlock(2 * width, "subm2")
        self.conv_out = sparse_stage(spconv, 2 * width, 2 * width, (3, 1, 1), (2, 1, 1), 0, "out", subm=False)

    def forward(self, voxels: torch.Tensor, coors: torch.Tensor, batch_size: int) -> torch.Tensor:
        spconv = _spconv()
        x = spconv.SparseConvTensor(voxels, coors, list(GRID), batch_size)
        x = self.conv_out(self.stage2(self.down(self.stage1(self.conv_input(x)))))
        dense = x.dense()
        n, c, d, h, w = dense.shape
        return dense.view(n, c * d, h, w)


class QueryHead(nn.Module):
    """TransFusion-style: learned queries attend to the BEV features; FFN; class and box branches."""

    def __init__(self, channels: int, num_queries: int = NUM_QUERIES, heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, channels) * 0.1)
        self.position = nn.Conv2d(2, channels, 1)  # BEV positions as a learned encoding
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ReLU(), nn.Linear(2 * channels, channels))
        self.cls = nn.Linear(channels, NUM_CLASSES)
        self.box = nn.Linear(channels, 7)
        self.heatmap = nn.Conv2d(channels, NUM_CLASSES, 1)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, BEV), torch.linspace(0, 1, BEV), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys])[None], persistent=False)

    def forward(self, bev: torch.Tensor) -> dict[str, torch.Tensor]:
        memory = (bev + self.position(self.grid)).flatten(2).transpose(1, 2)
        queries = self.query.unsqueeze(0).expand(bev.shape[0], -1, -1)
        attended, _ = self.attn(queries, memory, memory, need_weights=False)
        features = attended + self.ffn(attended)
        return {"logits": self.cls(features), "boxes": self.box(features), "heatmap": self.heatmap(bev)}


class SpconvFusion(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.camera = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1)
        )
        self.lidar = SparseEncoder(4, width)
        lidar_channels = 2 * width * ((GRID[0] // 2 - 3) // 2 + 1)
        self.fuser = nn.Sequential(
            nn.Conv2d(2 * width + lidar_channels, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.head = QueryHead(2 * width)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        camera = F.adaptive_avg_pool2d(self.camera(batch["images"]), BEV)
        lidar = self.lidar(batch["voxels"], batch["coors"], batch["images"].shape[0])
        return self.head(self.fuser(torch.cat([camera, lidar], dim=1)))


def build_model(seed: int = 0, width: int = 16) -> SpconvFusion:
    """Seeded random weights, with BatchNorm statistics that are not the identity (as after training)."""
    torch.manual_seed(seed)
    model = SpconvFusion(width)
    generator = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def make_batch(batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic scenes: boxes of points in the voxel grid (unique voxels, mean features), images and targets."""
    rng = np.random.default_rng(seed)
    coors, voxels, heatmap = [], [], np.zeros((batch_size, NUM_CLASSES, BEV, BEV), np.float32)
    for b in range(batch_size):
        sites = set()
        for _ in range(4):
            cls = int(rng.integers(NUM_CLASSES))
            z0, y0, x0 = rng.integers(0, GRID[0] - 3), rng.integers(0, GRID[1] - 6), rng.integers(0, GRID[2] - 6)
            size = 2 + cls
            for z in range(z0, z0 + 3):
                for y in range(y0, y0 + size):
                    for x in range(x0, x0 + size):
                        sites.add((z, y, x))
            heatmap[b, cls, (y0 + size // 2) // 2, (x0 + size // 2) // 2] = 1.0
        while len(sites) < MAX_VOXELS // batch_size:  # ground and clutter
            sites.add((0, int(rng.integers(GRID[1])), int(rng.integers(GRID[2]))))
        for z, y, x in sorted(sites):
            coors.append((b, z, y, x))
            voxels.append((z / GRID[0], y / GRID[1], x / GRID[2], rng.random()))
    return {
        "images": torch.from_numpy(rng.standard_normal((batch_size, 3, 4 * BEV, 4 * BEV)).astype(np.float32)),
        "voxels": torch.tensor(voxels, dtype=torch.float32),
        "coors": torch.tensor(coors, dtype=torch.int32),
        "heatmap": torch.from_numpy(heatmap),
    }


def inputs(batch: dict[str, torch.Tensor]) -> tuple:
    """One positional dict, as mmdet3d models take it."""
    return ({key: batch[key] for key in ("images", "voxels", "coors")},)


def loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    heat = F.binary_cross_entropy_with_logits(outputs["heatmap"], batch["heatmap"])
    return heat + 0.01 * outputs["logits"].pow(2).mean() + 0.01 * outputs["boxes"].pow(2).mean()


def setup():
    """The toolkit's entry point: `altermoma prune --task examples/spconv_fusion.py:setup ...`."""
    import altermoma

    return altermoma.Setup(
        model=build_model(),
        task=altermoma.Task(partition=PARTITION, loss=loss, inputs=inputs),
        scoring_batches=[make_batch(2, seed=1000 + i) for i in range(2)],
        train_batches=[make_batch(2, seed=i) for i in range(8)],
    )
