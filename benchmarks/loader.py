"""nuScenes loader cost at the `nuscenes` preset: samples per second with 0, 1 and 2 DataLoader workers, peak RSS,
and peak RSS against the number of scenes in the data root (it must not grow: the reader streams).

The data roots are written by `fusion.data.nuscenes_write` (no nuScenes on these machines): the throughput root
with nuScenes' own camera size (1600x900 JPEGs) and 9 sweeps per key frame, so decoding, resizing, sweep
merging and pillarisation cost what they would on nuScenes; the RSS roots with 1..8 scenes. Each measurement
runs in a fresh process, so its peak RSS (`ru_maxrss`) is its own; DataLoader workers are child processes
and their peak is reported separately (the largest worker, RUSAGE_CHILDREN). Torch threads are 1 in every
process (the machine has 2 cores).

    python -m benchmarks.loader --work /tmp/altermoma-loader --out reports/loader
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common.io import atomic_write_text

WORKERS = (0, 1, 2)
VERSION = "v1.0-mini"


def _datasets(config, root: Path):
    """The data root's samples, every split present (mini_val and mini_train), as one data set."""
    from torch.utils.data import ConcatDataset

    from fusion.data.nuscenes import NuScenesDataset

    names = {s["name"] for s in json.loads((root / VERSION / "scene.json").read_text())}
    from fusion.data.nuscenes_tables import split_scenes

    parts = [
        NuScenesDataset(config, root, VERSION, split)
        for split in ("mini_val", "mini_train")
        if names & set(split_scenes(VERSION, split))
    ]
    return ConcatDataset(parts)


def _one_thread(_worker: int) -> None:
    import torch

    torch.set_num_threads(1)


def _vm_hwm_mib() -> float:
    """This process's peak RSS since its exec (VmHWM). ru_maxrss would also count the RSS of the parent at
    fork time, which Linux carries over the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peaks() -> dict:
    return {
        "peak_rss_mib": _vm_hwm_mib(),
        "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    }


def child_throughput(root: Path, workers: int, passes: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from fusion.config import get_config
    from fusion.data.dataset import collate

    torch.set_num_threads(1)
    config = get_config("nuscenes")
    start = time.perf_counter()
    dataset = _datasets(config, root)
    setup = time.perf_counter() - start
    rss_after_setup = _vm_hwm_mib()
    loads, first = 0, None
    points = []
    start = time.perf_counter()
    for _ in range(passes):
        loader = DataLoader(
            dataset, batch_size=1, num_workers=workers, collate_fn=collate, worker_init_fn=_one_thread, shuffle=False
        )
        for batch in loader:
            loads += 1
            points.append(int((batch["pillar_map"] > 0).sum()))
            if first is None:
                first = time.perf_counter()
        del loader
    end = time.perf_counter()
    return {
        "workers": workers,
        "samples": len(dataset),
        "loads": loads,
        "setup_s": setup,
        "first_sample_s": first - start,
        "samples_per_s": (loads - 1) / (end - first) if loads > 1 else float("nan"),
        "samples_per_s_with_startup": loads / (end - start),
        "mean_pillars": sum(points) / len(points),
        "rss_after_setup_mib": rss_after_setup,
        **_peaks(),
    }


def child_rss(root: Path) -> dict:
    import torch

    from fusion.config import get_config

    torch.set_num_threads(1)
    config = get_config("nuscenes")
    dataset = _datasets(config, root)
    rss_after_setup = _vm_hwm_mib()
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    scenes = len(json.loads((root / VERSION / "scene.json").read_text()))
    return {
        "scenes": scenes,
        "samples": len(dataset),
        "table_mib": sum(p.stat().st_size for p in (root / VERSION).glob("*.json")) / 2**20,
        "seconds": time.perf_counter() - start,
        "rss_after_setup_mib": rss_after_setup,
        **_peaks(),
    }


def _run_child(args: list[str]) -> dict:
    command = [sys.executable, "-m", "benchmarks.loader", "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _root(work: Path, name: str, scenes: int, samples_per_scene: int, camera_size) -> Path:
    """A written root, reused when an earlier run of this benchmark left it complete."""
    from fusion.config import get_config
    from fusion.data.nuscenes_write import write_nuscenes_root

    root = work / name
    scene_table = root / VERSION / "scene.json"
    if not (scene_table.is_file() and len(json.loads(scene_table.read_text())) == scenes):
        start = time.perf_counter()
        write_nuscenes_root(
            root,
            VERSION,
            scenes=scenes,
            config=get_config("nuscenes"),
            samples_per_scene=samples_per_scene,
            camera_size=camera_size,
            progress=False,
        )
        print(f"wrote {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/altermoma-loader", help="where the data roots are written")
    parser.add_argument("--out", default="reports/loader")
    parser.add_argument("--throughput-scenes", type=int, default=4)
    parser.add_argument("--samples-per-scene", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2, help="epochs over the throughput root per worker count")
    parser.add_argument("--rss-scenes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, root, *rest = args.child
        if kind == "write":
            _root(Path(root).parent, Path(root).name, int(rest[0]), int(rest[1]), json.loads(rest[2]))
            print(json.dumps({"root": root}))
            return
        row = (
            child_throughput(Path(root), int(rest[0]), int(rest[1])) if kind == "throughput" else child_rss(Path(root))
        )
        print(json.dumps(row))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.loader " + " ".join(a for a in (argv or sys.argv[1:]))
    fast = work / f"throughput-{args.throughput_scenes}"
    _run_child(["write", str(fast), str(args.throughput_scenes), str(args.samples_per_scene), "[900, 1600]"])
    throughput = []
    for workers in WORKERS:
        throughput.append(_run_child(["throughput", str(fast), str(workers), str(args.passes)]))
        print(json.dumps(throughput[-1]), flush=True)
    rss = []
    for scenes in args.rss_scenes:
        root = work / f"rss-{scenes}"
        _run_child(["write", str(root), str(scenes), str(args.samples_per_scene), "null"])
        rss.append(_run_child(["rss", str(root)]))
        print(json.dumps(rss[-1]), flush=True)
    report = {
        "command": command,
        "preset": "nuscenes",
        "torch_threads": 1,
        "cpus": _cpus(),
        "machine": platform.processor() or platform.machine(),
        "throughput_root": {"camera_size": [900, 1600], "scenes": args.throughput_scenes, "sweeps": 9},
        "throughput": throughput,
        "rss_vs_scenes": rss,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "loader.json", json.dumps(report, indent=2))
    atomic_write_text(out / "loader.md", _markdown(report))
    print(f"report: {out / 'loader.md'}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _markdown(report: dict) -> str:
    lines = [
        "# nuScenes loader: throughput and memory at the `nuscenes` preset",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Preset `nuscenes`: 6 cameras resized and cropped to 256x704, LIDAR_TOP key frame + 9 sweeps, 30000 "
        f"pillars x 20 points x 10 features, 180x180 BEV, per-sample frustum cells (2.0 M int64, cached per "
        f"calibration). Data roots written by `altermoma data export-nuscenes` code (synthetic scenes in the "
        f"nuScenes format; the throughput root with 1600x900 JPEGs as nuScenes). {report['cpus']} CPU cores, torch "
        f"threads 1 in the main process and in every worker; batch size 1; each row a fresh process.",
        "",
        "## Samples per second",
        "",
        "| workers | samples/s (after the first) | with start-up | first sample s | mean pillars "
        "| peak RSS main MiB | peak RSS per worker MiB | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["throughput"]:
        lines.append(
            f"| {row['workers']} | {row['samples_per_s']:.2f} | {row['samples_per_s_with_startup']:.2f} | "
            f"{row['first_sample_s']:.2f} | {row['mean_pillars']:.0f} | {row['peak_rss_mib']:.0f} | "
            f"{row['peak_worker_rss_mib']:.0f} | {row['load_average_1min']:.1f} |"
        )
    lines += [
        "",
        f"{report['throughput'][0]['loads']} loads per row ({report['throughput'][0]['samples']} samples, "
        "repeated passes; the files are in the page cache after the first). The load average is the machine's "
        "1-minute figure at the end of the row: above 2, the 2 cores were shared with other jobs, and the rows "
        "with workers (which need a core of their own beside the main process) understate an idle machine.",
        "",
        "## Peak RSS against the number of scenes (0 workers, every sample of the root read once)",
        "",
        "| scenes | samples | tables MiB | RSS after construction MiB | peak RSS MiB | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rss_vs_scenes"]:
        lines.append(
            f"| {row['scenes']} | {row['samples']} | {row['table_mib']:.2f} | {row['rss_after_setup_mib']:.0f} | "
            f"{row['peak_rss_mib']:.0f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
