"""`altermoma --help` in the order of a user's flow, with one example per verb.

argparse lists subcommands in the order the code adds them and prints no examples. The flow and the
examples live here, once: `apply_flow` lists the verbs grouped in flow order, each with its example, and
ends every verb's `--help` with that example. Every example works as printed from the repository root: its
inputs are the shipped checkpoints (fusion/weights/) or the output of an earlier example, which the help
names (tests/test_cli_help.py checks both, and parses every example with the real parser).
"""

from __future__ import annotations

import argparse
import shlex

SHIPPED_PREFIX = "fusion/weights/"
INPUT_OPTIONS = ("--checkpoint", "--onnx-dir")

# (group, verbs) in the order a user meets them.
FLOW: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data and models", ("data", "train")),
    ("prune and recover accuracy", ("prune", "finetune", "evaluate")),
    ("deploy", ("quantize", "export", "bench", "latency-table")),
    ("studies and the whole job", ("compare", "robustness", "pipeline")),
)

# One example per verb (and per sub-verb), in flow order: an input that is not shipped is the --out of an
# earlier example.
EXAMPLES: dict[str, str] = {
    "data export-nuscenes": "altermoma data export-nuscenes --out runs/nuscenes-mini --scenes 2",
    "train": "altermoma train --modality lidar --out runs/lidar --set train.steps=100",
    "prune": "altermoma prune --checkpoint fusion/weights/tiny-fusion --out runs/pruned --target-gflops 0.5",
    "finetune": "altermoma finetune --checkpoint runs/pruned --out runs/finetuned --steps 300",
    "evaluate": "altermoma evaluate --checkpoint fusion/weights/tiny-fusion --scenes 20",
    "quantize": "altermoma quantize --checkpoint runs/finetuned --out runs/int8 --onnx",
    "export onnx": "altermoma export onnx --checkpoint runs/finetuned --out runs/onnx",
    "export trt": "altermoma export trt --onnx-dir runs/onnx --out runs/engines",
    "bench": "altermoma bench --checkpoint fusion/weights/tiny-fusion --checkpoint runs/finetuned --out runs/bench",
    "latency-table": "altermoma latency-table --checkpoint fusion/weights/tiny-fusion --threads 1 --out runs/tiny-ort.json",
    "compare": "altermoma compare --quick --out runs/compare-quick",
    "robustness": "altermoma robustness --checkpoint fusion/weights/tiny-fusion --checkpoint runs/finetuned "
    "--out runs/robustness --scenes 20 --severity 3",
    "pipeline": "altermoma pipeline --out runs/pipeline",
}


def flow_verbs() -> list[str]:
    return [verb for _, verbs in FLOW for verb in verbs]


def example_keys(verb: str) -> list[str]:
    """The examples of a verb: its own, or one per sub-verb (`export onnx`, `export trt`)."""
    return [key for key in EXAMPLES if key == verb or key.startswith(verb + " ")]


def option_values(example: str, option: str) -> list[str]:
    words = shlex.split(example)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]


def example_inputs(example: str) -> list[str]:
    return [value for option in INPUT_OPTIONS for value in option_values(example, option)]


def producer(path: str, before: str) -> str | None:
    """The verb whose example writes `path` (its --out), among the examples listed before `before`."""
    for key, text in EXAMPLES.items():
        if key == before:
            return None
        if path in option_values(text, "--out"):
            return key
    return None


def example_block(key: str) -> str:
    """`example:` and the command, with where a non-shipped input comes from."""
    text = EXAMPLES[key]
    made = [(path, producer(path, key)) for path in example_inputs(text) if not path.startswith(SHIPPED_PREFIX)]
    notes = "; ".join(f"{path} is written by the `altermoma {verb}` example" for path, verb in made if verb)
    return f"example{f' ({notes})' if notes else ''}:\n  {text}"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _end_with_example(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    """Keep any epilog the verb has, then its example(s) last; raw text so the commands are not re-wrapped."""
    blocks = [example_block(key) for key in keys]
    parser.epilog = "\n\n".join([*([parser.epilog] if parser.epilog else []), *blocks])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _verb_examples(verb: str, parser: argparse.ArgumentParser) -> None:
    nested = _subparsers(parser)
    keys = example_keys(verb)
    _end_with_example(parser, keys)
    if nested is not None:
        for name, child in nested.choices.items():
            own = [key for key in keys if key == f"{verb} {name}"]
            _end_with_example(child, own or keys)


def flow_epilog(summaries: dict[str, str], verbs: list[str]) -> str:
    """The grouped verb list: each verb's one-line help and its first example."""
    lines = ["verbs, in the order of a user's flow (`altermoma VERB --help`: its options and example;"]
    lines.append("examples run from the repository root, on the shipped checkpoints in fusion/weights/):")
    groups = [(group, [v for v in members if v in verbs]) for group, members in FLOW]
    others = [v for v in verbs if v not in flow_verbs()]
    for group, members in [*groups, *([("other", others)] if others else [])]:
        lines.append(f"\n{group}:")
        for verb in members:
            lines.append(f"  {verb:<14} {summaries.get(verb) or ''}".rstrip())
            lines.extend(f"  {'':<14}   {EXAMPLES[key]}" for key in example_keys(verb)[:1])
    return "\n".join(lines)


def apply_flow(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """List the verbs grouped in flow order with an example each, and end every verb's help with its example.

    Verbs missing from FLOW (added later) are listed under "other", so the CLI never breaks on them."""
    order = {verb: i for i, verb in enumerate(flow_verbs())}
    ordered = sorted(sub.choices, key=lambda verb: order.get(verb, len(order)))
    choices = {verb: sub.choices[verb] for verb in ordered}  # usage and "invalid choice" follow the flow too
    sub.choices.clear()
    sub.choices.update(choices)
    summaries = {action.dest: action.help for action in sub._choices_actions}  # argparse keeps them only here
    for verb, verb_parser in choices.items():
        _verb_examples(verb, verb_parser)
    sub.metavar = "VERB"
    sub.help = argparse.SUPPRESS  # the grouped list below replaces argparse's flat one
    parser.usage = "%(prog)s [-h] VERB ..."
    parser.epilog = flow_epilog(summaries, ordered)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
