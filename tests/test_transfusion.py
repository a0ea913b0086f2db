"""TransFusion head: proposals, shapes, decoding format, Hungarian assignment, losses, ONNX parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusion.config import BEVGrid
from fusion.data.targets import build_targets
from fusion.metrics import detection_metrics
from fusion.models.transfusion import (
    BOX_LOSS_WEIGHT,
    VELOCITY_CODE_WEIGHT,
    TransFusionHead,
    assign_targets,
    bev_cell_centres,
    decode_transfusion,
    encode_boxes,
    hungarian_assign,
    match_cost,
    transfusion_loss,
)

GRID = BEVGrid(x_range=(-6.4, 6.4), y_range=(-6.4, 6.4), cell=0.8)  # 16 x 16 cells
NUM_CLASSES = 3


def _head(velocity: bool = False, **kwargs) -> TransFusionHead:
    torch.manual_seed(0)
    options = dict(channels=32, num_proposals=12, num_heads=4, ffn_channels=64, head_channels=16, velocity=velocity)
    return TransFusionHead(16, NUM_CLASSES, **{**options, **kwargs})


def _batch(velocity: bool = False) -> dict[str, torch.Tensor]:
    """Two scenes (3 and 4 objects, padded to 6) with the CenterPoint targets of fusion.data.targets."""
    rng = np.random.default_rng(0)
    samples = []
    for n in (3, 4):
        boxes = np.zeros((6, 7), np.float32)
        labels = np.full(6, -1, np.int64)
        boxes[:n, :2] = rng.uniform(-5.5, 5.5, (n, 2))
        boxes[:n, 2] = rng.uniform(0, 1, n)
        boxes[:n, 3:6] = rng.uniform(1, 4, (n, 3))
        boxes[:n, 6] = rng.uniform(-3, 3, n)
        labels[:n] = rng.integers(0, NUM_CLASSES, n)
        velocities = np.zeros((6, 2), np.float32)
        velocities[:n] = rng.uniform(-2, 2, (n, 2))
        velocities[0] = np.nan  # unknown velocity: not supervised
        sample = {"boxes": boxes, "labels": labels}
        sample.update(build_targets(boxes[:n], labels[:n], GRID, NUM_CLASSES, 6, velocities[:n] if velocity else None))
        if velocity:
            sample["velocities"] = np.nan_to_num(velocities)
        samples.append(sample)
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def test_forward_shapes():
    head = _head(velocity=True).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 16, 16, 16))
    p = head.num_proposals
    expected = {
        "center": (2, 2, p),
        "height": (2, 1, p),
        "size": (2, 3, p),
        "rotation": (2, 2, p),
        "velocity": (2, 2, p),
        "query_heatmap": (2, NUM_CLASSES, p),
        "query_score": (2, NUM_CLASSES, p),
        "query_labels": (2, p),
        "dense_heatmap": (2, NUM_CLASSES, 16, 16),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert out["query_labels"].dtype == torch.int64
    assert ((out["query_labels"] >= 0) & (out["query_labels"] < NUM_CLASSES)).all()
    assert ((out["query_score"] >= 0) & (out["query_score"] <= 1)).all()
    # every proposal is a peak of its own class (16 x 16 x 3 cells hold more than 12 peaks)
    assert (out["query_score"].gather(1, out["query_labels"].unsqueeze(1)) > 0).all()
    assert "velocity" not in _head().eval()(torch.randn(1, 16, 8, 12))
    assert [m.out_channels for m in head.output_layers()] == [NUM_CLASSES, 2, 1, 3, 2, 2, NUM_CLASSES]


def _brute_force_proposals(heat: np.ndarray, k: int, no_nms: tuple[int, ...] = ()) -> set[tuple[int, int]]:
    """(class, cell) of the k best 3x3 local maxima (every cell for a no-NMS class), by loops."""
    classes, height, width = heat.shape
    candidates = []
    for c in range(classes):
        for y in range(height):
            for x in range(width):
                window = heat[c, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                if c in no_nms or heat[c, y, x] >= window.max():
                    candidates.append((heat[c, y, x], c, y * width + x))
    candidates.sort(reverse=True)
    assert len(candidates) >= k
    return {(c, cell) for _, c, cell in candidates[:k]}


@pytest.mark.parametrize("no_nms", [(), (2,)])
def test_proposals_are_the_best_local_maxima_in_index_order(no_nms):
    head = _head(no_nms_classes=no_nms, num_proposals=20)
    torch.manual_seed(1)
    logits = torch.randn(2, NUM_CLASSES, 10, 12)
    labels, cells, peaks = head.proposals(logits)
    heat = logits.sigmoid().numpy()
    for i in range(2):
        got = list(zip(labels[i].tolist(), cells[i].tolist()))
        assert set(got) == _brute_force_proposals(heat[i], 20, no_nms)
        flat = [label * 120 + cell for label, cell in got]
        assert flat == sorted(flat)
    assert ((peaks == 0) | (peaks == logits.sigmoid().flatten(2))).all()


def test_bev_cell_centres_follow_the_flat_index():
    centres = bev_cell_centres(2, 3, torch.device("cpu"), torch.float32)
    assert centres.shape == (6, 2)
    assert centres[4].tolist() == [1.5, 1.5]  # flat 4 = row 1, column 1
    assert centres[2].tolist() == [2.5, 0.5]


def _hand_outputs() -> dict[str, torch.Tensor]:
    """One sample, 2 classes, 3 queries, every value chosen by hand."""
    logit = math.log(4.0)  # sigmoid = 0.8
    return {
        "query_labels": torch.tensor([[0, 1, 1]]),
        "query_heatmap": torch.tensor([[[logit, 5.0, 5.0], [-5.0, logit, -logit]]]),
        "query_score": torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.9, 0.25]]]),
        "center": torch.tensor([[[3.5, 8.0, 0.25], [2.25, 8.0, 15.5]]]),
        "height": torch.tensor([[[0.5, -1.0, 0.0]]]),
        "size": torch.tensor([[[0.0, math.log(2.0), 9.0], [0.0, 0.0, 0.0], [0.0, math.log(1.5), 0.0]]]),
        "rotation": torch.tensor([[[1.0, 0.0, 0.0], [0.0, -1.0, 1.0]]]),
        "velocity": torch.tensor([[[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]]]),
    }


def test_decode_hand_built_outputs():
    (result,) = decode_transfusion(_hand_outputs(), GRID, score_threshold=0.1)
    assert sorted(result) == ["boxes", "labels", "scores", "velocities"]
    # scores: query 1: 0.8 * 0.9 = 0.72 (class 1); query 0: 0.8 * 0.5 = 0.4 (class 0); query 2: 0.2 * 0.25 = 0.05
    assert np.allclose(result["scores"], [0.72, 0.4])
    assert result["labels"].tolist() == [1, 0]
    expected = [
        [-6.4 + 8.0 * 0.8, -6.4 + 8.0 * 0.8, -1.0, 2.0, 1.0, 1.5, math.pi],
        [-6.4 + 3.5 * 0.8, -6.4 + 2.25 * 0.8, 0.5, 1.0, 1.0, 1.0, math.pi / 2],
    ]
    assert result["boxes"].shape == (2, 7) and result["boxes"].dtype == np.float32
    assert np.allclose(result["boxes"], expected, atol=1e-5)
    assert np.allclose(result["velocities"], [[2.0, -2.0], [1.0, -1.0]])
    (low,) = decode_transfusion(_hand_outputs(), GRID, score_threshold=0.01, top_k=2)
    assert np.allclose(low["scores"], [0.72, 0.4])
    (all_three,) = decode_transfusion(_hand_outputs(), GRID, score_threshold=0.01)
    assert np.allclose(all_three["boxes"][2, 3], math.exp(4.0))  # log-size clamped at 4 as decode_boxes


def test_detection_counts_of_the_quantize_report_decode_the_query_head():
    """`altermoma quantize`'s per-scene detection counts go through the decoder of the head the model has."""
    from altermoma.cli_quant import detections_per_scene

    assert detections_per_scene(_hand_outputs(), GRID, score_threshold=0.1) == [2]
    assert detections_per_scene(_hand_outputs(), GRID, score_threshold=0.01) == [3]


def test_decoded_forward_is_scored_by_the_metrics():
    head = _head().eval()
    batch = _batch()
    with torch.no_grad():
        predictions = decode_transfusion(head(torch.randn(2, 16, 16, 16)), GRID, score_threshold=0.0)
    assert [len(p["scores"]) for p in predictions] == [12, 12]
    truths = [{"boxes": b.numpy(), "labels": lab.numpy()} for b, lab in zip(batch["boxes"], batch["labels"])]
    metrics = detection_metrics(predictions, truths, ("car", "truck", "pedestrian"))
    assert 0.0 <= metrics["mAP"] <= 1.0


def test_match_cost_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 0.5 and 0.75
    cost = match_cost(
        logits, torch.tensor([[1.0, 2.0]]), torch.tensor([1, 0]), torch.tensor([[3.0, 2.0], [1.0, 6.0]]), (16, 8)
    )
    p = 0.75
    focal_1 = -math.log(p) * 0.25 * (1 - p) ** 2 + math.log(1 - p) * 0.75 * p**2
    p = 0.5
    focal_0 = -math.log(p) * 0.25 * (1 - p) ** 2 + math.log(1 - p) * 0.75 * p**2
    expected = [[0.15 * focal_1 + 0.25 * (2.0 / 16), 0.15 * focal_0 + 0.25 * (4.0 / 8)]]
    assert torch.allclose(cost, torch.tensor(expected), atol=1e-6)


def test_hungarian_finds_the_optimum_where_greedy_fails():
    """Query 0 is closest to both ground truths; greedy (GT 0 first) would give it GT 0 and leave GT 1 to the
    far query 2 (total 0.1 + 8); the optimum gives GT 0 to query 1 and GT 1 to query 0 (0.3 + 0.2)."""
    cost = torch.tensor([[0.1, 0.2], [0.3, 5.0], [9.0, 8.0]])
    assert hungarian_assign(cost).tolist() == [1, 0, -1]
    assert hungarian_assign(torch.zeros(3, 0)).tolist() == [-1, -1, -1]


def test_hungarian_on_three_queries_from_the_cost():
    """Three queries, two objects: queries 0 and 1 sit on the same spot as object A (class 1) and differ only
    in class belief; query 2 sits on object B (class 0). The class cost must decide between 0 and 1."""
    logits = torch.tensor([[-4.0, 4.0], [4.0, -4.0], [4.0, -4.0]])  # query 0 says class 1, queries 1 and 2 class 0
    centers = torch.tensor([[5.0, 5.0], [5.0, 5.0], [12.0, 3.0]])
    cost = match_cost(logits, centers, torch.tensor([1, 0]), torch.tensor([[5.2, 5.1], [12.0, 3.5]]), (16, 16))
    assert hungarian_assign(cost).tolist() == [0, -1, 1]


def test_assign_targets_encodes_matched_boxes_and_skips_padding_and_off_grid():
    boxes = torch.tensor([[[0.4, -2.0, 0.5, 4.0, 2.0, 1.5, 0.3], [30.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 7]])
    batch = {"boxes": boxes, "labels": torch.tensor([[2, 0, -1]])}
    code = encode_boxes(boxes[0, :1], GRID)[0]
    assert torch.allclose(code[:2], torch.tensor([(0.4 + 6.4) / 0.8, (-2.0 + 6.4) / 0.8]))
    outputs = {
        "query_heatmap": torch.zeros(1, NUM_CLASSES, 2),
        "center": torch.tensor([[[1.0, code[0].item()], [1.0, code[1].item()]]]),
    }
    targets = assign_targets(outputs, batch, GRID)
    assert targets["num_positive"].item() == 1.0  # the off-grid box (x = 30 m) and the padding are not matched
    assert targets["labels"][0, :, 0].tolist() == [0, 0, 0] and targets["labels"][0, :, 1].tolist() == [0, 0, 1]
    assert torch.allclose(targets["boxes"][0, :, 1], code) and (targets["boxes"][0, :, 0] == 0).all()
    assert targets["weights"][0, :, 1].tolist() == [1.0] * 8 and (targets["weights"][0, :, 0] == 0).all()


def test_velocity_loss_is_weighted_and_skips_unknown_velocities():
    head = _head(velocity=True).eval()
    batch = _batch(velocity=True)
    with torch.no_grad():
        outputs = head(torch.randn(2, 16, 16, 16))
    targets = assign_targets(outputs, batch, GRID)
    weights = targets["weights"]
    assert weights.shape[1] == 10
    assert torch.allclose(weights[:, 8:].unique(), torch.tensor([0.0, VELOCITY_CODE_WEIGHT]))
    # object 0 of each scene has an unknown (NaN) velocity: its query gets box weights but no velocity weight
    for i in range(2):
        code = encode_boxes(batch["boxes"][i, :1].float(), GRID)[0]
        query = (targets["boxes"][i, :8] - code[:, None]).abs().sum(dim=0).argmin()
        assert weights[i, 0, query] == 1.0 and weights[i, 8, query] == 0.0
    assert (weights[:, 8] > 0).sum() == 5  # 7 objects, 2 unknown
    without = {k: v for k, v in batch.items() if k not in ("velocities", "target_velocity_mask", "target_velocity")}
    with torch.no_grad():
        _, parts = transfusion_loss(outputs, batch, GRID)
        _, parts_without = transfusion_loss(outputs, without, GRID)
        velocity_l1 = ((outputs["velocity"] - targets["boxes"][:, 8:]).abs() * weights[:, 8:]).sum()
    expected = BOX_LOSS_WEIGHT * velocity_l1.item() / targets["num_positive"].item()
    assert parts["box"] - parts_without["box"] == pytest.approx(expected, rel=1e-4)


def test_loss_without_ground_truth_is_finite():
    head = _head()
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -1)
    batch["heatmap"] = torch.zeros_like(batch["heatmap"])
    loss, parts = transfusion_loss(head(torch.randn(2, 16, 16, 16)), batch, GRID)
    assert math.isfinite(loss.item()) and parts["box"] == 0.0
    loss.backward()


def test_loss_decreases_on_a_fixed_batch():
    """20 Adam steps on one synthetic batch: every part of the loss falls, the total to under half."""
    head = _head()
    batch = _batch()
    torch.manual_seed(0)
    bev = torch.randn(2, 16, 16, 16)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        loss, parts = transfusion_loss(head(bev), batch, GRID)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append((loss.item(), parts))
    (first, first_parts), (last, last_parts) = history[0], history[-1]
    assert last < 0.5 * first
    assert all(last_parts[k] < first_parts[k] for k in first_parts)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # static shapes are the point of the export
def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    head = _head(velocity=True).eval()
    bev = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        expected = head(bev)
    names = list(expected)
    path = tmp_path / "transfusion.onnx"
    torch.onnx.export(head, (bev,), str(path), input_names=["bev"], output_names=names, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, {"bev": bev.numpy()})))
    assert np.array_equal(got["query_labels"], expected["query_labels"].numpy())
    for name in names:
        assert got[name].shape == tuple(expected[name].shape)
        assert np.abs(got[name] - expected[name].numpy()).max() <= 1e-4, name
