"""BEVFusion-style camera-LiDAR detector (MIT structure) and its single-modal variants.

    images  -> ResNet | Swin -> FPN -> LSS (depth conv + context conv, BEV pool) -> BEV downsample --\
                                                                                                     fuser -> decoder
    pillars -> PillarFeatureNet -> gather to canvas -> residual 2-D backbone -----------------------/     -> heads
      | voxels + rulebooks -> sparse voxel encoder (SECOND/VoxelNet, z folded into channels) ------/

The config picks each part (`ModelConfig.camera_backbone`, `lidar_encoder`, `head`): ResNet, pillars and
CenterPoint for the reference presets; Swin, the sparse voxel encoder and TransFusion for the `bevfusion-*`
presets, the structure MIT's and NVIDIA's BEVFusion deployments run.

The camera-only and LiDAR-only models reuse the same modules under the same names, so a fusion model
is initialised by loading both pretrained single-modal checkpoints: the setting AlterMOMA studies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fusion.config import Config
from fusion.data.sparse_inputs import collate_rulebooks, graph_rows, pad_inputs, synthetic_cloud, voxel_inputs
from fusion.models.decoder import Decoder, build_fuser
from fusion.models.heads import CenterHead, MapHead
from fusion.models.lss import LSSViewTransform
from fusion.models.pointpillars import LidarEncoder
from fusion.models.resnet import FPN, ResNet
from fusion.models.stages import (
    CameraBackboneStage,
    CameraVTransformStage,
    FuserDecoderStage,
    HeadsStage,
    LidarBackboneStage,
)
from fusion.models.swin import SwinTransformer
from fusion.models.transfusion import TransFusionHead
from fusion.models.voxel_lidar import INPUTS as VOXEL_INPUTS
from fusion.models.voxel_lidar import VoxelLidarEncoder, VoxelLidarStage

MODALITIES = ("camera", "lidar", "fusion")
# Module-name prefixes of the three partitions AlterMOMA distinguishes.
DEFAULT_PARTITION = {
    "camera": ("camera.",),
    "lidar": ("lidar.",),
    "fusion": ("fuser.", "decoder.", "heads."),
}
POOL_METHODS = ("scatter", "cumsum")  # forms of the camera BEV pooling (fusion.models.lss.BEVPool)
PILLAR_INPUTS = ("pillars", "pillar_map")
# Classes whose TransFusion proposals skip the local-maximum filter: mmdet3d does this on nuScenes for the
# small classes whose peaks are often adjacent.
NO_NMS_CLASSES = ("pedestrian", "traffic_cone")


def camera_backbone(config: Config) -> nn.Module:
    """ResNet or Swin (stride-8, -16 and -32 outputs, with their `out_channels`, for the FPN)."""
    m = config.model
    if m.camera_backbone == "swin":
        return SwinTransformer(
            m.swin_embed_dim, m.swin_depths, m.swin_heads, m.swin_window, drop_path_rate=m.swin_drop_path
        )
    return ResNet(m.camera_depth, m.camera_width)


class CameraEncoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.num_cameras = config.rig.num_cameras
        self.backbone = camera_backbone(config)
        self.neck = FPN(self.backbone.out_channels, m.fpn_channels, m.feature_stride)
        self.vtransform = LSSViewTransform(config, m.fpn_channels)
        self.out_channels = m.camera_bev_channels

    def forward(self, images: torch.Tensor, frustum_cells: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c, h, w = images.shape
        features = self.neck(self.backbone(images.view(b * n, c, h, w)))
        return self.vtransform(features, frustum_cells)


class Heads(nn.Module):
    def __init__(self, config: Config, in_channels: int):
        super().__init__()
        m = config.model
        classes = config.data.classes
        if m.head == "transfusion":
            self.det = TransFusionHead(
                in_channels,
                len(classes),
                channels=m.transfusion_channels,
                num_proposals=m.transfusion_proposals,
                num_heads=m.transfusion_heads,
                ffn_channels=m.transfusion_ffn,
                head_channels=m.head_channels,
                no_nms_classes=[i for i, name in enumerate(classes) if name in NO_NMS_CLASSES],
                velocity=m.velocity_head,
            )
        else:
            self.det = CenterHead(in_channels, m.head_channels, len(classes), velocity=m.velocity_head)
        self.map = MapHead(in_channels, m.head_channels, len(config.data.map_classes)) if m.seg_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.det(x)
        if self.map is not None:
            outputs["bev_map"] = self.map(x)
        return outputs


class BEVFusion(nn.Module):
    """modality "fusion" uses both sensors; "camera" and "lidar" build the single-modal variants."""

    def __init__(self, config: Config, modality: str = "fusion"):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        self.config = config
        self.modality = modality
        m = config.model
        self.camera = CameraEncoder(config) if modality in ("camera", "fusion") else None
        self.lidar = lidar_encoder(config) if modality in ("lidar", "fusion") else None
        if modality == "fusion":
            self.fuser = build_fuser(m.fuser, [self.camera.out_channels, self.lidar.out_channels], m.fuser_channels)
            bev_channels = m.fuser_channels
        else:
            self.fuser = None
            bev_channels = (self.camera or self.lidar).out_channels
        self.decoder = Decoder(bev_channels, m.decoder_channels, m.decoder_layers, m.decoder_up_channels)
        self.heads = Heads(config, self.decoder.out_channels)

    @property
    def sparse_lidar(self) -> bool:
        """Whether the LiDAR branch is the sparse voxel encoder (inputs: voxels, voxel_coords, rulebooks)."""
        return isinstance(self.lidar, VoxelLidarEncoder)

    @property
    def input_names(self) -> list[str]:
        lidar = list(VOXEL_INPUTS if self.sparse_lidar else PILLAR_INPUTS)
        return {"camera": ["images"], "lidar": lidar}.get(self.modality, ["images", *lidar])

    def forward(
        self,
        images: torch.Tensor | None = None,
        pillars: torch.Tensor | None = None,
        pillar_map: torch.Tensor | None = None,
        frustum_cells: torch.Tensor | None = None,
        voxels: torch.Tensor | None = None,
        voxel_coords: torch.Tensor | None = None,
        rulebooks: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`frustum_cells` (B, P) int64, optional: each sample's camera geometry (real data, one calibration
        per vehicle; see `fusion.data.camera_geometry`). Without it the camera branch lifts with the fixed
        rig baked into its buffers, which is also the form that is exported. The LiDAR branch takes pillars
        and pillar_map, or (sparse encoder) voxels, voxel_coords and rulebooks (`fusion.data.sparse_inputs`)."""
        bev = []
        if self.camera is not None:
            bev.append(self.camera(images, frustum_cells))
        if self.lidar is not None:
            if self.sparse_lidar:
                bev.append(self.lidar(voxels, voxel_coords, rulebooks))
            else:
                bev.append(self.lidar(pillars, pillar_map))
        x = self.fuser(bev) if self.fuser is not None else bev[0]
        outputs = self.heads(self.decoder(x))
        if self.camera is not None and self.camera.vtransform.pruning_trace:
            # Taken off the module again, so no graph tensor outlives the trace.
            outputs["traced_depth"] = self.camera.vtransform.__dict__.pop("traced_depth")
        return outputs

    def partition(self) -> dict[str, tuple[str, ...]]:
        """Module-name prefixes of the partitions present in this model."""
        present = {name for name, _ in self.named_children()}
        return {
            part: tuple(p for p in prefixes if p.rstrip(".") in present) for part, prefixes in DEFAULT_PARTITION.items()
        }

    def protected_modules(self) -> list[nn.Module]:
        """Layers whose output channels must never be pruned: depth bins and every head output layer."""
        det = self.heads.det
        protected = det.output_layers() if isinstance(det, TransFusionHead) else [b[-1] for b in det.branches.values()]
        if self.heads.map is not None:
            protected.append(self.heads.map.classifier)
        if self.camera is not None:
            protected.append(self.camera.vtransform.depth_conv)
        return protected

    @contextmanager
    def pruning_trace(self) -> Iterator[None]:
        """Swap in the channel-preserving view-transform stand-in while torch-pruning traces the graph."""
        if self.camera is None:
            yield
            return
        self.camera.vtransform.pruning_trace = True
        try:
            yield
        finally:
            self.camera.vtransform.pruning_trace = False

    def export_stages(
        self, head_outputs: Sequence[str]
    ) -> list[tuple[str, nn.Module, tuple[str, ...], tuple[str, ...]]]:
        """The CUDA-BEVFusion split as `(name, module, inputs, outputs)` in run order, for `export.onnx.export_split`.

        Camera-only and LiDAR-only models get the stages that apply. `head_outputs`: the forward's output names
        (`fusion.models.stages.split_stages` takes them from one forward pass).
        """
        stages: list[tuple[str, nn.Module, tuple[str, ...], tuple[str, ...]]] = []
        bev = []
        if self.camera is not None:
            stages.append(("camera_backbone", CameraBackboneStage(self), ("images",), ("depth", "context")))
            stages.append(("camera_vtransform", CameraVTransformStage(self), ("depth", "context"), ("camera_bev",)))
            bev.append("camera_bev")
        if self.lidar is not None:
            inputs = VOXEL_INPUTS if self.sparse_lidar else PILLAR_INPUTS
            stage = VoxelLidarStage(self) if self.sparse_lidar else LidarBackboneStage(self)
            stages.append(("lidar_backbone", stage, tuple(inputs), ("lidar_bev",)))
            bev.append("lidar_bev")
        stages.append(("fuser_decoder", FuserDecoderStage(self), tuple(bev), ("bev_features",)))
        stages.append(("heads", HeadsStage(self), ("bev_features",), tuple(head_outputs)))
        for _, module, _, _ in stages:
            # A fresh wrapper says training=True; torch.onnx.export "restores" that mode recursively after
            # tracing, which would put the model's BatchNorms in training mode (and the next forward would
            # update their running statistics). Give the wrappers the model's own flag, not recursively.
            module.training = self.training
        return stages


@contextmanager
def pool_method_as(model: nn.Module, method: str | None) -> Iterator[None]:
    """Temporarily switch the camera BEV pooling to "scatter" or "cumsum" (no-op for None or no camera)."""
    if method is not None and method not in POOL_METHODS:
        raise ValueError(f"pool_method must be one of {', '.join(POOL_METHODS)}, got {method!r}")
    camera = getattr(model, "camera", None)
    if method is None or camera is None:
        yield
        return
    pool = camera.vtransform.pool
    previous = pool.method
    pool.method = method
    try:
        yield
    finally:
        pool.method = previous


def current_pool_method(model: nn.Module) -> str | None:
    """The camera BEV pooling form in force ("scatter" | "cumsum"), None for a model without a camera."""
    camera = getattr(model, "camera", None)
    return None if camera is None else camera.vtransform.pool.method


def lidar_encoder(config: Config) -> nn.Module:
    """PointPillars or the sparse voxel encoder, by `model.lidar_encoder`."""
    return VoxelLidarEncoder(config) if config.model.lidar_encoder == "sparse" else LidarEncoder(config)


def build_model(config: Config, modality: str = "fusion") -> BEVFusion:
    return BEVFusion(config.validate(), modality)


def example_inputs(
    config: Config, batch_size: int = 1, modality: str = "fusion", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of the right shapes and dtypes (for tracing, FLOP counting and export): random images and pillars;
    for the sparse voxel encoder, voxels and rulebooks of synthetic scans (`sparse_inputs.synthetic_cloud`, one
    scene per sample), since random voxels would have none of a LiDAR sweep's neighbourhoods, the rulebooks padded
    to the rows every exported graph has (`sparse_inputs.graph_rows`)."""
    g = torch.Generator().manual_seed(seed)
    rig, lidar = config.rig, config.lidar
    cells = config.grid.size_x * config.grid.size_y
    inputs = {"images": torch.rand(batch_size, rig.num_cameras, 3, rig.image_height, rig.image_width, generator=g)}
    if config.model.lidar_encoder == "sparse":
        if modality != "camera":
            samples = [voxel_inputs(synthetic_cloud(config, seed + i), config) for i in range(batch_size)]
            inputs["voxels"] = torch.from_numpy(np.stack([s["voxels"] for s in samples]))
            inputs["voxel_coords"] = torch.from_numpy(np.stack([s["voxel_coords"] for s in samples]))
            inputs["rulebooks"] = collate_rulebooks(samples)
            inputs = pad_inputs(inputs, graph_rows(config)[0], config)
    else:
        inputs["pillars"] = torch.randn(
            batch_size, lidar.point_features + 5, lidar.max_pillars, lidar.max_points_per_pillar, generator=g
        )
        inputs["pillar_map"] = torch.randint(0, lidar.max_pillars + 1, (batch_size, cells), generator=g)
    lidar_names = [k for k in inputs if k != "images"]
    names = {"camera": ["images"], "lidar": lidar_names}.get(modality, list(inputs))
    return {k: inputs[k] for k in names}
