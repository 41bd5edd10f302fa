"""A memory budget picks the settings: the first rung of a ladder whose training step is predicted
to fit (FakeTensorMode: nothing is allocated).

The ladder is ordered by what each rung costs per byte it frees: first nothing (exact), then time
only (recomputing norm-to-conv tensors: exact gradients, an elementwise pass), then gradient noise
where nothing is recomputable (probes), then time again (checkpointing every block: a second
forward), then error in every gradient (norm inputs stored as bfloat16, then int8; unbiased).
Within the rung that fits, the room left buys more probes, or checkpointing fewer blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from .planner import Plan
from .saved_tensors import Keeping

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
    (`plan.budget`); MemoryBudgetError when none does. Within the rung that fits, the room left
    is used: a probing rung takes more probes (2x, 4x, 8x) while they fit, and checkpointing
    covers the fewest blocks that fit, those keeping the most first."""
    from ..measure.prediction import MemoryPredictor

    limit = budget.bytes
    predicted: dict[str, int] = {}

    def fits(name: str, plan: Plan) -> bool:
        predictor = MemoryPredictor(build(plan), budget.family, tuple(input_shape[1:]), amp=budget.amp)
        predicted[name] = predictor(input_shape[0]).peak_bytes
        return predicted[name] <= limit

    for rung in LADDER:
        plan = plan_for(rung)
        if not fits(rung.name, plan):
            continue
        if rung.checkpoint:
            name, plan = _fewest_blocks(rung.name, plan, fits)
        elif rung.probes is None:
            name, plan = _more_probes(rung, plan, plan_for, fits)
        else:
            name = rung.name
        return plan.with_budget(BudgetChoice(limit, name, predicted))
    raise MemoryBudgetError(BudgetChoice(limit, None, predicted))


def _more_probes(
    rung: Rung, plan: Plan, plan_for: Callable[[Rung], Plan], fits: Callable[[str, Plan], bool]
) -> tuple[str, Plan]:
    """The rung with the most probes (its default doubled up to three times) that still fits:
    the probes' gradient noise falls as 1/probes."""
    chosen = rung.name, plan
    if not any(decision.storage == "probed" for decision in plan.convs):
        return chosen
    probes = plan.recipe.budget(plan.probes).probes
    for factor in (2, 4, 8):
        more = replace(rung, name=f"{rung.name} ({probes * factor} probes)", probes=probes * factor)
        candidate = plan_for(more)
        if not fits(more.name, candidate):
            break
        chosen = more.name, candidate
    return chosen


def _fewest_blocks(name: str, plan: Plan, fits: Callable[[str, Plan], bool]) -> tuple[str, Plan]:
    """Checkpointing of the fewest blocks that fits (every block fits), those whose layers keep the
    most chosen first: each checkpointed block runs its forward twice."""
    keeping = plan.analysis.keeping
    blocks = sorted(plan.checkpointed, key=lambda block: -_bytes_kept_inside(keeping, block))
    enough, short = len(blocks), 0  # every block fits; none is the exact rung, which did not
    while enough - short > 1:
        middle = (enough + short) // 2
        trial = replace(plan, checkpointed=tuple(blocks[:middle]))
        if fits(f"{name} ({middle} of {len(blocks)} blocks)", trial):
            enough = middle
        else:
            short = middle
    if enough == len(blocks):
        return name, plan
    return f"{name} ({enough} of {len(blocks)} blocks)", replace(plan, checkpointed=tuple(blocks[:enough]))


def _bytes_kept_inside(keeping: Keeping, block: str) -> int:
    """What the layers inside `block` keep for backward (0 without a measured analysis)."""
    inside = {site for site, call in keeping.calls.items() if call.owner == block or call.owner.startswith(f"{block}.")}
    return sum(keeping.nbytes.get(value, 0) for value, sites in keeping.keepers.items() if sites & inside)
