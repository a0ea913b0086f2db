"""The modality partition: the only view `compress` has of a model's internals.

A partition names, by module-name prefixes, the camera backbone ("camera"), the LiDAR backbone
("lidar") and everything after the fusion point ("fusion"). It comes from the task description
(`common.task.Task.partition`); nothing is read from the model itself.

Masking a modality (AlterMOMA Eq. 3) zeroes every parameter of its partition, BN/LN affine
included, so that modality contributes nothing, and restores the parameters bit for bit afterwards.
The `feature` mode is an ablation: it zeroes the modality's output features instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from common.task import PARTS

MODALITIES = ("camera", "lidar")


class PartitionError(ValueError):
    """A partition that does not describe the model it is applied to."""


@dataclass(frozen=True)
class Partition:
    prefixes: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, model: nn.Module, prefixes: Mapping[str, Sequence[str]]) -> Partition:
        """The task's prefixes, validated against the model: each names a module (with or without
        parameters), and every parameter belongs to exactly one part."""
        unknown = sorted(set(prefixes) - set(PARTS))
        if unknown:
            raise PartitionError(f"unknown partition {unknown[0]!r} (partitions are {', '.join(PARTS)})")
        partition = cls({part: tuple(prefixes.get(part, ())) for part in PARTS})
        modules = [name for name, _ in model.named_modules() if name]
        params = [name for name, _ in model.named_parameters()]
        for part, part_prefixes in partition.prefixes.items():
            for prefix in part_prefixes:
                if not any(_matches(name, prefix) for name in modules + params):
                    raise PartitionError(f"partition prefix {prefix!r} ({part}) matches no module of the model")
        for name in params:
            parts = [part for part, pre in partition.prefixes.items() if any(_matches(name, p) for p in pre)]
            if len(parts) > 1:
                raise PartitionError(f"parameter {name} belongs to several partitions ({', '.join(parts)})")
        unassigned = [name for name in params if partition.part_of(name) is None]
        if unassigned:
            raise PartitionError(f"parameter {unassigned[0]} belongs to no partition ({len(unassigned)} unassigned)")
        return partition

    def part_of(self, name: str) -> str | None:
        """The partition of a parameter or module name (None if no prefix matches)."""
        for part, prefixes in self.prefixes.items():
            if any(_matches(name, p) for p in prefixes):
                return part
        return None

    def parameters(self, model: nn.Module, part: str) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if self.part_of(name) == part}

    def has(self, part: str) -> bool:
        return bool(self.prefixes.get(part))


def _matches(name: str, prefix: str) -> bool:
    """A prefix matches a name it starts, or the module it names ("camera." names module "camera")."""
    return name.startswith(prefix) or name == prefix.rstrip(".")


@contextmanager
def masked_modality(model: nn.Module, partition: Partition, modality: str, mode: str = "parameters") -> Iterator[None]:
    """Deactivate one modality inside the block; every tensor is restored exactly on exit.

    mode "parameters" zeroes the modality's parameters (the paper's masking); "feature" zeroes the
    output of the modality's top-level modules (its BEV features at the fuser) and leaves weights alone.
    """
    if modality not in MODALITIES:
        raise PartitionError(f"modality must be 'camera' or 'lidar', got {modality!r}")
    if not partition.has(modality):
        raise PartitionError(f"the model has no {modality} partition to mask")
    if mode == "parameters":
        params = partition.parameters(model, modality)
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for p in params.values():
                p.zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
    elif mode == "feature":
        handles = [
            model.get_submodule(prefix.rstrip(".")).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
            for prefix in partition.prefixes[modality]
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
    else:
        raise PartitionError(f"mask mode must be 'parameters' or 'feature', got {mode!r}")
