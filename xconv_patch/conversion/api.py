"""convert() and plan(): analyse the model, decide per tensor, apply the decisions.

convert() traces the model with torch.fx to find every convolution and the activations producing
their inputs, measures what its forward keeps (analysis.py), decides per layer how the tensor it
keeps is stored (planner.py), and swaps modules in the model's own tree (apply.py), so the model
keeps its class, Parameters and state_dict keys. Functional convolutions and activations are
patched only on request (rewrite_forward=True), since that makes the result a GraphModule that
runs the training-mode graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import fx, nn

from ..activations import BIT_ACTIVATIONS
from ..checkpointing import find_blocks
from ..recompute.compressed import check_norm_storage
from . import budget
from .analysis import Analysis, analyse, one_line
from .apply import apply, copy_sharing_tensors
from .budget import MemoryBudget, Rung
from .functional import ConvTracer
from .planner import FilterFn, Plan, make_plan
from .recipe import Recipe, load_recipe
from .report import ActivationRecord, ConversionReport, LayerRecord, NormRecord


@dataclass(frozen=True)
class _Settings:
    """convert()'s and plan()'s arguments after the model, validated."""

    probes: int | None
    recipe: Recipe
    input_shape: Sequence[int] | None
    example_inputs: Any
    strict: bool
    filter_fn: FilterFn | None
    rewrite_forward: bool
    recompute: bool
    norm_storage: str | None
    memory_budget: MemoryBudget | None

    @classmethod
    def checked(cls, probes: Any, recipe: Any, *args: Any) -> _Settings:
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 0):
            raise ValueError(f"probes must be a non-negative integer (0 = exact), got {probes!r}")
        if not isinstance(recipe, (str, Path, Recipe, type(None))):
            kind = type(recipe).__name__
            raise TypeError(f"recipe must be a shipped recipe's name, a TOML path or a Recipe, got {kind}")
        settings = cls(probes, load_recipe("default" if recipe is None else recipe), *args)
        if settings.filter_fn is not None and not callable(settings.filter_fn):
            kind = type(settings.filter_fn).__name__
            raise TypeError(f"filter_fn must be callable as filter_fn(module, name), got {kind}")
        if settings.norm_storage is not None:
            check_norm_storage(settings.norm_storage)
        budget = settings.memory_budget
        if budget is not None:
            budget = budget if isinstance(budget, MemoryBudget) else MemoryBudget(budget)
            budget.bytes  # noqa: B018 (validates the size)
            if settings.input_shape is None:
                raise ValueError("memory_budget needs input_shape (the batch the training step runs on)")
            settings = replace(settings, memory_budget=budget)
        return settings


def convert(
    model: nn.Module,
    probes: int | None = None,
    recipe: str | Path | Recipe | None = None,
    *,
    inplace: bool = False,
    input_shape: Sequence[int] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    filter_fn: FilterFn | None = None,
    rewrite_forward: bool = False,
    recompute: bool = True,
    norm_storage: str | None = None,
    memory_budget: int | str | MemoryBudget | None = None,
) -> nn.Module:
    """The model with its convolutions patched; the report is on the result as `xconv_report`.

    probes: the default probe budget (replaces the recipe's default, not its explicit rules).
    recipe: a shipped recipe's name, a TOML path or a Recipe; the 'default' recipe when None.
    inplace: modify `model` itself; otherwise `model`'s module tree is left untouched and the
        result is a copy sharing its Parameter and buffer objects, so an optimizer built on
        `model.parameters()` trains the patched model. Always use the return value.
    input_shape / example_inputs: an input to analyse: with one, byte figures are measured and
        decisions follow what autograd really keeps; without, they follow the graph alone.
    strict: a recipe rule selecting by name, pattern or type that matches no layer is an error
        instead of a warning.
    filter_fn(module, name): False leaves that conv untouched (for a functional call, `module` is
        the module owning the weight).
    rewrite_forward: also patch functional convolutions and activations (F.conv2d, F.relu ...) by
        rewriting the forward with torch.fx: the result is then a GraphModule (not the model's
        class) running the graph traced in training mode; the report says what that freezes.
    recompute: recompute in backward what is cheap to recompute from a norm's kept input (exact);
        False keeps it or probes it instead, which saves the recomputation's time (an elementwise
        pass per recomputed tensor, a norm's statistics) at the cost of memory or gradient noise.
    norm_storage: how the norm inputs everything else is recomputed from are kept: "exact", or
        "bfloat16" / "int8" (2x / 3.8x smaller, with stochastic rounding: gradients unbiased, no
        longer exact); replaces the recipe's default, not its rules. Needs an input to analyse.
    memory_budget: the most a training step at `input_shape` may take ("6GiB", "900MiB", bytes, or
        a MemoryBudget for an autocast step): the settings are chosen, from exact to int8 norm
        inputs (budget.LADDER), as the first whose predicted step peak fits; MemoryBudgetError
        (a ValueError saying by how much) when none does. `probes` and `norm_storage` then set
        only the rungs that leave them open.
    """
    settings = _Settings.checked(
        probes, recipe, input_shape, example_inputs, strict, filter_fn, rewrite_forward, recompute, norm_storage,
        memory_budget,
    )
    conversion = _plan(model, settings)
    result = apply(conversion, model if inplace else copy_sharing_tensors(model))
    result.xconv_report = report(conversion)
    return result


def plan(
    model: nn.Module,
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
) -> ConversionReport:
    """The report convert() would produce with these arguments; the model is not changed."""
    settings = _Settings.checked(
        probes, recipe, input_shape, example_inputs, strict, filter_fn, rewrite_forward, recompute, norm_storage,
        memory_budget,
    )
    return report(_plan(model, settings))


def _plan(model: nn.Module, settings: _Settings) -> Plan:
    analysis = analyse(model, settings.input_shape, settings.example_inputs)

    def plan_for(rung: Rung | None) -> Plan:
        probes = settings.probes if rung is None or rung.probes is None else rung.probes
        norm_storage = settings.norm_storage if rung is None or rung.norm_storage is None else rung.norm_storage
        conversion = make_plan(
            model, analysis, settings.recipe, probes, strict=settings.strict, filter_fn=settings.filter_fn,
            rewrite_forward=settings.rewrite_forward, recompute=settings.recompute and (rung is None or rung.recompute),
            norm_storage=norm_storage,
        )
        if rung is not None and rung.checkpoint:
            conversion = replace(conversion, checkpointed=tuple(find_blocks(model)))
        return conversion

    if settings.memory_budget is None:
        return plan_for(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each rung's plan would repeat the recipe's warnings
        chosen = budget.choose(settings.memory_budget, tuple(settings.input_shape), plan_for, partial(_built, model))
    for problem in chosen.warnings:
        warnings.warn(problem, stacklevel=3)
    return chosen


def _built(model: nn.Module, conversion: Plan) -> nn.Module:
    return apply(conversion, copy_sharing_tensors(model))


def report(plan: Plan) -> ConversionReport:
    """The plan as the report users read: per layer, its action, storage and reason, and the totals."""
    analysis = plan.analysis
    path, path_reason = _path(plan)
    return ConversionReport(
        layers=[_layer_record(decision, analysis) for decision in plan.convs],
        activations=[
            ActivationRecord(
                decision.layer.name,
                decision.layer.type,
                BIT_ACTIVATIONS[decision.layer.kind].__name__ if decision.switched else None,
                "; ".join(decision.reasons),
                len(decision.layer.sites),
                decision.storage,
            )
            for decision in plan.activations
            if decision.reasons
        ],
        path=path,
        path_reason=path_reason,
        forward_rewritten=bool(plan.rewritten_calls),
        recipe=plan.recipe.source,
        defaults=plan.recipe.budget(plan.probes),
        probes=plan.probes,
        analysis=analysis.note,
        input_shape=analysis.input_shape,
        activation_bytes_before=plan.activation_bytes_before,
        activation_bytes_after=plan.activation_bytes_after,
        storage_bytes=plan.storage_bytes,
        recomputes=plan.recomputes,
        warnings=list(plan.warnings),
        norm_storage=plan.norm_storage,
        checkpointed=list(plan.checkpointed),
        budget=plan.budget,
        norms=[
            NormRecord(
                ", ".join(f"{type(analysis.reference.get_submodule(name)).__name__} '{name}'" for name in norm.modules),
                list(norm.modules), norm.storage, "; ".join(norm.reasons),
                norm.bytes_before, norm.bytes_after,
            )
            for norm in plan.norms
        ],
    )


def _path(plan: Plan) -> tuple[str, str]:
    analysis = plan.analysis
    if analysis.graph is None:
        reason = f"torch.fx could not trace {analysis.model_type.__name__} ({analysis.trace_error})"
        return "module-swap", reason + "; every conv module swapped without a graph"
    if not plan.rewritten_calls:
        return "fx", "traced with torch.fx; modules swapped in the model's own tree, forward unchanged"
    reason = (
        f"traced with torch.fx; forward rewritten for {plan.rewritten_calls} functional calls, so the result is "
        f"a GraphModule, not a {analysis.model_type.__name__}"
    )
    return "fx", f"{reason}; {_frozen(analysis)}"


def _frozen(analysis: Analysis) -> str:
    """What the rewritten forward freezes: the graph traced in training mode, compared with eval mode's."""
    reference = analysis.reference
    try:
        eval_graph = ConvTracer().trace(reference.eval())
    except Exception as error:  # the eval-mode forward does not trace: say so
        return f"it runs the training-mode graph in every mode (eval mode does not trace: {one_line(error)})"
    finally:
        reference.train()
    train_code = fx.GraphModule(reference, analysis.graph).code
    if fx.GraphModule(reference, eval_graph).code == train_code:
        return "the eval-mode graph is the same, so train() and eval() behave as the original's"
    return (
        "it runs the training-mode graph in every mode, and this model's eval-mode forward differs "
        "(self.training branches): call revert() on it before evaluating"
    )


def _layer_record(decision: Any, analysis: Analysis) -> LayerRecord:
    layer, calls = decision.layer, analysis.keeping.calls
    first_call = calls.get(layer.sites[0]) if layer.sites else None
    return LayerRecord(
        name=layer.name,
        type=layer.type,
        action=decision.action,
        storage=decision.storage,
        reason="; ".join(decision.reasons),
        probes=decision.settings.probes if decision.action == "patched" else 0,
        probe=decision.settings.probe,
        per_sample=decision.settings.per_sample,
        deflate=decision.settings.deflate,
        rule=decision.rule,
        calls=len(layer.sites),
        recompute=decision.recompute,
        norm_storage=decision.norm_storage,
        input_shape=first_call.input_shape if first_call else None,
        output_shape=first_call.output_shape if first_call else None,
        activation_bytes_before=decision.bytes_before,
        activation_bytes_after=decision.bytes_after,
    )

