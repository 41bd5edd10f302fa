"""The model a ProfileSpec names, built, planned and patched the same way in every process.

Every process (the parent and each worker) builds the model from the spec with the same seed, so
they all hold the same weights; the byte figures of the plan come from the same analysis inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import convert, plan, shipped_recipes
from ..conversion import MemoryBudget
from ..models import LoadedModel, resolve_model
from .batch import Batch
from .errors import first_line, out_of_memory_as_error
from .spec import ProfileSpec, SpecError, parse_size

if TYPE_CHECKING:
    from .. import ConversionReport


def build(spec: ProfileSpec) -> tuple[LoadedModel, tuple[int, ...]]:
    """The model and one sample's input shape, seeded so every process builds the same weights."""
    torch.manual_seed(spec.seed)
    loaded = resolve_model(spec.model, spec.attr, model_kwargs=spec.model_kwargs)
    return loaded, spec.sample_shape(loaded)


def analysis_inputs(family: str, batch_size: int, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """What convert()/plan() need to put byte figures on the plan for this model family."""
    if family == "optical_flow":
        example = Batch(family, batch_size, sample_shape, torch.device("cpu"))
        return {"example_inputs": tuple(example.inputs)}
    if family == "detection":
        return {}
    return {"input_shape": (batch_size, *sample_shape)}


def patch(model: nn.Module, spec: ProfileSpec, family: str, sample_shape: tuple[int, ...]) -> nn.Module:
    """The model converted in place by the spec's recipe and probe budget."""
    with out_of_memory_as_error(spec.batch_size), _input_errors(model, spec, sample_shape):
        return convert(
            model, spec.probes, spec.recipe, inplace=True, **conversion_options(spec, family),
            **analysis_inputs(family, spec.batch_size, sample_shape),
        )


def plan_for(model: nn.Module, spec: ProfileSpec, family: str, sample_shape: tuple[int, ...]) -> ConversionReport:
    """The conversion report (per-layer plan) for the spec, leaving the model as it is."""
    with out_of_memory_as_error(spec.batch_size), _input_errors(model, spec, sample_shape):
        return plan(
            model, spec.probes, spec.recipe, **conversion_options(spec, family),
            **analysis_inputs(family, spec.batch_size, sample_shape),
        )


def conversion_options(spec: ProfileSpec, family: str) -> dict[str, Any]:
    """convert()'s recompute, norm_storage and memory_budget options from the spec."""
    budget = None
    if spec.memory_budget is not None:
        budget = MemoryBudget(parse_size(spec.memory_budget), amp=spec.amp, family=family)
    return {"recompute": spec.recompute, "norm_storage": spec.norm_storage, "memory_budget": budget}


@dataclass(frozen=True)
class RecipeOption:
    """What a shipped recipe's plan keeps for the spec's input, and how many of its rules select nothing
    here (a recipe written for another architecture)."""

    activation_bytes: int | None
    unmatched_rules: int


def recipe_options(
    model: nn.Module, spec: ProfileSpec, family: str, sample_shape: tuple[int, ...]
) -> dict[str, RecipeOption]:
    """Per shipped recipe, the saved activation bytes its plan keeps for the spec's input (plans on
    meta tensors: nothing is allocated or measured; None where the model could not be analysed).
    The recipes' warnings about rules that match nothing are counted, not shown."""
    options = {}
    for name in shipped_recipes():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = plan_for(model, replace(spec, recipe=name), family, sample_shape)
        unmatched = sum(warning.endswith("matches no convolution") for warning in report.warnings)
        options[name] = RecipeOption(report.activation_bytes_after, unmatched)
    return options


@contextmanager
def _input_errors(model: nn.Module, spec: ProfileSpec, sample_shape: tuple[int, ...]) -> Iterator[None]:
    """The analysis's "input_shape (...): cannot run on this input" as a SpecError naming the options."""
    try:
        yield
    except ValueError as error:
        cause = error.__cause__
        if not str(error).startswith("input_shape (") or cause is None:
            raise
        shape = "x".join(map(str, sample_shape))
        raise SpecError(
            f"--input-shape {shape} with --batch-size {spec.batch_size}: {type(model).__name__} cannot run on a"
            f" batch of {spec.batch_size}x{shape} ({type(cause).__name__}: {first_line(cause)})"
        ) from error


def batchnorm_count(model: nn.Module) -> int:
    """How many BatchNorm layers the model has (their statistics need recalibrating after XConv training)."""
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def notes(batchnorm_layers: int, probed_layers: int) -> list[str]:
    """What a user of the patched model should know; today: BatchNorm recalibration, needed only
    when some weight gradients are probed (estimated)."""
    if not batchnorm_layers or not probed_layers:
        return []
    return [
        f"The model has {batchnorm_layers} BatchNorm layers and {probed_layers} probed convs. XConv's noisier "
        "weight updates move activation "
        "statistics faster than BatchNorm's running averages follow: before evaluating, re-estimate them with "
        "xconv_patch.recalibrate_bn(model, train_batches) (see the README)."
    ]


def conversion_summary(report: ConversionReport) -> dict[str, Any]:
    """The report's document without its per-layer records (which callers enrich and list apart)."""
    summary = report.to_dict()
    del summary["layers"]
    return summary
