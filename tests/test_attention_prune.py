"""Query heads in any calling convention, and layers no pruner knows, through `prune`.

A DETR/TransFusion-style head whose queries are an `nn.Parameter` expanded over the batch and fed to
`nn.MultiheadAttention` used to crash the FLOP count (torch's module tracker under no_grad). Every method
must now prune it, with `batch_first` and `need_weights` either way and a dict argument, exactly (the pruned
model equals the zeroed one: heads keep equal widths and the softmax scale is restored); and a layer whose
kind no pruner knows (a custom op torch cannot see) is named in the report, never skipped silently.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import altermoma
from altermoma.cli import coverage_notes
from compress.request import IMPConfig

torch.set_num_threads(1)


class QueryHead(nn.Module):
    def __init__(self, channels: int = 32, queries: int = 8, batch_first: bool = True, need_weights: bool = False):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, channels))
        self.attn = nn.MultiheadAttention(channels, 4, batch_first=batch_first)
        self.ffn1, self.ffn2 = nn.Linear(channels, 64), nn.Linear(64, channels)
        self.cls = nn.Linear(channels, 5)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        memory = bev.flatten(2).transpose(1, 2)
        queries = self.query.unsqueeze(0).expand(bev.shape[0], -1, -1)
        if not self.batch_first:
            queries, memory = queries.transpose(0, 1), memory.transpose(0, 1)
        attended, _ = self.attn(queries, memory, memory, need_weights=self.need_weights)
        if not self.batch_first:
            attended = attended.transpose(0, 1)
        return self.cls(attended + self.ffn2(torch.relu(self.ffn1(attended))))


def branch(cin: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
    )


class QueryFusion(nn.Module):
    def __init__(self, **head):
        super().__init__()
        self.cam, self.lid = branch(3), branch(2)
        self.fuse = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = QueryHead(**head)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.fuse(torch.cat([self.cam(batch["img"]), self.lid(batch["bev"])], 1)))


TASK = altermoma.Task(
    partition={"camera": ["cam"], "lidar": ["lid"], "fusion": ["fuse", "head"]},
    loss=lambda out, batch: (out - batch["target"]).pow(2).mean(),
    inputs=lambda batch: ({"img": batch["img"], "bev": batch["bev"]},),
)


def batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "img": torch.randn(2, 3, 8, 8, generator=g),
            "bev": torch.randn(2, 2, 8, 8, generator=g),
            "target": torch.randn(2, 8, 5, generator=g),
        }
        for _ in range(n)
    ]


METHODS = ["altereva", "snip", "magnitude", "random", "synflow", "prospr", "imp"]


CASES = [(method, True, False) for method in METHODS] + [(m, False, True) for m in ("magnitude", "snip")]
# The default set keeps one gradient-free, one first-order and AlterEva's scoring (exactness and every calling
# convention with magnitude); the other methods run with `make test-slow`.
SLOW_CASES = {
    f"test_learned_query_head_prunes_with_every_method[{case}]"
    for case in ("random-True-False", "synflow-True-False", "prospr-True-False", "imp-True-False", "snip-False-True")
}


@pytest.mark.parametrize("method,batch_first,need_weights", CASES)
def test_learned_query_head_prunes_with_every_method(method, batch_first, need_weights):
    torch.manual_seed(0)
    model = QueryFusion(batch_first=batch_first, need_weights=need_weights).eval()
    data = batches()
    with torch.no_grad():
        shape = TASK.forward(model, data[0]).shape
    report = altermoma.prune(
        model,
        TASK,
        data,
        method=method,
        target_gflops=0.5,
        round_to=4,
        imp=IMPConfig(levels=2, finetune_steps=4),
        progress=False,
    )
    assert abs(report["gflops_reduction"] - 0.5) <= 0.03 if method == "imp" else 0.02, report["gflops_reduction"]
    assert report["gflops_before"] > report["gflops_after"] > 0
    assert report["left_whole"]["modules"] == [], report["left_whole"]  # the query is coupled to its group
    with torch.no_grad():
        assert TASK.forward(model, data[0]).shape == shape
    assert model.head.query.shape[1] == model.head.attn.embed_dim
    # exact: every head lost as many channels and the softmax scale was restored
    assert report["zero_then_prune_error"] <= 1e-4, report["zero_then_prune_error"]
    attn = model.head.attn
    assert attn.num_heads == 4 and attn.embed_dim % 4 == 0 and attn.head_dim == attn.embed_dim // 4


class NumpyLinear(torch.autograd.Function):
    """A stand-in for a custom CUDA op: torch's dispatcher (and so FlopCounterMode) never sees its matmul."""

    @staticmethod
    def forward(ctx, x, weight):
        return torch.from_numpy(np.ascontiguousarray(x.detach().numpy() @ weight.detach().numpy().T))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ThirdPartyConv(nn.Module):
    """A 1x1 bottleneck from a library the toolkit does not know, computing outside torch."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.expand = nn.Parameter(torch.randn(hidden, channels) * 0.1)
        self.reduce = nn.Parameter(torch.randn(channels, hidden) * 0.1)

    def forward(self, x):
        tokens = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        tokens = NumpyLinear.apply(NumpyLinear.apply(tokens, self.expand), self.reduce)
        return tokens.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)


class WithCustomOp(QueryFusion):
    def __init__(self):
        super().__init__()
        self.custom = ThirdPartyConv(32)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.custom(self.fuse(torch.cat([self.cam(batch["img"]), self.lid(batch["bev"])], 1))))


CUSTOM_TASK = altermoma.Task(
    partition={"camera": ["cam"], "lidar": ["lid"], "fusion": ["fuse", "head", "custom"]},
    loss=TASK.loss,
    inputs=TASK.inputs,
)


def test_a_layer_no_pruner_knows_is_named_left_whole_and_uncounted():
    torch.manual_seed(0)
    model = WithCustomOp().eval()
    total = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = altermoma.prune(
            copy.deepcopy(model),
            CUSTOM_TASK,
            batches(),
            method="magnitude",
            target_gflops=0.3,
            round_to=4,
            best_effort=True,
            progress=False,
        )
    [entry] = report["left_whole"]["modules"]
    assert entry["module"] == "custom" and entry["parameters"] == ["custom.expand", "custom.reduce"]
    assert "no pruner knows" in entry["reason"] and entry["params"] == 2 * 32 * 128
    assert report["left_whole"]["share"] == pytest.approx(2 * 32 * 128 / total)
    assert [u["module"] for u in report["flop_counting"]["uncounted"]] == ["custom"]
    # it holds more than 5% of the parameters: the prune warns that its count leaves them out
    assert 2 * 32 * 128 / total > 0.05
    assert "custom.expand" in report["unpruned_groups"][0]["reason"]  # its group is left whole, not mis-cut
    assert any("GFLOPs count leaves out" in str(w.message) for w in caught)
    [note] = coverage_notes(report)
    assert note.startswith("note: left whole") and "custom" in note and "not in the GFLOPs count" in note
