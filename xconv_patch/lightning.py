"""XConvCallback: convert and recalibrate inside a Lightning Trainer (needs the `lightning` extra).

At setup the callback converts the LightningModule (or one of its submodules) in place with
`convert`, before the Trainer moves it to its device, wraps it for DDP or builds the optimizers, so
they all see the converted model; it logs the report once. During fit it re-estimates BatchNorm
statistics from training batches before each validation and at the end of fit (`recalibrate_bn`).
`convert` keeps state_dict keys, so the Trainer's checkpoints load into the unpatched model and
into a converted one. `import xconv_patch` never imports Lightning; this module does.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

try:
    import lightning.pytorch as pl
except ImportError as error:
    if error.name is None or error.name.partition(".")[0] != "lightning":
        raise  # Lightning is installed but something it imports is broken: that error says what
    raise ImportError('xconv_patch.lightning needs Lightning: pip install "xconv-patch[lightning]"') from None

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .batchnorm import recalibrate_bn as recalibrate_norms
from .conversion import ConversionReport, MemoryBudget, Recipe, convert
from .conversion.planner import ACTIONS, STORAGES, FilterFn

__all__ = ["XConvCallback"]


class XConvCallback(pl.Callback):
    """Converts the LightningModule's convolutions at setup; re-estimates BatchNorm statistics during fit.

    probes, recipe, input_shape, example_inputs, strict, filter_fn, rewrite_forward, recompute,
    norm_storage, memory_budget: as for `convert` (the conversion is always in place). Without input_shape and
        example_inputs, the LightningModule's `example_input_array` is the input analysed when the
        LightningModule itself is converted.
    submodule: the dotted name of the submodule to convert (`pl_module.get_submodule`), such as
        "model"; None converts the LightningModule itself. Recomputation runs in the converted
        module's forward, so name the module that `training_step` calls.
    recalibrate_bn: re-estimate BatchNorm running statistics before each validation during fit and
        at the end of fit, from at most `recalibrate_batches` batches of the (first) training
        dataloader (None: all of it), each prepared as for training_step (the module's
        on_before_batch_transfer, then the strategy's batch_to_device) and passed through
        `batch_to_input`; `recalibrate_bn` in xconv_patch says how. The converted module's forward
        runs on each batch's input (a batch's first element when it is a tuple or list).
    The report is `callback.report` (and `converted_module.xconv_report`) after setup. A module
    converted already (by this callback in an earlier fit, validate or test, or by `convert`) is
    not converted again.
    """

    def __init__(
        self,
        probes: int | None = None,
        recipe: str | Path | Recipe | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        example_inputs: Any = None,
        strict: bool = False,
        filter_fn: FilterFn | None = None,
        rewrite_forward: bool = False,
        recompute: bool = True,
        norm_storage: str | None = None,
        memory_budget: int | str | MemoryBudget | None = None,
        submodule: str | None = None,
        recalibrate_bn: bool = True,
        recalibrate_batches: int | None = 50,
        batch_to_input: Callable[[Any], Any] | None = None,
    ) -> None:
        if rewrite_forward and submodule is None:
            raise ValueError(
                "rewrite_forward=True turns the converted module into a GraphModule, which cannot replace the "
                "LightningModule: name the submodule to convert (submodule='model')"
            )
        if recalibrate_batches is not None and (
            isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) or recalibrate_batches < 1
        ):
            raise ValueError(f"recalibrate_batches must be a positive integer or None, got {recalibrate_batches!r}")
        if batch_to_input is not None and not callable(batch_to_input):
            raise TypeError(f"batch_to_input must be callable, got {type(batch_to_input).__name__}")
        self.convert_kwargs: dict[str, Any] = {
            "probes": probes,
            "recipe": recipe,
            "input_shape": input_shape,
            "example_inputs": example_inputs,
            "strict": strict,
            "filter_fn": filter_fn,
            "rewrite_forward": rewrite_forward,
            "recompute": recompute,
            "norm_storage": norm_storage,
            "memory_budget": memory_budget,
        }
        self.submodule = submodule
        self.recalibrate_bn = recalibrate_bn
        self.recalibrate_batches = recalibrate_batches
        self.batch_to_input = batch_to_input
        self.report: ConversionReport | None = None
        self.module: nn.Module | None = None  # the converted module
        self._calibrated_step: int | None = None
        self._forward_check: RemovableHandle | None = None
        self._forward_calls = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        if self.module is not None and target is self.module:
            return
        report = getattr(target, "xconv_report", None)
        if isinstance(report, ConversionReport):
            rank_zero_info(f"xconv: {self._name(pl_module)} is converted already: {report.summary()}")
        else:
            target = self._convert(pl_module, target)
            report = target.xconv_report
            rank_zero_info(f"xconv: converted {self._name(pl_module)}: {report.summary()}")
            for logger in trainer.loggers:
                logger.log_hyperparams(_report_totals(report))
        self.module, self.report = target, report

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrated_step = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is not None and self.report.recomputes and self.module is not None:
            self._forward_calls = 0
            self._forward_check = self.module.register_forward_pre_hook(self._count_forward)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the first step: warn if training_step did not run the converted module's forward."""
        if self._forward_check is None:
            return
        self._forward_check.remove()
        self._forward_check = None
        if not self._forward_calls:
            rank_zero_warn(
                f"xconv: training_step did not call the forward of the converted {self._name(pl_module)}, where "
                "recomputation runs, so the convs planned as recomputed keep their inputs: convert the module "
                "training_step calls (XConvCallback(submodule=...)) or call it through self(...)"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._forward_check is not None:  # no training step ran
            self._forward_check.remove()
            self._forward_check = None
        self._recalibrate(trainer, pl_module)

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per training step reached: re-estimate the statistics from training batches."""
        if not self.recalibrate_bn or self.module is None or self._calibrated_step == trainer.global_step:
            return
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            return
        batches = itertools.islice(self._inputs(trainer, pl_module, loader), self.recalibrate_batches)
        recalibrate_norms(self.module, batches)
        self._calibrated_step = trainer.global_step

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> Iterator[Any]:
        for batch in loader:
            batch = trainer.strategy.batch_to_device(pl_module.on_before_batch_transfer(batch, 0))
            yield batch if self.batch_to_input is None else self.batch_to_input(batch)

    def _count_forward(self, *_: Any) -> None:
        self._forward_calls += 1

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError as error:
            raise ValueError(f"XConvCallback(submodule={self.submodule!r}): {error}") from None

    def _convert(self, pl_module: pl.LightningModule, target: nn.Module) -> nn.Module:
        kwargs = dict(self.convert_kwargs)
        example = pl_module.example_input_array
        if (
            target is pl_module
            and kwargs["input_shape"] is None
            and kwargs["example_inputs"] is None
            and not isinstance(example, Mapping)  # keyword arguments: convert passes positional ones
        ):
            kwargs["example_inputs"] = example
        converted = convert(target, inplace=True, **kwargs)
        if converted is not target:  # rewrite_forward: a GraphModule in the submodule's place
            parent, _, name = self.submodule.rpartition(".")
            setattr(pl_module.get_submodule(parent), name, converted)
        return converted

    def _name(self, pl_module: pl.LightningModule) -> str:
        kind = type(pl_module).__name__
        return kind if self.submodule is None else f"{kind}.{self.submodule}"


def _report_totals(report: ConversionReport) -> dict[str, int | str]:
    """The report's totals as flat hyperparameters: `xconv/...` counts, bytes, path, recipe and probes."""
    totals: dict[str, int | str] = {"xconv/path": report.path, "xconv/recipe": report.recipe}
    if report.probes is not None:
        totals["xconv/probes"] = report.probes
    totals |= {f"xconv/convs_{action}": report.count(action) for action in ACTIONS}
    totals |= {f"xconv/inputs_{kind}": sum(layer.storage == kind for layer in report.layers) for kind in STORAGES}
    totals["xconv/activations_1bit"] = sum(record.switched_to is not None for record in report.activations)
    totals |= {f"xconv/norm_inputs_{kind}": count
               for kind, count in Counter(record.storage for record in report.norms).items()}
    if report.budget is not None:
        totals["xconv/memory_budget"] = report.budget.budget
        totals["xconv/memory_budget_rung"] = str(report.budget.rung)
    if report.bytes_freed is not None:
        totals["xconv/activation_bytes_before"] = report.activation_bytes_before
        totals["xconv/activation_bytes_after"] = report.activation_bytes_after
    return totals


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what `trainer.train_dataloader` holds (one, or a list or dict of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders
