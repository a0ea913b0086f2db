"""Sparse voxel encoder backends: the plain-PyTorch rulebook convs (`common.sparse`) against spconv 2.x (forward
parity, same parameters, pair counts), against dense Conv3d on a full grid (values and gradients), its ONNX
export, and the static-shape voxelisation (`fusion.data.voxelize`).

spconv 2.3.8's CPU build races with more than one torch thread (two identical calls differed by 5e-3), so
every spconv comparison runs with one thread (set here and in conftest).
"""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import sparse as cs
from fusion.data.voxelize import batch_voxels, grid_shape, voxelize
from fusion.models.sparse_encoder import SparseEncoder

torch.set_num_threads(1)

SHAPE = (5, 6, 7)
ENCODER = {
    "base_channels": 8,
    "output_channels": 16,
    "encoder_channels": ((8, 8, 16), (16, 16, 24), (24, 24, 32), (32, 32)),
    "encoder_paddings": ((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0)),
}
RANGE = (-3.2, -3.2, -2.0, 3.2, 3.2, 2.1)  # with VOXEL: grid (41, 32, 32), mmdet3d's z extent
VOXEL = (0.2, 0.2, 0.1)


@pytest.fixture(scope="module")
def spconv():
    try:
        import spconv.pytorch as sp
    except ImportError as error:
        pytest.skip(f"spconv is not installed ({error}); the plain backend is tested without it")
    return sp


def random_sites(seed: int, count: int = 40, shape=SHAPE, batch: int = 2) -> torch.Tensor:
    """`count` distinct (batch, z, y, x) sites in random order."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(batch * int(np.prod(shape)), count, replace=False)
    return torch.from_numpy(cs._unlinear(cells, shape).astype(np.int32))


def with_padding(features: torch.Tensor, indices: torch.Tensor, every: int = 5):
    """Insert a padding row (indices -1, random features) after every `every` rows: the plain backend's input."""
    rows_f, rows_i = [], []
    for start in range(0, len(features), every):
        rows_f += [features[start : start + every], torch.randn(1, features.shape[1]) * 100]
        rows_i += [indices[start : start + every], torch.full((1, 4), -1, dtype=torch.int32)]
    return torch.cat(rows_f), torch.cat(rows_i)


def run_both(sp, plain_layers, spconv_layers, features, indices, shape=SHAPE, batch=2):
    """Copy each spconv layer's state into its plain twin, run both chains; plain sees padding rows."""
    for plain, ref in zip(plain_layers, spconv_layers):
        plain.load_state_dict(ref.state_dict())
    padded_f, padded_i = with_padding(features, indices)
    book = cs.build_rulebooks(padded_i, shape, batch, cs.layer_specs(nn.ModuleList(plain_layers)))
    x = cs.SparseTensor(padded_f, padded_i, shape, batch, book)
    y = sp.SparseConvTensor(features, indices, list(shape), batch)
    for plain, ref in zip(plain_layers, spconv_layers):
        x, y = plain(x), ref(y)
    return x, y, book


def test_subm_matches_spconv_and_counts_pairs(spconv):
    indices, features = random_sites(0), torch.randn(40, 3)
    x, y, book = run_both(
        spconv,
        [cs.SubMConv3d(3, 4, 3, indice_key="s")],
        [spconv.SubMConv3d(3, 4, 3, indice_key="s")],
        features,
        indices,
    )
    torch.testing.assert_close(x.dense(), y.dense(), atol=1e-5, rtol=0)
    # spconv's native SubM rulebook stores each symmetric pair once and the centre offset not at all
    pair_num = y.indice_dict["s"].indice_pair_num
    assert int(pair_num[13]) == 0
    assert book["s"].active_pairs() == 2 * int(pair_num.sum()) + len(indices)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 2, 1), ((3, 1, 1), (2, 1, 1), 0), (3, 2, (0, 1, 1)), (2, 2, 0)],
)
def test_strided_and_inverse_match_spconv(spconv, kernel, stride, padding):
    indices, features = random_sites(1), torch.randn(40, 3)
    plain = [
        cs.SparseConv3d(3, 4, kernel, stride=stride, padding=padding, indice_key="c"),
        cs.SparseInverseConv3d(4, 5, kernel, indice_key="c"),
    ]
    ref = [
        spconv.SparseConv3d(3, 4, kernel, stride=stride, padding=padding, indice_key="c"),
        spconv.SparseInverseConv3d(4, 5, kernel, indice_key="c"),
    ]
    strided, strided_ref, book = run_both(spconv, plain[:1], ref[:1], features, indices)
    torch.testing.assert_close(strided.dense(), strided_ref.dense(), atol=1e-5, rtol=0)
    assert strided.spatial_shape == list(strided_ref.spatial_shape)
    assert len(strided.valid_index) == len(strided_ref.indices)
    assert book["c"].active_pairs() == int(strided_ref.indice_dict["c"].indice_pair_num.sum())

    back, back_ref, _ = run_both(spconv, plain, ref, features, indices)
    assert back.spatial_shape == list(SHAPE)
    torch.testing.assert_close(back.dense(), back_ref.dense(), atol=1e-5, rtol=0)


def test_conv1x1_reads_weight_as_spconv_does(spconv):
    indices, features = random_sites(2), torch.randn(40, 3)
    x, y, _ = run_both(spconv, [cs.SubMConv3d(3, 4, 1)], [spconv.SubMConv3d(3, 4, 1)], features, indices)
    torch.testing.assert_close(x.dense(), y.dense(), atol=1e-5, rtol=0)


def test_state_dicts_have_spconv_names_and_shapes(spconv):
    pairs = [
        (cs.SubMConv3d(3, 4, 3, bias=False), spconv.SubMConv3d(3, 4, 3, bias=False)),
        (cs.SparseConv3d(3, 4, (3, 1, 1), stride=(2, 1, 1)), spconv.SparseConv3d(3, 4, (3, 1, 1), stride=(2, 1, 1))),
        (cs.SparseInverseConv3d(4, 3, 3, indice_key="k"), spconv.SparseInverseConv3d(4, 3, 3, indice_key="k")),
    ]
    for plain, ref in pairs:
        assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        for name in ("in_channels", "out_channels", "subm", "inverse", "transposed", "groups", "indice_key"):
            assert getattr(plain, name) == getattr(ref, name), name
        for name in ("kernel_size", "stride", "padding", "dilation"):
            assert getattr(plain, name) == tuple(getattr(ref, name)), name


def voxel_batch(seed: int, max_voxels: int = 450, points: int = 400):
    """Two random clouds voxelised to fixed-size padded tensors."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(2):
        xyz = rng.uniform(RANGE[:3], RANGE[3:], size=(points, 3))
        cloud = np.concatenate([xyz, rng.uniform(0, 1, (points, 1))], axis=1).astype(np.float32)
        samples.append(voxelize(cloud, VOXEL, RANGE, max_voxels, 4))
    features, indices, counts = batch_voxels(samples)
    return torch.from_numpy(features), torch.from_numpy(indices), counts


def calibrate_norms(model: SparseEncoder, features, indices, book) -> None:
    """Running statistics from one training pass (momentum 1) and random affine terms: eval outputs O(1)."""
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for module in norms:
        module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
        module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(features, indices, 2, book)
    for module in norms:
        module.momentum = 0.01
    model.eval()


def test_encoder_backends_agree_and_share_state_dicts(spconv):
    features, indices, counts = voxel_batch(0)
    shape = grid_shape(RANGE, VOXEL)
    torch.manual_seed(0)
    plain = SparseEncoder(4, shape, backend="plain", **ENCODER)
    ref = SparseEncoder(4, shape, backend="spconv", **ENCODER)
    assert list(plain.state_dict()) == list(ref.state_dict())
    book = plain.build_rulebooks(indices, 2)
    calibrate_norms(plain, features, indices, book)
    ref.load_state_dict(plain.state_dict())

    plain.eval()
    ref.eval()
    out = plain(features, indices, 2, book)
    assert out.shape == (2, plain.out_channels, *plain.output_shape[1:]) == (2, 32, 4, 4)
    torch.testing.assert_close(out, ref(features, indices, 2), atol=1e-5, rtol=0)
    assert out.abs().max() > 0.1

    # training mode: BatchNorm statistics over real rows only (plain carries 2 x 450 - counts padding rows)
    assert counts.sum() < len(indices)
    plain.train()
    ref.train()
    out_train, ref_train = plain(features, indices, 2, book), ref(features, indices, 2)
    torch.testing.assert_close(out_train, ref_train, atol=1e-5 * float(ref_train.abs().max()), rtol=0)
    for (name, a), b in zip(plain.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)

    # and back: a state dict from the spconv backend loads into a fresh plain one
    fresh = SparseEncoder(4, shape, backend="plain", **ENCODER).eval()
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh(features, indices, 2, book), ref.eval()(features, indices, 2), atol=1e-5, rtol=0)


def full_grid(shape=(3, 4, 5), batch: int = 2, channels: int = 3, seed: int = 0):
    """Every site of a small grid active, rows shuffled, padding rows inserted; and the same data dense."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randperm(batch * int(np.prod(shape)), generator=generator).numpy()
    indices = torch.from_numpy(cs._unlinear(cells, shape).astype(np.int32))
    features = torch.randn(len(indices), channels, generator=generator)
    padded_f, padded_i = with_padding(features, indices, every=7)
    padded_f.requires_grad_(True)
    dense = torch.zeros(batch, *shape, channels)
    real = padded_i[:, 0] >= 0
    idx = padded_i[real].long()
    dense = dense.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), padded_f[real])
    return padded_f, padded_i, dense.permute(0, 4, 1, 2, 3)


def assert_same_gradients(sparse_out: torch.Tensor, dense_out: torch.Tensor, tensors_a, tensors_b) -> None:
    torch.testing.assert_close(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    seed = torch.Generator().manual_seed(1)
    cotangent = torch.randn(dense_out.shape, generator=seed)
    grads_a = torch.autograd.grad((sparse_out * cotangent).sum(), tensors_a, retain_graph=True)
    grads_b = torch.autograd.grad((dense_out * cotangent).sum(), tensors_b, retain_graph=True)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_subm_on_full_grid_is_padded_dense_conv_with_same_gradients():
    features, indices, dense = full_grid()
    conv = cs.SubMConv3d(3, 4, 3, indice_key="s")
    book = cs.build_rulebooks(indices, (3, 4, 5), 2, cs.layer_specs(conv))
    out = conv(cs.SparseTensor(features, indices, (3, 4, 5), 2, book)).dense()
    weight = conv.weight.permute(0, 4, 1, 2, 3)
    ref = F.conv3d(dense, weight, conv.bias, padding=1)
    assert_same_gradients(out, ref, (features, conv.weight, conv.bias), (features, conv.weight, conv.bias))


def test_strided_and_inverse_on_full_grid_are_dense_convs_with_same_gradients():
    features, indices, dense = full_grid(seed=1)
    down = cs.SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key="d")
    up = cs.SparseInverseConv3d(4, 2, 3, indice_key="d")
    book = cs.build_rulebooks(indices, (3, 4, 5), 2, cs.layer_specs(nn.ModuleList([down, up])))
    mid = down(cs.SparseTensor(features, indices, (3, 4, 5), 2, book))
    assert mid.spatial_shape == [2, 2, 3] and len(mid.valid_index) == 2 * 2 * 2 * 3  # a full grid stays full
    ref_mid = F.conv3d(dense, down.weight.permute(0, 4, 1, 2, 3), down.bias, stride=2, padding=1)
    assert_same_gradients(mid.dense(), ref_mid, (features, down.weight), (features, down.weight))

    out = up(mid).dense()
    # the inverse conv is the transposed conv of the pairs: nn.ConvTranspose3d with the output padding
    # that restores the input grid (3, 4, 5) from (2, 2, 3)
    ref = F.conv_transpose3d(ref_mid, up.weight.permute(4, 0, 1, 2, 3), up.bias, 2, 1, output_padding=(0, 1, 0))
    assert_same_gradients(out, ref, (features, down.weight, up.weight), (features, down.weight, up.weight))


def test_full_grid_pair_counts():
    _, indices, _ = full_grid()
    subm = cs.build_rulebooks(indices, (3, 4, 5), 2, [cs.LayerSpec("s", (3, 3, 3), subm=True)])["s"]
    per_dim = [3 * s - 2 for s in (3, 4, 5)]  # neighbours within +-1 along one axis of length s: 3s - 2
    assert subm.active_pairs() == 2 * int(np.prod(per_dim))
    assert subm.indice_pair_num[13] == 2 * 3 * 4 * 5


def test_training_batchnorm_ignores_padding_rows():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, 4, generator=generator)
    indices = random_sites(3, count=30)
    padded_f, padded_i = with_padding(features, indices, every=4)
    book = cs.build_rulebooks(padded_i, SHAPE, 2, [cs.LayerSpec("s", (3, 3, 3), subm=True)])
    conv = cs.SubMConv3d(4, 4, 3, indice_key="s")
    norm, ref_norm = nn.BatchNorm1d(4, momentum=0.3), nn.BatchNorm1d(4, momentum=0.3)
    x = conv(cs.SparseTensor(padded_f, padded_i, SHAPE, 2, book))
    out = cs.SparseSequential(norm)(x)
    real = x.valid_index
    torch.testing.assert_close(out.features[real], ref_norm(x.features[real]))
    torch.testing.assert_close(norm.running_mean, ref_norm.running_mean)
    torch.testing.assert_close(norm.running_var, ref_norm.running_var)
    assert int(norm.num_batches_tracked) == 1


def test_rulebook_errors_are_explicit():
    indices = random_sites(4)
    subm = cs.LayerSpec("s", (3, 3, 3), subm=True)
    with pytest.raises(ValueError, match="same kernel"):
        cs.build_rulebooks(indices, SHAPE, 2, [subm, cs.LayerSpec("s", (5, 5, 5), subm=True)])
    with pytest.raises(ValueError, match="capacity"):
        cs.build_rulebooks(indices, SHAPE, 2, [cs.LayerSpec("d", (3, 3, 3), (2, 2, 2), (1, 1, 1))], capacities={"d": 3})
    with pytest.raises(ValueError, match="twice"):
        cs.build_rulebooks(torch.cat([indices, indices[:1]]), SHAPE, 2, [subm])
    with pytest.raises(ValueError, match="outside"):
        cs.build_rulebooks(indices, (5, 6, 6), 2, [subm])
    with pytest.raises(ValueError, match="no strided conv"):
        cs.build_rulebooks(indices, SHAPE, 2, [subm, cs.LayerSpec("s", (3, 3, 3), inverse=True)])
    with pytest.raises(ValueError, match="indice_key"):
        cs.build_rulebooks(indices, SHAPE, 2, [cs.LayerSpec(None, (3, 3, 3), subm=True)])
    with pytest.raises(ValueError, match="no rulebook"):
        cs.SubMConv3d(3, 4, 3, indice_key="s")(cs.SparseTensor(torch.randn(40, 3), indices, SHAPE, 2))
    with pytest.raises(ValueError, match="plain backend needs rulebooks"):
        SparseEncoder(4, (41, 8, 8), backend="plain", **ENCODER)(torch.randn(40, 4), indices, 2)
    with pytest.raises(ValueError, match="unknown sparse backend"):
        SparseEncoder(4, (41, 8, 8), backend="torchsparse")
    with pytest.raises(ValueError, match="keep their width"):
        SparseEncoder(4, (41, 8, 8), encoder_channels=((8, 12),), encoder_paddings=((0, 0),))


class RulebookGraph(nn.Module):
    """Export wrapper: the rulebooks become graph inputs, so one graph serves every point cloud."""

    def __init__(self, encoder: SparseEncoder, template: dict, coors: torch.Tensor, batch_size: int):
        super().__init__()
        self.encoder, self.template, self.coors, self.batch_size = encoder, template, coors, batch_size
        self.names = list(cs.rulebook_tensors(template))

    def forward(self, features: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        book = cs.with_rulebook_tensors(self.template, dict(zip(self.names, tensors)))
        return self.encoder(features, self.coors, self.batch_size, book)


def test_plain_encoder_exports_to_onnx_with_rulebooks_as_inputs():
    shape = grid_shape(RANGE, VOXEL)
    torch.manual_seed(0)
    encoder = SparseEncoder(4, shape, backend="plain", **ENCODER).eval()
    clouds = [voxel_batch(seed) for seed in (1, 2)]
    # static shapes: every strided conv padded to the grid it writes (no cloud can exceed it)
    capacities, grid = {}, shape
    for spec in encoder.layer_specs():
        if not spec.subm and not spec.inverse:
            grid = cs.conv_output_shape(grid, spec.kernel_size, spec.stride, spec.padding, spec.dilation)
            capacities[spec.indice_key] = 2 * int(np.prod(grid))
    books = [encoder.build_rulebooks(indices, 2, capacities) for _, indices, _ in clouds]
    calibrate_norms(encoder, clouds[0][0], clouds[0][1], books[0])
    graph = RulebookGraph(encoder, books[0], clouds[0][1], 2).eval()  # export restores the wrapper's mode
    inputs = (clouds[0][0], *cs.rulebook_tensors(books[0]).values())
    names = ["features", *[name.replace(".", "_") for name in graph.names]]
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            graph, inputs, buffer, input_names=names, output_names=["bev"], opset_version=17, dynamo=False
        )
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]  # nothing baked from data
    model = onnx.load_from_string(buffer.getvalue())
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"NonZero", "Unique", "ScatterND", "ScatterElements", "TopK", "Loop"}, ops
    assert {"Gather", "MatMul"} <= ops

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    for (features, indices, _), book in zip(clouds, books):  # the second cloud: new rulebooks, same graph
        feeds = {"features": features.numpy()}
        feeds.update({n: t.numpy() for n, t in zip(names[1:], cs.rulebook_tensors(book).values())})
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = encoder(features, indices, 2, book)
        assert np.abs(got - want.numpy()).max() <= 1e-4
        assert float(want.abs().max()) > 0.1


def reference_voxelize(points, voxel_size, pc_range, max_voxels, max_points):
    """mmcv's hard voxelisation as its CPU loop reads, point by point, and HardSimpleVFE's mean."""
    shape = grid_shape(pc_range, voxel_size)
    voxels: dict[tuple, list] = {}
    for point in points:
        c = [
            int(np.floor((np.float32(point[j]) - np.float32(pc_range[j])) / np.float32(voxel_size[j])))
            for j in range(3)
        ]
        zyx = (c[2], c[1], c[0])
        if any(v < 0 or v >= s for v, s in zip(zyx, shape)):
            continue
        if zyx not in voxels:
            if len(voxels) >= max_voxels:
                continue
            voxels[zyx] = []
        if len(voxels[zyx]) < max_points:
            voxels[zyx].append(point)
    coords = np.array(list(voxels), dtype=np.int64).reshape(-1, 3)
    means = np.array([np.mean(v, axis=0) for v in voxels.values()]).reshape(len(voxels), points.shape[1])
    return coords, means, np.array([len(v) for v in voxels.values()])


def clustered_points(seed: int, count: int = 500) -> np.ndarray:
    """Points bunched on a few voxels (so max_points bites), some outside the range."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(RANGE[:3], RANGE[3:], size=(30, 3))
    xyz = centres[rng.integers(0, 30, count)] + rng.normal(0, 0.08, (count, 3))
    xyz[:20] += 10.0  # out of range
    return np.concatenate([xyz, rng.uniform(0, 1, (count, 2))], axis=1).astype(np.float32)


@pytest.mark.parametrize(("max_voxels", "max_points"), [(400, 100), (400, 3), (25, 5)])
def test_voxelize_matches_hard_voxelisation(max_voxels, max_points):
    points = clustered_points(0)
    got = voxelize(points, VOXEL, RANGE, max_voxels, max_points)
    coords, means, counts = reference_voxelize(points, VOXEL, RANGE, max_voxels, max_points)
    assert got.count == len(coords) == min(max_voxels, len(coords))
    np.testing.assert_array_equal(got.indices[: got.count, 1:], coords)
    assert (got.indices[: got.count, 0] == 0).all()
    np.testing.assert_allclose(got.features[: got.count], means, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.num_points[: got.count], counts)
    assert (got.indices[got.count :] == -1).all() and (got.features[got.count :] == 0).all()
    assert (got.num_points[got.count :] == 0).all()
    assert got.features.shape == (max_voxels, 5) and got.indices.dtype == np.int32
    if max_points == 3:
        assert counts.max() == 3 and got.count < max_voxels  # truncated points, not voxels
    if max_voxels == 25:
        assert got.count == 25  # truncated voxels


def test_voxelize_is_deterministic_and_batches():
    points = clustered_points(1)
    a = voxelize(points, VOXEL, RANGE, 200, 4, num_features=4)
    b = voxelize(points.copy(), VOXEL, RANGE, 200, 4, num_features=4)
    for x, y in zip((a.features, a.indices, a.num_points), (b.features, b.indices, b.num_points)):
        np.testing.assert_array_equal(x, y)
    assert a.features.shape == (200, 4)
    empty = voxelize(points[:20], VOXEL, RANGE, 200, 4, num_features=4)  # all out of range
    assert empty.count == 0 and (empty.indices == -1).all()
    features, indices, counts = batch_voxels([a, empty, a])
    assert features.shape == (600, 4) and list(counts) == [a.count, 0, a.count]
    assert (indices[400 : 400 + a.count, 0] == 2).all() and (indices[200:400] == -1).all()
    np.testing.assert_array_equal(indices[400:, 1:], a.indices[:, 1:])
    with pytest.raises(ValueError, match="share"):
        batch_voxels([a, voxelize(points, VOXEL, RANGE, 100, 4, num_features=4)])


def test_all_offsets_of_the_plain_rulebook_are_exact_pairs():
    """Every (output, offset) -> input entry satisfies the conv geometry; every geometric pair is present."""
    indices = random_sites(5)
    spec = cs.LayerSpec("d", (3, 3, 3), (2, 2, 2), (1, 1, 1))
    book = cs.build_rulebooks(indices, SHAPE, 2, [spec])["d"]
    sites = {tuple(r) for r in indices.tolist()}
    out_rows = {tuple(r): i for i, r in enumerate(book.out_sites.indices.tolist())}
    out_shape = (3, 3, 4)  # (5, 6, 7) through kernel 3, stride 2, padding 1
    expected = set()
    for b, z, y, x in sites:
        for k, (dz, dy, dx) in enumerate(itertools.product(range(3), repeat=3)):
            o = [(c + 1 - d) for c, d in zip((z, y, x), (dz, dy, dx))]
            if all(v % 2 == 0 and 0 <= v // 2 < n for v, n in zip(o, out_shape)):
                expected.add((out_rows[(b, *[v // 2 for v in o])], k, (b, z, y, x)))
    gather = book.gather_index
    found = {
        (o, k, tuple(indices[int(gather[o, k])].tolist()))
        for o in range(gather.shape[0])
        for k in range(27)
        if gather[o, k] < len(indices)
    }
    assert found == expected and book.active_pairs() == len(expected)


def test_empty_clouds_give_zero_bev_in_both_modes():
    shape = grid_shape(RANGE, VOXEL)
    encoder = SparseEncoder(4, shape, backend="plain", **ENCODER)
    indices = torch.full((50, 4), -1, dtype=torch.int32)
    for capacities in (None, {"spconv1": 10, "spconv2": 10, "spconv3": 10, "spconv_down2": 10}):
        book = encoder.build_rulebooks(indices, 2, capacities)
        assert all(rulebook.active_pairs() == 0 for rulebook in book.values())
        for training in (True, False):
            out = encoder.train(training)(torch.randn(50, 4), indices, 2, book)
            assert out.shape == (2, 32, 4, 4) and not out.any()


def test_plain_backend_imports_neither_spconv_nor_the_project():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(cs.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported if name}
    assert roots <= {"__future__", "math", "collections", "dataclasses", "numpy", "torch"}, roots


def test_the_config_switch_runs_a_bevfusion_lidar_branch_on_spconv_with_the_same_weights(spconv):
    """`model.sparse_backend=spconv`: the same parameters as the plain branch, its own rulebooks from the batch's
    coordinates, the same BEV features (eval mode, 1 thread); an unknown backend is refused when loaded."""
    from fusion.config import ConfigError, get_config
    from fusion.data.dataset import collate, make_sample, model_inputs
    from fusion.models.bevfusion import build_model

    config = get_config("bevfusion-tiny")
    torch.manual_seed(0)
    plain = build_model(config, "lidar").eval()
    other = build_model(get_config("bevfusion-tiny", {"model.sparse_backend": "spconv"}), "lidar").eval()
    assert list(plain.state_dict()) == list(other.state_dict())
    other.load_state_dict(plain.state_dict())
    inputs = model_inputs(collate([make_sample(config, 0, 0)]))  # padded to max_voxels: spconv drops those rows
    with torch.no_grad():
        bev = plain.lidar(inputs["voxels"], inputs["voxel_coords"], inputs["rulebooks"])
        ref = other.lidar(inputs["voxels"], inputs["voxel_coords"], inputs["rulebooks"])
    assert bev.abs().max() > 0
    torch.testing.assert_close(ref, bev, atol=1e-5 * float(bev.abs().max()), rtol=0)
    with pytest.raises(ConfigError, match="model.sparse_backend must be one of plain, spconv"):
        get_config("bevfusion-tiny", {"model.sparse_backend": "torchsparse"})
