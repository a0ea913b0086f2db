"""Does `altermoma prune` select the same channels at 1 and 2 threads, and under torchrun? Every method and
every AlterEva estimator option on the shipped tiny fusion model, one run after the other.

Each run is the CLI itself in a fresh process (`--threads N`, OMP_NUM_THREADS=N); the pruned checkpoint's
report gives the widths, the scores' digest and the selection's digest, and its weights file is hashed.
Optional sections: the same commands on an earlier commit (`--baseline`, a `git archive` copy: nothing in
this checkout changes), 2 gloo ranks under torchrun against one process, and the scoring cost of the float64
passes against the float32 ones they replaced (1 thread).

    python -m benchmarks.threads_repro --out reports/repro --baseline d772d57 --baseline-cases altereva-sgd

Rows are saved after every run; `--resume` keeps the rows of an earlier, interrupted invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.io import atomic_write_text, sha256_of

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "fusion/weights/tiny-fusion"
BASE = ["prune", "--checkpoint", CHECKPOINT, "--target-gflops", "0.5"]
TORCHRUN_CASES = ("altereva", "altereva-sgd", "snip")
COST_CASES = ("altereva", "altereva-sgd", "snip", "prospr")


def cases() -> dict[str, list[str]]:
    """name -> CLI options: every method at its defaults, then AlterEva with each non-default choice of
    its estimator options (`--reactivation-optimizer`, `--reri-data`, `--normalise`), one at a time."""
    from compress.altereva import REACTIVATION_OPTIMIZERS, RERI_DATA, AlterEvaConfig
    from compress.request import METHODS
    from compress.scores import NORMALISE

    chosen = {method: [] if method == "altereva" else ["--method", method] for method in METHODS}
    defaults = AlterEvaConfig()
    options = (
        ("--reactivation-optimizer", REACTIVATION_OPTIMIZERS, defaults.reactivation_optimizer),
        ("--reri-data", RERI_DATA, defaults.reri_data),
        ("--normalise", NORMALISE, defaults.normalise),
    )
    for flag, choices, default in options:
        for value in choices:
            if value != default:
                chosen[f"altereva-{value}"] = [flag, value]
    return chosen


def _environment(threads: int, root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_prune(name: str, options: list[str], mode: str, work: Path, root: Path = ROOT) -> dict:
    """One `altermoma prune` ("1" or "2" threads, or "torchrun" = 2 gloo ranks x 1 thread) in `root`."""
    out = work / f"{name}-{mode}"
    threads = 1 if mode == "torchrun" else int(mode)
    args = [*BASE, *options, "--threads", str(threads), "--out", str(out), "--overwrite"]
    env = _environment(threads, root)
    launcher = [sys.executable, "-m", "altermoma"]
    if mode == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        launcher += [f"--master_port={_free_port()}", "-m", "altermoma"]
        env.update({"ALTERMOMA_DIST_BACKEND": "gloo", "ALTERMOMA_DIST_TIMEOUT": "3600"})
    start = time.perf_counter()
    run = subprocess.run(launcher + args, cwd=root, env=env, capture_output=True, text=True)
    row = {"case": name, "mode": mode, "command": " ".join(["altermoma", *args[:-3], "--out", "OUT"])}
    if mode == "torchrun":
        row["command"] = "torchrun --nproc_per_node 2 -m " + row["command"]
    row["wall_seconds"] = time.perf_counter() - start
    if run.returncode != 0:
        return {**row, "error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    report = json.loads((out / "checkpoint.json").read_text())["pruning"]
    scoring = report.get("scoring", {})
    row.update(
        widths=report["widths"],
        digest=scoring.get("digest"),
        selection_digest=scoring.get("selection_digest"),
        scoring_seconds=scoring.get("seconds"),
        weights_sha256=sha256_of(out / "model.safetensors"),
        digest_line=next((line for line in run.stdout.splitlines() if line.startswith("scores digest")), None),
    )
    shutil.rmtree(out)
    return row


def compare(a: dict, b: dict) -> dict:
    """Of two runs of one case: groups whose widths differ, and whether scores, channels and weights match."""
    if "error" in a or "error" in b:
        return {"error": a.get("error") or b.get("error")}
    differing = sorted(k for k in a["widths"] if a["widths"][k] != b["widths"].get(k))
    return {
        "groups": len(a["widths"]),
        "widths_differ": differing,
        "scores_same": a["digest"] is not None and a["digest"] == b["digest"],
        "channels_same": a["selection_digest"] is not None and a["selection_digest"] == b["selection_digest"],
        "weights_same": a["weights_sha256"] == b["weights_sha256"],
    }


def baseline_tree(commit: str, work: Path) -> Path:
    """The files of `commit` (git archive) under `work`: the earlier code, run the same way."""
    tree = work / f"baseline-{commit}"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# ---- scoring cost: the float64 passes against the float32 ones they replaced ---------------------
def cost_child(repeats: int) -> list[dict]:
    """At 1 thread, each gradient scorer on the float32 model (before) and through `in_float64` (after),
    interleaved; the fastest of `repeats` each (a busy machine only adds time)."""
    import torch

    from compress.altereva import AlterEvaConfig, altereva_saliency, signed_saliency
    from compress.baselines import prospr_channel_scores
    from compress.scores import in_float64
    from compress.structured import ChannelGraph
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    torch.set_num_threads(1)
    model, _ = load_checkpoint(ROOT / CHECKPOINT)
    batches = scoring_set(model.config, 4, 2, 0)
    task = reference_task(model)
    graph = ChannelGraph(model, task, first_sample(batches[0]))
    scorers = {
        "altereva": lambda m, b: altereva_saliency(m, task, b, AlterEvaConfig(), progress=False),
        "altereva-sgd": lambda m, b: altereva_saliency(
            m, task, b, AlterEvaConfig(reactivation_optimizer="sgd"), progress=False
        ),
        "snip": lambda m, b: signed_saliency(m, task, b),
        "prospr": lambda m, b: prospr_channel_scores(m, task, graph, b),
    }
    signed_saliency(model, task, batches[:1])  # warm-up: lazy imports and first-call costs
    rows = []
    for name in COST_CASES:
        times: dict[str, list[float]] = {"float32": [], "float64": []}
        for _ in range(repeats):
            for precision in times:
                start = time.perf_counter()
                if precision == "float32":
                    scorers[name](model, batches)
                else:
                    in_float64(scorers[name], model, batches, task)
                times[precision].append(time.perf_counter() - start)
        rows.append({"case": name, **{p: min(t) for p, t in times.items()}, "runs": times})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_cost(repeats: int) -> list[dict]:
    command = [sys.executable, "-m", "benchmarks.threads_repro", "--cost-child", str(repeats)]
    run = subprocess.run(command, cwd=ROOT, env=_environment(1, ROOT), capture_output=True, text=True, check=True)
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


# ---- the report ---------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _mark(value: bool) -> str:
    return "yes" if value else "**no**"


def _pair_line(name: str, options: list[str], a: dict, b: dict) -> str:
    c = compare(a, b)
    shown = " ".join(options) or "(defaults)"
    if "error" in c:
        return f"| {name} | {shown} | error: {c['error']} | | | | | |"
    widths = "same" if not c["widths_differ"] else f"**{len(c['widths_differ'])} of {c['groups']} differ**"
    seconds = " / ".join(f"{r['scoring_seconds']:.3g}" if r.get("scoring_seconds") else "-" for r in (a, b))
    digest = a["digest"] if c["scores_same"] else f"{a['digest']} / {b['digest']}"
    same = (_mark(c["channels_same"]), _mark(c["scores_same"]), _mark(c["weights_same"]))
    return f"| {name} | {shown} | {widths} | {' | '.join(same)} | {seconds} | {digest} |"


def report(rows: dict, chosen: dict[str, list[str]], info: dict, cost: list[dict] | None, baseline: str | None) -> str:
    head = "| case | options | widths (1 vs {b}) | channels same | scores same | weights same | scoring s (1 / {b}) | scores digest |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    lines = [
        "# The same channels at 1 and 2 threads (`altermoma prune` on the shipped tiny fusion model)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python {info['python']}; "
        f"code at {info['commit']}. Load average {info['load_before']} at the start, {info['load_after']} at the end "
        "(a shared machine: other jobs ran beside these; they change the times, not the results).",
        "",
        f"Each case ran `altermoma prune --checkpoint {CHECKPOINT} --target-gflops 0.5 OPTIONS --threads N --out OUT` "
        "with OMP_NUM_THREADS=N in a fresh process, 1 thread then 2 threads. *channels same*: the digest of the "
        "selected channels; *scores same*: the digest of the scores the selection ranked (both in the pruning "
        "report, `scoring`); *weights same*: the pruned checkpoint's `model.safetensors`, byte for byte.",
        "",
        head.format(b=2),
        rule,
    ]
    pairs = [(name, options, rows.get(f"{name}|1"), rows.get(f"{name}|2")) for name, options in chosen.items()]
    done = [(n, o, a, b) for n, o, a, b in pairs if a and b]
    lines += [_pair_line(n, o, a, b) for n, o, a, b in done]
    same = sum(1 for _, _, a, b in done if compare(a, b).get("channels_same") and not compare(a, b)["widths_differ"])
    lines += ["", f"**{same} of {len(done)} cases select the same channels at 1 and 2 threads.**"]
    torchrun = [(n, chosen[n], rows.get(f"{n}|1"), rows.get(f"{n}|torchrun")) for n in TORCHRUN_CASES if n in chosen]
    torchrun = [(n, o, a, b) for n, o, a, b in torchrun if a and b]
    if torchrun:
        lines += ["", "## One process against 2 ranks under torchrun (gloo, 1 thread each)", ""]
        lines += [head.format(b="torchrun").replace("1 vs", "1 process vs"), rule]
        lines += [_pair_line(n, o, a, b) for n, o, a, b in torchrun]
        lines += ["", "Command: `torchrun --nproc_per_node 2 -m altermoma prune ... --threads 1` (rank 0 saves)."]
    before = [(n, chosen[n], rows.get(f"{n}|base1"), rows.get(f"{n}|base2")) for n in chosen]
    before = [(n, o, a, b) for n, o, a, b in before if a and b]
    if before:
        lines += ["", f"## Before: the same commands on commit {baseline} (float32 scoring)", ""]
        lines += [head.format(b=2), rule]
        lines += [_pair_line(n, o, a, b) for n, o, a, b in before]
        lines += ["", "(That code has no scores digest in its report: those columns read `None`.)"]
        for name, _, a, b in before:
            differ = compare(a, b).get("widths_differ") or []
            if differ:
                shown = ", ".join(f"{k} {a['widths'][k]} vs {b['widths'][k]}" for k in differ)
                lines.append(f"- {name}, 1 vs 2 threads: {shown}")
            for mode, old in (("1", a), ("2", b)):
                new = rows.get(f"{name}|{mode}")
                if new and "error" not in new:
                    moved = compare(old, new)["widths_differ"]
                    lines.append(
                        f"- {name} at {mode} thread(s), before vs now: {len(moved)} of {len(new['widths'])} widths differ"
                    )
    if cost:
        lines += [
            "",
            "## Scoring cost (1 thread): float64 passes against the float32 ones they replaced",
            "",
            "| scorer | float32 s (before) | float64 s (after) | ratio |",
            "| --- | --- | --- | --- |",
        ]
        for r in cost:
            lines.append(
                f"| {r['case']} | {r['float32']:.1f} | {r['float64']:.1f} | {r['float64'] / r['float32']:.2f}x |"
            )
        lines += [
            "",
            "Fastest of the repeats, interleaved, in one process at 1 thread (`--cost-child`); the scorer alone "
            "(gradient passes and reactivation), not the whole prune.",
        ]
    lines += ["", "## Commands", "", "```"]
    lines += list(dict.fromkeys(r["command"] for r in rows.values()))
    lines += ["```", "", "Reproduce: `python -m benchmarks.threads_repro " + info["argv"] + "`"]
    lines += [f"(completed by `python -m benchmarks.threads_repro {more}`)" for more in info.get("completed_by", [])]
    return "\n".join(lines) + "\n"


def save(out: Path, rows: dict, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "threads.json", json.dumps({**extra, "rows": rows}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/repro")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the torchrun section")
    parser.add_argument("--baseline", help="also run the commands on this commit (git archive)")
    parser.add_argument("--baseline-cases", default="altereva-sgd", help="cases for --baseline (comma-separated)")
    parser.add_argument("--cost-repeats", type=int, default=2, help="0: skip the scoring-cost section")
    parser.add_argument("--resume", action="store_true", help="keep the rows an earlier run saved in --out")
    parser.add_argument("--cost-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost_child is not None:
        cost_child(args.cost_child)
        return
    everything = cases()
    names = args.cases.split(",") if args.cases else list(everything)
    unknown = [n for n in names if n not in everything]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} (choose from {', '.join(everything)})")
    chosen = {n: everything[n] for n in names}
    out = Path(args.out)
    saved = json.loads((out / "threads.json").read_text()) if args.resume and (out / "threads.json").is_file() else {}
    rows: dict = saved.get("rows", {})
    invocation = " ".join(argv if argv is not None else sys.argv[1:])
    info = {**machine(), "load_before": f"{os.getloadavg()[0]:.1f}", "argv": invocation, "baseline": args.baseline}
    if saved.get("machine"):  # a resumed run: the first invocation describes the report
        info = {**saved["machine"], "completed_by": [*saved["machine"].get("completed_by", []), invocation]}
    plan = [(n, m, ROOT) for n in chosen for m in ("1", "2")]
    plan += [(n, "torchrun", ROOT) for n in TORCHRUN_CASES if n in chosen and not args.no_torchrun]
    with tempfile.TemporaryDirectory(prefix="threads-repro-") as tmp:
        work = Path(tmp)
        if args.baseline:
            tree = baseline_tree(args.baseline, work)
            plan += [(n, f"base{m}", tree) for n in args.baseline_cases.split(",") for m in ("1", "2")]
        for name, mode, root in plan:
            key = f"{name}|{mode}"
            if key in rows and "error" not in rows[key]:
                continue
            rows[key] = run_prune(name, everything[name], mode.removeprefix("base"), work, root)
            rows[key]["mode"] = mode
            shown = rows[key].get("error") or rows[key]["digest_line"] or rows[key]["selection_digest"]
            print(f"{key}: {rows[key]['wall_seconds']:.0f} s, {shown}", flush=True)
            save(out, rows, {"machine": info})
    cost = run_cost(args.cost_repeats) if args.cost_repeats > 0 else saved.get("cost")
    info["load_after"] = f"{os.getloadavg()[0]:.1f}"
    save(out, rows, {"machine": info, "cost": cost})
    atomic_write_text(out / "threads.md", report(rows, chosen, info, cost, info.get("baseline") or args.baseline))
    print((out / "threads.md").read_text())


if __name__ == "__main__":
    main()
