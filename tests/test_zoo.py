"""A zoo of small fusion models the toolkit was not written for, each with a different trap: tuple
inputs and outputs, a Conv1d point encoder, a ConvTranspose decoder, a split head, a view that
torch-pruning maps wrongly (model A); token Linear layers with LayerNorm and a reshape that hard-codes
a channel count (model B); one input tensor holding both sensors, depthwise chains and add fusion
(model C); a cross-attention fuser (nn.MultiheadAttention, whose matmuls shrink with the pruned
embedding and whose flash-attention kernel has no second derivative, model D); skip concats across
resolutions, interpolation and a chunked head (model E). Every method must land within 2 points of 50% GFLOPs (or exactly 80% sparsity), keep the
output shapes, and leave what it cannot cut whole, with the reason in the report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altermoma

torch.set_num_threads(1)


class ConvBN(nn.Sequential):
    def __init__(s, i, o, k=3, st=1, g=1):
        super().__init__(nn.Conv2d(i, o, k, st, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Block(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.a = ConvBN(c, c)
        s.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        s.se1 = nn.Conv2d(c, c // 4, 1)
        s.se2 = nn.Conv2d(c // 4, c, 1)

    def forward(s, x):
        y = s.b(s.a(x))
        w = torch.sigmoid(s.se2(F.relu(s.se1(y.mean((2, 3), keepdim=True)))))
        return F.relu(x + y * w)


class ModelA(nn.Module):
    """tuple in, tuple out; conv1d point encoder; convtranspose decoder; split head"""

    def __init__(s):
        super().__init__()
        s.cam = nn.Sequential(ConvBN(3, 32, st=2), Block(32), ConvBN(32, 48, st=2))
        s.pts = nn.Sequential(nn.Conv1d(4, 32, 1), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 48, 1))
        s.fuse = ConvBN(96, 64)
        s.up = nn.Sequential(nn.ConvTranspose2d(64, 32, 2, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        s.head = nn.Conv2d(32, 7, 1)

    def forward(s, img, pts, cells):
        c = s.cam(img)  # B,48,8,8
        p = s.pts(pts)  # B,48,P
        canvas = (p[:, :, :1] * 0).expand(-1, -1, 64).contiguous()
        canvas = canvas.scatter_add(2, cells.unsqueeze(1).expand(-1, p.shape[1], -1), p)
        lidar = canvas.view(c.shape[0], 48, 8, 8)
        x = s.up(s.fuse(torch.cat([c, lidar], 1)))
        cls, reg = torch.split(s.head(x), [3, 4], dim=1)
        return cls, reg


def batchA(g):
    return {
        "img": torch.randn(2, 3, 32, 32, generator=g),
        "pts": torch.randn(2, 4, 100, generator=g),
        "cells": torch.randint(0, 64, (2, 100), generator=g),
        "y": torch.randn(2, 7, 16, 16, generator=g),
    }


taskA = altermoma.Task(
    {"camera": ["cam."], "lidar": ["pts."], "fusion": ["fuse.", "up.", "head."]},
    lambda o, b: ((torch.cat(o, 1) - b["y"]) ** 2).mean(),
    inputs=lambda b: (b["img"], b["pts"], b["cells"]),
)


class ModelB(nn.Module):
    """tokens (B, N, C) with Linear layers + LayerNorm; permute to BEV; Linear heads on tokens"""

    def __init__(s):
        super().__init__()
        s.cam = nn.Sequential(nn.Linear(12, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64))
        s.lidar = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64))
        s.fuse = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU())
        s.bev = nn.Conv2d(96, 64, 3, padding=1)
        s.cls = nn.Linear(64, 10)
        s.box = nn.Linear(64, 9)

    def forward(s, x):
        t = s.fuse(torch.cat([s.cam(x["cam"]), s.lidar(x["lidar"])], -1))  # B, 64, 96
        b = t.transpose(1, 2).reshape(t.shape[0], 96, 8, 8)
        f = F.relu(s.bev(b)).flatten(2).transpose(1, 2)
        return {"cls": s.cls(f), "box": s.box(f)}


def batchB(g):
    return {
        "cam": torch.randn(2, 64, 12, generator=g),
        "lidar": torch.randn(2, 64, 5, generator=g),
        "t": torch.randn(2, 64, 19, generator=g),
    }


taskB = altermoma.Task(
    {"camera": ["cam."], "lidar": ["lidar."], "fusion": ["fuse.", "bev.", "cls.", "box."]},
    lambda o, b: ((torch.cat([o["cls"], o["box"]], -1) - b["t"]) ** 2).mean(),
    inputs=lambda b: ({"cam": b["cam"], "lidar": b["lidar"]},),
)


class ModelC(nn.Module):
    """single tensor input holding both sensors (channels 0-2 image, 3-4 lidar); one tensor out; depthwise chain; add fusion"""

    def __init__(s):
        super().__init__()
        s.cam = nn.Sequential(ConvBN(3, 32), ConvBN(32, 32, g=32), ConvBN(32, 64, k=1), ConvBN(64, 64, g=64, st=2))
        s.lid = nn.Sequential(ConvBN(2, 32), ConvBN(32, 64, st=2))
        s.neck = nn.Sequential(ConvBN(64, 64), nn.Conv2d(64, 64, 1, groups=64))
        s.out = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 5, 1))

    def forward(s, x):
        return s.out(s.neck(s.cam(x[:, :3]) + s.lid(x[:, 3:])))


def batchC(g):
    return {"x": torch.randn(2, 5, 16, 16, generator=g), "y": torch.randn(2, 5, 8, 8, generator=g)}


taskC = altermoma.Task(
    {"camera": ["cam."], "lidar": ["lid."], "fusion": ["neck.", "out."]},
    lambda o, b: ((o - b["y"]) ** 2).mean(),
    inputs=lambda b: b["x"],
)


class AttnFuser(nn.Module):
    """camera tokens attend to lidar tokens with nn.MultiheadAttention; GELU MLP; heads with Linear"""

    def __init__(s):
        super().__init__()
        s.cam = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1))
        s.lidar = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64))
        s.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        s.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        s.norm = nn.LayerNorm(64)
        s.cls = nn.Linear(64, 3)

    def forward(s, img, pts):
        q = s.cam(img).flatten(2).transpose(1, 2)  # B, 64 tokens, 64
        kv = s.lidar(pts)
        x = q + s.attn(q, kv, kv, need_weights=False)[0]
        x = s.norm(x + s.mlp(x))
        return s.cls(x)


class UNetish(nn.Module):
    """skip connections with concat at different resolutions, interpolate upsampling, chunk head"""

    def __init__(s):
        super().__init__()
        s.cam = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU())
        s.lid = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU())
        s.down = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        s.bott = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU())
        s.up = nn.Conv2d(128, 48, 3, 1, 1)
        s.head = nn.Conv2d(48, 6, 1)

    def forward(s, x):
        f = torch.cat([s.cam(x[:, :3]), s.lid(x[:, 3:])], 1)
        d = s.bott(s.down(f))
        u = F.interpolate(d, scale_factor=2.0, mode="nearest")
        y = F.relu(s.up(torch.cat([u, f], 1)))
        a, b = s.head(y).chunk(2, dim=1)
        return {"a": a, "b": b}


def batchD(g):
    return {
        "img": torch.randn(2, 3, 32, 32, generator=g),
        "pts": torch.randn(2, 50, 4, generator=g),
        "y": torch.randn(2, 64, 3, generator=g),
    }


taskD = altermoma.Task(
    {"camera": ["cam."], "lidar": ["lidar."], "fusion": ["attn.", "mlp.", "norm.", "cls."]},
    lambda o, b: ((o - b["y"]) ** 2).mean(),
    inputs=lambda b: (b["img"], b["pts"]),
)


def batchE(g):
    return {"x": torch.randn(2, 4, 16, 16, generator=g), "y": torch.randn(2, 3, 16, 16, generator=g)}


taskE = altermoma.Task(
    {"camera": ["cam."], "lidar": ["lid."], "fusion": ["down.", "bott.", "up.", "head."]},
    lambda o, b: ((o["a"] - b["y"]) ** 2).mean() + o["b"].abs().mean(),
    inputs=lambda b: b["x"],
)

ZOO = {
    "A": (ModelA, taskA, batchA),
    "B": (ModelB, taskB, batchB),
    "C": (ModelC, taskC, batchC),
    "D-attention": (AttnFuser, taskD, batchD),
    "E-unet": (UNetish, taskE, batchE),
}
METHODS = ["altereva", "snip", "magnitude", "random", "synflow", "prospr", "imp"]
# The two slowest methods (IMP, SynFlow) run on every zoo model in `make test-slow`; in the default set they run
# through the shared harness in test_baselines.py, every other method also on the PKU-style model in test_byom.py.
SLOW_CASES = {
    f"{test}[{model}-{method}]"
    for test in ("test_structured_half_gflops_on_the_zoo", "test_unstructured_80_percent_on_the_zoo")
    for model in ("B", "C", "D-attention", "E-unet")
    for method in ("imp", "synflow")
} | {
    "test_unstructured_80_percent_on_the_zoo[A-synflow]",
    "test_structured_half_gflops_on_the_zoo[A-synflow]",
    "test_structured_half_gflops_on_the_zoo[A-imp]",
    "test_unstructured_80_percent_on_the_zoo[A-imp]",
}  # IMP's default-set cases are in test_baselines.py, SynFlow's in test_baselines.py and test_byom.py
# Both hard-code a channel count in a reshape (model A: the LiDAR canvas view, 48; model B: 96): a selection
# that cuts that group breaks the forward pass, and the group is left whole with the reason.
LEFT_WHOLE = {"A": "pts.3", "B": "fuse.2"}


def _shapes(outputs):
    if isinstance(outputs, dict):
        return {k: tuple(v.shape) for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return [tuple(v.shape) for v in outputs]
    return tuple(outputs.shape)


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
    build, task, make = ZOO[request.param]
    g = torch.Generator().manual_seed(0)
    batches = [make(g) for _ in range(3)]
    torch.manual_seed(0)
    return request.param, build().eval(), task, batches


@pytest.mark.parametrize("method", METHODS)
def test_structured_half_gflops_on_the_zoo(zoo, method):
    name, base, task, batches = zoo
    model = copy.deepcopy(base)
    with torch.no_grad():
        before = _shapes(task.forward(model, batches[0]))
    report = altermoma.prune(model, task, batches, method=method, target_gflops=0.5, progress=False)
    if method == "imp":  # IMP cannot undo a level: a miss beyond 2 points is warned about and recorded
        assert abs(report["gflops_reduction"] - 0.5) <= 0.03 and (
            abs(report["gflops_reduction"] - 0.5) <= 0.02 or "target_miss" in report
        ), report["gflops_reduction"]
    else:
        assert abs(report["gflops_reduction"] - 0.5) <= 0.02, report["gflops_reduction"]
    with torch.no_grad():
        assert _shapes(task.forward(model, batches[0])) == before
    assert all(w % 8 == 0 for w in report["widths"].values()), report["widths"]
    if method == "prospr":  # the report names the mode the scores were made in, not only the one asked for
        want = {"mode": "first-order", "asked": "full"} if name == "D-attention" else {"mode": "full"}
        assert {k: v for k, v in report["prospr"].items() if k != "reason"} == want, report.get("prospr")
    if name in LEFT_WHOLE:  # a channel count hard-coded in a reshape: left whole once a selection cuts it
        root = LEFT_WHOLE[name]
        left = root in [g["root"] for g in report["unpruned_groups"]]
        width = dict(model.named_modules())[root].weight.shape[0]
        assert left or width == dict(base.named_modules())[root].weight.shape[0], report["unpruned_groups"]


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_80_percent_on_the_zoo(zoo, method):
    _, base, task, batches = zoo
    model = copy.deepcopy(base)
    report = altermoma.prune(model, task, batches, method=method, sparsity=0.8, progress=False)
    assert abs(report["sparsity"] - 0.8) <= 1e-3
    modules = dict(model.named_modules())
    for layer in report["protected"]:  # output layers stay dense (IMP fine-tunes them between levels)
        assert bool((modules[layer].weight != 0).all()), layer
