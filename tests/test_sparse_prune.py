"""Sparse 3-D convolutions (the real spconv 2.x package, CPU build) as first-class layers in `compress`.

The model is `examples/spconv_fusion.py`: a SECOND-style encoder (SubMConv3d + BatchNorm1d, residual adds
through `replace_feature`, strided SparseConv3d, `.dense()` folded into BEV channels), a learned-query
attention head and one dict argument. spconv's CPU build has no backward, so on CPU the data-free methods
run here and the gradient methods are refused up front (and run where CUDA exists).

spconv's CPU kernels are multi-threaded and accumulate in a thread-dependent order: at 2 threads two
forward passes of one model differ by ~1e-4 (measured), at 1 thread they are bit-identical. These tests
run at 1 thread, as every equivalence check must.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

spconv = pytest.importorskip("spconv.pytorch", reason="spconv is not installed (pip install spconv==2.3.8)")

import altermoma  # noqa: E402
from altermoma.cli import coverage_notes  # noqa: E402
from compress.flops import count_flops  # noqa: E402
from compress.sparse import strided_pairs, subm_pairs  # noqa: E402
from compress.structured import PruningError  # noqa: E402
from compress.tracing import fold_stride  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("spconv_fusion_example", ROOT / "examples" / "spconv_fusion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = _example()


@pytest.fixture(autouse=True)
def one_thread():
    """Other tests in the same process may leave torch at 2 threads (CLI --threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    return ex.setup()


def _run(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


def _sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, spconv.conv.SparseConvolution)}


def test_sparse_flops_are_spconvs_own_rulebook_pairs(setup):
    """FLOPs of each sparse conv = 2 x pairs x Cin x Cout, pairs as spconv's rulebook holds them (its native
    SubM rulebook stores each symmetric pair once and handles the centre offset apart: 2 x stored + sites)."""
    model, batch = copy.deepcopy(setup.model), setup.scoring_batches[0]
    outputs = {}
    layers = _sparse_layers(model)
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, (i[0], o))) for n, m in layers.items()]
    counted = count_flops(model.eval(), lambda: model(batch))
    for h in hooks:
        h.remove()
    assert set(counted.sparse) == set(layers)
    for name, module in layers.items():
        source, out = outputs[name]
        rulebook = out.indice_dict[module.indice_key]
        pairs = int(rulebook.indice_pair_num.sum())
        if module.subm:
            pairs = 2 * pairs + source.features.shape[0]
        assert counted.sparse_pairs[name] == pairs, name
        assert counted.sparse[name] == 2.0 * pairs * module.in_channels * module.out_channels
    assert counted.uncounted == {}


def test_pair_geometry_on_a_full_grid_equals_dense_conv_taps():
    full = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    indices = torch.cat([torch.zeros(len(full), 1, dtype=torch.long), full], 1)
    # SubM 3x3x3 on a full 4^3 grid: every site's in-bounds neighbours: (2 + 3 + 3 + 2)^3 / ... per dim 10 taps
    assert subm_pairs(indices, [4, 4, 4], [3, 3, 3], [1, 1, 1]) == 10**3
    # stride 2, padding 1, kernel 3 on 4 -> 2 outputs per dim; taps per dim: 2 + 1 + 1 + 1 = ... counted directly
    per_dim = sum(1 for p in range(4) for k in range(3) if (p + 1 - k) % 2 == 0 and 0 <= (p + 1 - k) // 2 < 2)
    assert strided_pairs(indices, [4, 4, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]) == per_dim**3


def test_fold_stride_decides_reshapes_from_their_shape():
    assert fold_stride([2, 32, 4, 16, 16], 32, 128) == 4  # (N, C, D, H, W) -> (N, C * D, H, W)
    assert fold_stride([2, 32, 4, 16], 32, 32 * 4 * 16) == 64  # flatten for a Linear
    assert fold_stride([2, 128, 16, 16], 128, 32) == 4  # unfold
    assert fold_stride([500, 32], 32, 64) is None  # spconv's internal (N, C) view: no dim to fold
    assert fold_stride([2, 8, 32], 32, 64) is None  # channels not on dim 1


def test_magnitude_prunes_sparse_channels_to_half_the_gflops(setup, tmp_path):
    model, batches = copy.deepcopy(setup.model), setup.scoring_batches
    widths = {n: m.out_channels for n, m in _sparse_layers(model).items()}
    dense_only = count_flops(copy.deepcopy(model).eval(), lambda: None)  # nothing runs: zero
    assert dense_only.total == 0.0
    before = _run(model, batches[0])
    report = altermoma.prune(model, setup.task, batches, method="magnitude", target_gflops=0.5, progress=False)
    counting = report["flop_counting"]
    assert counting["sparse_gflops"] > 0.3 * report["gflops_before"]  # the LiDAR backbone is in the count
    notes = coverage_notes(report)  # what `altermoma prune` prints
    assert any("sparse convolutions counted as 2 x active rulebook pairs" in line for line in notes), notes
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02
    assert report["zero_then_prune_error"] <= 1e-4
    assert report["partitions"]["lidar"]["kept_ratio"] < 1.0
    cut = [n for n, m in _sparse_layers(model).items() if m.out_channels < widths[n]]
    assert cut, report["widths"]
    assert report["left_whole"]["modules"] == [] and counting["uncounted"] == []
    after = _run(model, batches[0])
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    # save and reload into a freshly built model: bit-identical outputs
    altermoma.save_pruned(model, tmp_path / "pruned", report)
    reloaded = altermoma.load_pruned(ex.build_model(), tmp_path / "pruned")
    again = _run(reloaded, batches[0])
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_unstructured_magnitude_masks_sparse_weights(setup):
    model = copy.deepcopy(setup.model)
    report = altermoma.prune(model, setup.task, setup.scoring_batches, method="magnitude", sparsity=0.8, progress=False)
    assert abs(report["sparsity"] - 0.8) <= 1e-3
    zeros = [float((m.weight == 0).float().mean()) for m in _sparse_layers(model).values()]
    assert max(zeros) > 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA spconv has a backward: gradient methods run")
@pytest.mark.parametrize("method", ["altereva", "snip", "synflow", "prospr", "imp"])
def test_gradient_methods_are_refused_before_any_work_on_cpu(setup, method):
    model = copy.deepcopy(setup.model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="spconv's CPU build has no backward"):
        altermoma.prune(model, setup.task, setup.scoring_batches, method=method, target_gflops=0.5, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv's backward needs CUDA (its CPU build has none)")
@pytest.mark.parametrize("method", ["altereva", "snip"])
def test_gradient_methods_on_cuda(setup, method):
    model = copy.deepcopy(setup.model).cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in setup.scoring_batches]
    report = altermoma.prune(model, setup.task, batches, method=method, target_gflops=0.5, progress=False)
    assert abs(report["gflops_reduction"] - 0.5) <= 0.02


@pytest.mark.slow  # ~10 s; default set: the same note from coverage_notes in the magnitude test above
def test_cli_prune_of_a_spconv_task_names_how_sparse_flops_were_counted(tmp_path, capsys):
    from altermoma.cli import main

    out = tmp_path / "pruned"
    task = f"{ROOT / 'examples' / 'spconv_fusion.py'}:setup"
    main(
        [
            "prune",
            "--task",
            task,
            "--method",
            "magnitude",
            "--target-gflops",
            "0.5",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note: ")]
    assert any("sparse convolutions counted as 2 x active rulebook pairs" in line for line in notes), printed
    assert (out / "pruned.json").is_file()


def test_spconv_on_cpu_with_several_threads_warns(setup):
    from compress.sparse import spconv_threads_warning

    assert spconv_threads_warning(setup.model) is None  # 1 thread (the fixture)
    torch.set_num_threads(2)
    assert "not deterministic with 2 threads" in spconv_threads_warning(setup.model)
