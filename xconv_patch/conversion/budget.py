"""A memory budget picks the settings: the first rung of a ladder whose training step is predicted
to fit (FakeTensorMode: nothing is allocated).

The ladder is ordered by what each rung costs per byte it frees: first nothing (exact), then time
only (recomputing norm-to-conv tensors: exact gradients, an elementwise pass), then gradient noise
where nothing is recomputable (probes), then time again (checkpointing every block: a second
forward), then error in every gradient (norm inputs stored as bfloat16, then int8; unbiased).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .planner import Plan

GIB = 2**30


@dataclass(frozen=True)
class MemoryBudget:
    """The most a training step may take (bytes, or text such as "6GiB", "900MiB"), and the step
    it is for: the model family's synthetic batch and loss, SGD with momentum (one state tensor per
    parameter), and the forward under bf16 autocast when `amp`."""

    limit: int | str
    amp: bool = False
    family: str = "classification"

    @property
    def bytes(self) -> int:
        if isinstance(self.limit, str):
            from ..measure.spec import parse_size

            try:
                return parse_size(self.limit)
            except ValueError as error:
                raise ValueError(f"memory_budget: {error}") from None
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"memory_budget must be a byte count or a size such as '6GiB', got {self.limit!r}")
        return self.limit


@dataclass(frozen=True)
class Rung:
    """Settings to try: the probe budget (None: the recipe's or convert's), recomputation, how norm
    inputs are stored (None: the recipe's or convert's), and per-block checkpointing."""

    name: str
    probes: int | None = None
    recompute: bool = True
    norm_storage: str | None = None
    checkpoint: bool = False


LADDER = (
    Rung("exact", probes=0, recompute=False),
    Rung("recompute", probes=0),
    Rung("recompute + probes"),
    Rung("checkpoint per block", probes=0, recompute=False, checkpoint=True),
    Rung("recompute + probes + bfloat16 norm inputs", norm_storage="bfloat16"),
    Rung("recompute + probes + int8 norm inputs", norm_storage="int8"),
)


@dataclass(frozen=True)
class BudgetChoice:
    """The rung chosen for a budget (None: nothing fits) and each tried rung's predicted peak."""

    budget: int
    rung: str | None
    predicted: dict[str, int] = field(default_factory=dict)

    @property
    def predicted_peak(self) -> int | None:
        return self.predicted.get(self.rung) if self.rung is not None else None

    def summary(self) -> str:
        budget = f"memory budget {_size(self.budget)}"
        if self.rung is not None:
            return f"{budget}: {self.rung} (predicted step peak {_size(self.predicted_peak)})"
        last, peak = next(reversed(self.predicted.items()))
        return (f"{budget}: nothing fits; the most compressed settings ({last}) need {_size(peak)}, "
                f"{_size(peak - self.budget)} over")


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


class MemoryBudgetError(ValueError):
    """No settings fit the budget; `choice` has every rung's predicted peak."""

    def __init__(self, choice: BudgetChoice) -> None:
        super().__init__(choice.summary())
        self.choice = choice


def choose(
    budget: MemoryBudget,
    input_shape: tuple[int, ...],
    plan_for: Callable[[Rung], Plan],
    build: Callable[[Plan], nn.Module],
) -> Plan:
    """The plan of the first rung whose predicted step peak fits, with the choice on it
    (`plan.budget`); MemoryBudgetError when none does."""
    from ..measure.prediction import MemoryPredictor

    limit = budget.bytes
    predicted: dict[str, int] = {}
    for rung in LADDER:
        plan = plan_for(rung)
        predictor = MemoryPredictor(build(plan), budget.family, tuple(input_shape[1:]), amp=budget.amp)
        predicted[rung.name] = predictor(input_shape[0]).peak_bytes
        if predicted[rung.name] <= limit:
            return plan.with_budget(BudgetChoice(limit, rung.name, predicted))
    raise MemoryBudgetError(BudgetChoice(limit, None, predicted))
