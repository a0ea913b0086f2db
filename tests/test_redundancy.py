"""benchmarks.redundancy: thinning one partition touches only that partition, by the right amount."""

import torch

from benchmarks.redundancy import markdown, partition_masks
from compress.structured import ChannelGraph
from fusion.models.bevfusion import build_model, example_inputs
from fusion.task import reference_task


def test_partition_masks_select_the_lowest_channels_of_one_partition_only(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    graph = ChannelGraph(model, reference_task(model), example_inputs(tiny_config))
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(g.channels, generator=generator) for g in graph.groups]
    for part in ("camera", "lidar"):
        masks = partition_masks(graph, scores, None, part, 0.5)
        inside = [(g, m, s) for g, m, s in zip(graph.groups, masks, scores) if g.part == part]
        assert all(not m.any() for g, m in zip(graph.groups, masks) if g.part != part)
        count = sum(g.channels for g, _, _ in inside)
        assert sum(int(m.sum()) for _, m, _ in inside) == round(0.5 * count)
        pruned = torch.cat([s[m] for _, m, s in inside])
        kept = torch.cat([s[~m] for _, m, s in inside])
        assert all(m.sum() <= 0.9 * g.channels for g, m, _ in inside)  # the per-group cap holds
        # lowest first: apart from channels kept by the cap, nothing pruned outscores anything kept
        assert float(pruned.median()) < float(kept.median())


def test_markdown_lists_every_partition_and_cell():
    cells = {f"{c}@{r:g}": 0.5 for c in ("snip", "magnitude") for r in (0.25, 0.5, 0.75)}
    rows = [
        {"partition": p, "channels": 8, "dead_channels": 1, "gflops_share": 0.3, "map_after_zeroing": cells}
        for p in ("camera", "lidar", "fusion")
    ]
    text = markdown({"val_scenes": 3, "unpruned_mAP": 0.9, "partitions": rows}, 1.0, "cmd")
    assert text.count("0.5000") == 18 and "| camera | 8 | 1 | 0.30 |" in text
