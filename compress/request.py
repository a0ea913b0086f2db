"""What a pruning run is asked to do: the method, the target, and each method's options, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compress.altereva import AlterEvaConfig
from compress.baselines import PROSPR_MODES, ProsprConfig, SynFlowConfig
from compress.peers import TP_PEERS  # torch-pruning's own importances
from compress.structured import PruningError

METHODS = ("altereva", "snip", "magnitude", "random", "synflow", "prospr", "imp")
PEERS = (*TP_PEERS, "fastnas")  # what a user would pick instead: torch-pruning's importances, ModelOpt's FastNAS
SCORING_PRECISIONS = ("float64", "model")
METHOD_OPTIONS = ("altereva", "imp", "synflow", "prospr")  # PruneRequest fields that belong to one method


@dataclass
class IMPConfig:
    levels: int = 3
    finetune_steps: int = 300  # the TOTAL fine-tune budget, split over the levels
    finetune_lr: float = 1e-3  # used by the built-in fine-tune between levels


@dataclass
class PruneRequest:
    method: str = "altereva"
    target_gflops: float | None = None  # fraction of GFLOPs to remove (structured)
    channel_ratio: float | None = None  # or: fraction of channels to remove (structured)
    sparsity: float | None = None  # or: fraction of weights to remove (unstructured)
    target_latency: float | None = None  # or: fraction of the unpruned PREDICTED latency to keep (structured)
    latency_table: str | Path | Any = None  # path or LatencyTable; needed by target_latency, else only reported
    latency_backend: str | None = None  # refuse a table measured on another backend
    round_to: int = 8
    max_group_ratio: float = 0.9
    scoring_batches: int = 4  # the size of the scoring set where the caller draws it (CLI, benchmarks)
    scoring_batch_size: int = 2
    seed: int = 0
    best_effort: bool = False  # accept a result more than 2 points from the target (warned, miss in the report)
    # "float64": gradient passes on a float64 copy (the same selection at any thread count, compress.scores);
    # "model": in the model's own dtype (faster, half the memory; on GPUs with slow FP64 far faster), the
    # selection may then change with the thread count or the GPU's summation order.
    scoring_precision: str = "float64"
    altereva: AlterEvaConfig = field(default_factory=AlterEvaConfig)
    imp: IMPConfig = field(default_factory=IMPConfig)
    synflow: SynFlowConfig = field(default_factory=SynFlowConfig)
    prospr: ProsprConfig = field(default_factory=ProsprConfig)

    @property
    def structured(self) -> bool:
        return self.sparsity is None

    def validate(self) -> PruneRequest:
        """Reject impossible requests before any work is done."""
        given = (self.target_gflops, self.channel_ratio, self.sparsity, self.target_latency)
        targets = [t for t in given if t is not None]
        if len(targets) != 1:
            raise PruningError("give exactly one of --target-gflops, --channel-ratio, --sparsity or --target-latency")
        if isinstance(targets[0], bool) or not isinstance(targets[0], int | float):
            raise PruningError(f"the pruning target must be a number, got {targets[0]!r}")
        if not 0.0 < targets[0] < 1.0:
            raise PruningError(f"the pruning target must be strictly between 0 and 1, got {targets[0]}")
        if self.target_latency is not None and self.latency_table is None:
            raise PruningError("--target-latency needs --latency-table (build one with `altermoma latency-table`)")
        if self.latency_table is not None and self.sparsity is not None:
            raise PruningError("a latency table applies to structured pruning, not to a sparsity target")
        if self.method == "imp" and self.latency_table is not None:
            raise PruningError("IMP prunes to a GFLOPs target or a sparsity; it takes no latency target or table")
        if self.scoring_precision not in SCORING_PRECISIONS:
            raise PruningError(
                f"unknown scoring precision {self.scoring_precision!r} (choose from {', '.join(SCORING_PRECISIONS)})"
            )
        known = METHODS + PEERS
        if self.method not in known:
            raise PruningError(f"unknown method {self.method!r} (choose from {', '.join(known)})")
        if self.method in TP_PEERS and self.sparsity is not None:
            raise PruningError(f"{self.method} scores channel groups: it prunes structured targets, not a sparsity")
        if self.method == "fastnas" and self.target_gflops is None:
            raise PruningError("fastnas (NVIDIA ModelOpt) prunes to a GFLOPs target only (--target-gflops)")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PruningError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise PruningError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio}")
        if self.scoring_batches < 1 or self.scoring_batch_size < 1:
            raise PruningError("the scoring set needs at least one batch of at least one scene")
        if self.method == "imp" and (self.imp.levels < 1 or self.channel_ratio is not None):
            raise PruningError("IMP needs levels >= 1 and a GFLOPs target or a sparsity (not a channel ratio)")
        if self.method == "imp" and self.imp.finetune_steps < 0:
            raise PruningError(f"IMP's fine-tune budget must be >= 0 steps, got {self.imp.finetune_steps}")
        if self.altereva.floor is not None and not 0.0 <= self.altereva.floor < 1.0:
            raise PruningError(f"the AlterEva floor must be in [0, 1) or None, got {self.altereva.floor}")
        if self.method == "altereva":
            try:
                self.altereva.validate()
            except ValueError as error:
                raise PruningError(f"AlterEva: {error}") from None
        if self.synflow.iterations < 1:
            raise PruningError(f"SynFlow needs at least one iteration, got {self.synflow.iterations}")
        if self.prospr.steps < 0 or self.prospr.mode not in PROSPR_MODES:
            raise PruningError(f"ProsPr needs steps >= 0 and a mode in {PROSPR_MODES}")
        return self


def request_dict(request: PruneRequest) -> dict:
    """The request as plain data, without the option blocks of other methods."""
    table = request.latency_table
    data = asdict(replace(request, latency_table=None))
    if table is not None:
        data["latency_table"] = str(table) if isinstance(table, str | Path) else f"<in-memory table: {table.backend}>"
    for method in METHOD_OPTIONS:
        if request.method != method:
            data.pop(method)
    return data
