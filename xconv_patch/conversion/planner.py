"""Step 2 of a conversion: a decision, with its reason, for every tensor the conversion can change.

Each convolution keeps its input for backward; each ReLU-like activation keeps its output or its
input. A decision says how that tensor is stored after the conversion (`storage`) and why:

- a convolution's input: "recomputed" (in backward, from a norm's input that is kept anyway: the
  convolution stays exact and keeps nothing of it), "probed" (an XConv layer keeps a probe
  projection), "kept" (torch's layer keeps it) or "none" (an XConv layer whose weight is frozen
  keeps nothing of it);
- an activation's kept tensor: "recomputed", "bits" (a 1-bit mask) or "kept";
- a norm's input (what recomputed tensors are replayed from): "kept", or compressed ("bfloat16",
  "int8") where the recipe's `norm_storage` asks for it and compressing frees it; ReLU-like
  activations replayed from a compressed input then keep 1-bit masks, so their gradient's zeros stay
  where they were (a max pool keeps its maxima's window offsets, whatever the input's storage).

Recomputation is exact and cheap (one elementwise pass), so it comes first; probing is only for
inputs that cannot be recomputed (a block input after pooling, the network input, convs of a
norm-free net), and only where it frees something. The planner is a sequence of passes over
immutable records: the recipe's settings, inputs too small to probe, recomputable inputs, norm
inputs to compress, activations whose switch frees memory or keeps a mask exact, probes that
would free nothing, and the bytes of each decision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from ..estimator import kept_bytes
from ..probes import ProbeSpec
from ..recompute.compressed import NORM_STORAGES, stored_bytes
from .analysis import ActivationLayer, Analysis, ConvLayer
from .recipe import PATTERN_RANK, Recipe, RecipeError
from .saved_tensors import Keeping

if TYPE_CHECKING:
    from .budget import BudgetChoice

FilterFn = Callable[[nn.Module, str], bool]
ACTIONS = ("patched", "exact", "skipped")
STORAGES = ("recomputed", "probed", "kept", "none")
"""What convert did to a convolution, and how its input is stored for backward after it."""


@dataclass(frozen=True)
class ConvDecision:
    """What happens to one convolution, and how its input is stored for backward."""

    layer: ConvLayer
    settings: ProbeSpec
    rule: str
    action: str
    storage: str = "kept"
    recompute: bool = True
    norm_storage: str = "exact"
    reasons: tuple[str, ...] = ()
    bytes_before: int | None = None
    bytes_after: int | None = None

    def patched(self) -> ConvDecision:
        return replace(self, action="patched", storage="probed" if self.layer.trains else "none")

    def explained(self, reason: str) -> ConvDecision:
        if not reason or reason in self.reasons:
            return self
        return replace(self, reasons=(*self.reasons, reason))


@dataclass(frozen=True)
class ActivationDecision:
    """Whether one activation keeps a 1-bit mask ("bits") or what torch's keeps ("kept")."""

    layer: ActivationLayer
    storage: str
    reasons: tuple[str, ...] = ()

    @property
    def switched(self) -> bool:
        return self.storage == "bits"


NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
"""Norm modules (BatchNorm, InstanceNorm, GroupNorm, LayerNorm and subclasses such as timm's
BatchNormAct2d) whose kept input can be stored compressed."""


@dataclass(frozen=True)
class NormDecision:
    """How the input one or more norm calls keep for backward is stored: "kept" as it is, or
    compressed (NORM_STORAGES); `modules` are the norms' qualified names."""

    input: Hashable
    sites: tuple[str, ...]
    modules: tuple[str, ...]
    storage: str = "kept"
    reasons: tuple[str, ...] = ()
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compressed(self) -> bool:
        return self.storage != "kept"


@dataclass(frozen=True)
class Plan:
    """Every decision of one conversion, with the analysis it was made from."""

    analysis: Analysis
    recipe: Recipe
    probes: int | None
    convs: tuple[ConvDecision, ...]
    activations: tuple[ActivationDecision, ...]
    norms: tuple[NormDecision, ...]
    rewrite_forward: bool
    warnings: tuple[str, ...]
    storage_bytes: dict[str, int] | None
    """Saved-activation bytes after the conversion by how they are stored ('kept', 'compressed',
    'probed', 'bits'), and the bytes 'recomputed' instead of kept; None without a measured analysis."""
    norm_storage: str = "exact"
    """How norm inputs that no convolution's setting decides are stored."""
    checkpointed: tuple[str, ...] = ()
    """Blocks whose forward runs under activation checkpointing (chosen by a memory budget)."""
    budget: BudgetChoice | None = None
    """The memory budget's choice, when the plan was made for one."""

    def with_budget(self, choice: BudgetChoice) -> Plan:
        return replace(self, budget=choice)

    @property
    def activation_bytes_before(self) -> int | None:
        return self.analysis.keeping.total_bytes

    @property
    def activation_bytes_after(self) -> int | None:
        if self.storage_bytes is None:
            return None
        return sum(count for kind, count in self.storage_bytes.items() if kind != "recomputed")

    @property
    def recomputes(self) -> bool:
        """Whether the converted model recomputes saved tensors in backward (or keeps norm inputs
        compressed, which the same tracker does)."""
        return any(d.storage == "recomputed" for d in (*self.convs, *self.activations)) or any(
            d.compressed for d in self.norms
        )

    @property
    def rewritten_calls(self) -> int:
        """Functional calls the plan patches, each needing the forward rewritten."""
        patched = sum(len(d.layer.nodes) for d in self.convs if d.action == "patched")
        return patched + sum(len(d.layer.nodes) for d in self.activations if d.switched)


def make_plan(
    model: nn.Module,
    analysis: Analysis,
    recipe: Recipe,
    probes: int | None,
    *,
    strict: bool,
    filter_fn: FilterFn | None,
    rewrite_forward: bool,
    recompute: bool = True,
    norm_storage: str | None = None,
) -> Plan:
    """The decisions for `analysis` under `recipe` (see the module docstring for the passes);
    recompute=False plans as if nothing could be recomputed (probes and 1-bit masks only);
    `norm_storage` replaces the recipe's default one."""
    convs, problems = _recipe_pass(model, analysis, recipe, probes, strict, filter_fn, rewrite_forward, norm_storage)
    keeping = analysis.keeping if recompute else replace(analysis.keeping, recomputed={})
    forced = {site for d in convs if not d.recompute for site in d.layer.sites}  # the recipe says: never
    keeping = replace(keeping, recomputed={value: sites - forced for value, sites in keeping.recomputed.items()})
    default_norm_storage = norm_storage or recipe.storage.norm_storage
    norms: tuple[NormDecision, ...] = ()
    if keeping.measured:
        convs = _recompute_pass(_tiny_input_pass(convs, keeping), keeping)
        norms = _norm_pass(model, analysis, convs, keeping, default_norm_storage, rewrite_forward)
    elif default_norm_storage != "exact" or any(d.norm_storage != "exact" for d in convs):
        problems = (*problems, "norm_storage needs an analysed input (input_shape or example_inputs): norm "
                               "inputs stay exact")
        warnings.warn(problems[-1], stacklevel=4)
    activations = _activation_pass(convs, analysis.activations, keeping, norms, rewrite_forward)
    if keeping.measured:
        convs = _frees_nothing_pass(convs, activations, keeping)
    convs, norms, storage_bytes = _bytes_pass(convs, activations, norms, keeping)
    return Plan(
        analysis, recipe, probes, convs, activations, norms, rewrite_forward, problems, storage_bytes,
        default_norm_storage,
    )


def _recipe_pass(
    model: nn.Module,
    analysis: Analysis,
    recipe: Recipe,
    probes: int | None,
    strict: bool,
    filter_fn: FilterFn | None,
    rewrite_forward: bool,
    norm_storage: str | None,
) -> tuple[tuple[ConvDecision, ...], tuple[str, ...]]:
    """Recipe settings and action for every conv; also the warnings about rules that match nothing."""
    decisions = []
    for conv in analysis.convs:
        settings, rules = recipe.settings_for(conv.facts, probes)
        storage = recipe.storage_for(conv.facts, norm_storage)
        label = ", ".join(rule.label for rule in rules) or "defaults"
        decision = ConvDecision(
            conv, settings, label, "skipped", recompute=storage.recompute, norm_storage=storage.norm_storage
        )
        if conv.overrides is not None:
            decision = decision.explained(f"{conv.overrides.__qualname__} overrides forward")
        elif filter_fn is not None and not filter_fn(model.get_submodule(conv.owner), conv.name):
            decision = decision.explained("filter_fn returned False")
        elif conv.functional and settings.probes and not rewrite_forward:
            decision = decision.explained(
                f"functional {conv.type} call: patching it rewrites the forward as a torch.fx GraphModule "
                "(pass rewrite_forward=True)"
            )
        else:
            decision = decision.patched() if settings.probes else replace(decision, action="exact")
            decision = decision.explained(next((rule.why for rule in reversed(rules) if rule.why), ""))
        if not conv.sites:
            decision = decision.explained("not called by forward")
        decisions.append(decision)
    problems = []
    for rule in recipe.rules:
        selects_by_name_or_type = rule.rank >= PATTERN_RANK or "type" in rule.match
        if selects_by_name_or_type and not any(rule.matches(conv.facts) for conv in analysis.convs):
            problems.append(f"{recipe.source}: {rule.label} (match = {dict(rule.match)}) matches no convolution")
    if strict and problems:
        raise RecipeError(problems[0])
    for problem in problems:
        warnings.warn(problem, stacklevel=5)
    return tuple(decisions), tuple(problems)


def _tiny_input_pass(convs: tuple[ConvDecision, ...], keeping: Keeping) -> tuple[ConvDecision, ...]:
    """A conv whose input has no more pixels than probes would keep a projection no smaller than it."""
    decisions = []
    for decision in convs:
        shapes = [keeping.calls[site].input_shape for site in decision.layer.sites if keeping.calls[site].input_shape]
        if decision.action == "patched" and shapes:
            pixels = min(math.prod(shape[2:]) for shape in shapes)
            if pixels <= decision.settings.probes:
                reason = f"its input has {pixels} pixels, not more than {decision.settings.probes} probes"
                decision = replace(decision, action="exact", storage="kept", reasons=(reason,))
        decisions.append(decision)
    return tuple(decisions)


def _recompute_pass(convs: tuple[ConvDecision, ...], keeping: Keeping) -> tuple[ConvDecision, ...]:
    """A conv whose input is recomputable at every call stays exact and keeps nothing of it."""
    decisions = []
    for decision in convs:
        sites = decision.layer.sites
        inputs = [keeping.calls[site].input for site in sites]
        if sites and decision.layer.trains and all(
            keeping.is_recomputed(value, site) for value, site in zip(inputs, sites, strict=True)
        ):
            action = "exact" if decision.action == "patched" else decision.action
            reason = f"input recomputed from {recomputed_from(inputs[0], keeping)}"
            reasons = (reason,) if action != "skipped" else (*decision.reasons, reason)
            decision = replace(decision, action=action, storage="recomputed", reasons=reasons)
        decisions.append(decision)
    return tuple(decisions)


def recomputed_from(value: Any, keeping: Keeping) -> str:
    """"what <norm> keeps: <recipe>": what a recomputed value is replayed from, and how."""
    anchor = keeping.anchors.get(value)
    norms = labels(keeping.kept_by(anchor), keeping) if anchor is not None else "a norm"
    return f"what {norms} keeps: {keeping.recipes.get(value, '?')}"


def _norm_pass(
    model: nn.Module,
    analysis: Analysis,
    convs: tuple[ConvDecision, ...],
    keeping: Keeping,
    default: str,
    rewrite_forward: bool,
) -> tuple[NormDecision, ...]:
    """Per input kept by norm modules: compressed as the convs recomputed from it ask (the least
    compression among them; `default` when none is), unless that would not free it or would move
    what a replay selects (a functional ReLU's zeros)."""
    activations = analysis.activations
    nodes = {node.name: node for node in analysis.graph.nodes} if analysis.graph is not None else {}
    norm_sites: dict[Hashable, list[str]] = {}
    owners: dict[str, str] = {}
    for site, call in keeping.calls.items():
        owner = _norm_module(model, call.owner, nodes.get(site))
        if owner is not None and call.input in keeping.keepers and site in keeping.keepers[call.input]:
            norm_sites.setdefault(call.input, []).append(site)
            owners[site] = owner
    wanted: dict[Hashable, list[str]] = {}
    for decision in convs:
        if decision.storage == "recomputed":
            for site in decision.layer.sites:
                for source in keeping.sources.get(keeping.calls[site].input, ()):
                    wanted.setdefault(source, []).append(decision.norm_storage)
    functional_relus = {site: layer for layer in activations if layer.functional and not rewrite_forward
                        for site in layer.sites}
    decisions = []
    for value, sites in norm_sites.items():
        kinds = wanted.get(value) or [default]
        kind = min(kinds, key=NORM_STORAGES.index)
        decision = NormDecision(value, tuple(sites), tuple(dict.fromkeys(owners[site] for site in sites)))
        others = keeping.kept_by(value) - set(sites)
        relus = [layer for site, layer in functional_relus.items() if any(
            value in keeping.sources.get(kept, ()) for kept, keepers in keeping.keepers.items() if site in keepers)]
        if kind == "exact":
            reason = ""
        elif others:
            reason = f"{kind} storage would free nothing: it is also kept by {labels(others, keeping)}"
        elif relus:
            reason = (f"kept exact: functional {relus[0].type} call '{relus[0].name}' is replayed from it and "
                      "would move its zeros (pass rewrite_forward=True to keep its mask)")
        else:
            decision = replace(decision, storage=kind)
            reason = f"stored as {kind} with stochastic rounding (unbiased), norm_storage = {kind!r}"
        decisions.append(replace(decision, reasons=(reason,) if reason else ()))
    return tuple(decisions)


def _norm_module(model: nn.Module, owner: str, node: fx.Node | None) -> str | None:
    """The qualified name of the norm module running at a site: the called module, or for a
    functional norm traced inside a module's forward (timm's BatchNormAct2d), the module owning its
    statistics or affine parameters; None when the site is not a norm module's."""
    candidates = [owner]
    if node is not None and node.op == "call_function":
        candidates = [str(arg.target).rpartition(".")[0] for arg in node.all_input_nodes if arg.op == "get_attr"]
    for name in candidates:
        try:
            if isinstance(model.get_submodule(name), NORM_MODULES):
                return name
        except AttributeError:
            continue
    return None


def _frees_nothing_pass(
    convs: tuple[ConvDecision, ...], activations: tuple[ActivationDecision, ...], keeping: Keeping
) -> tuple[ConvDecision, ...]:
    """A patched conv whose input something else still keeps would pay the probes' noise and compute
    for nothing: it stays exact."""
    released = {site for d in convs if d.action == "patched" for site in d.layer.sites}
    released |= {site for d in activations if d.switched for site in d.layer.sites}
    decisions = []
    for decision in convs:
        if decision.action == "patched" and decision.layer.trains:
            still = set().union(*(keeping.kept_by(keeping.calls[site].input) for site in decision.layer.sites))
            still -= released
            if still:
                reason = f"probing would free nothing: its input is still kept by {labels(still, keeping)}"
                decision = replace(decision, action="exact", storage="kept", reasons=(reason,))
        decisions.append(decision)
    return tuple(decisions)


def _activation_pass(
    convs: tuple[ConvDecision, ...],
    activations: tuple[ActivationLayer, ...],
    keeping: Keeping,
    norms: tuple[NormDecision, ...],
    rewrite_forward: bool,
) -> tuple[ActivationDecision, ...]:
    """Per activation: what it keeps is recomputed (with a 1-bit mask when it is replayed from a
    compressed norm input, so its zeros stay where they were), or, producing a conv's input, it
    switches to 1-bit masks where that frees what it keeps (nothing but patched convs keeps it
    too), or it keeps."""
    patched = {site for d in convs if d.action == "patched" for site in d.layer.sites}
    conv_inputs = {keeping.calls[site].input for d in convs for site in d.layer.sites}
    compressed = {d.input: d for d in norms if d.compressed}
    kept_by: dict[str, list[Any]] = {}
    for value, sites in keeping.keepers.items():
        for site in sites:
            kept_by.setdefault(site, []).append(value)
    decisions = []
    for activation in activations:
        reasons: list[str] = []
        switches: list[str] = []
        storages = set()
        switchable = not activation.functional or rewrite_forward
        for site in activation.sites:
            call = keeping.calls[site]
            if call.output is None:
                continue
            kept = kept_by.get(site, [])
            if kept and all(keeping.is_recomputed(value, site) for value in kept):
                sources = set().union(*(keeping.sources.get(value, ()) for value in kept))
                norm = next((compressed[source] for source in sources if source in compressed), None)
                if norm is not None and switchable:
                    storages.add("bits")
                    switches.append(f"keeps a 1-bit mask: replayed from the {norm.storage} input of "
                                    f"{labels(set(norm.sites), keeping)}, its zeros would move")
                    continue
                storages.add("recomputed")
                reasons.append(f"what it keeps is recomputed from {recomputed_from(kept[0], keeping)}")
                continue
            if call.output not in conv_inputs:
                continue
            others = set().union(*(keeping.kept_by(value) for value in kept)) - patched - {site}
            if not kept:
                reasons.append("keeps nothing for backward")
            elif others:
                verb = "is also kept" if keeping.measured else "may also be kept"
                reasons.append(f"what it keeps {verb} by {labels(others, keeping)}")
            elif not switchable:
                reasons.append(
                    f"functional {activation.type} call: switching it rewrites the forward as a torch.fx "
                    "GraphModule (pass rewrite_forward=True)"
                )
            else:
                storages.add("bits")
                switches.append(f"switching frees {_kept_description(kept, call)}")
        if "bits" in storages:
            storage, reasons = "bits", switches
        else:
            storage = "recomputed" if storages == {"recomputed"} else "kept"
        decisions.append(ActivationDecision(activation, storage, tuple(dict.fromkeys(reasons))))
    return tuple(decisions)


def _kept_description(kept: list[Any], call: Any) -> str:
    if call.output in kept:
        return "its output"
    return "its input" if call.input in kept else "its copy of its input"


def _bytes_pass(
    convs: tuple[ConvDecision, ...],
    activations: tuple[ActivationDecision, ...],
    norms: tuple[NormDecision, ...],
    keeping: Keeping,
) -> tuple[tuple[ConvDecision, ...], tuple[NormDecision, ...], dict[str, int] | None]:
    """Per-conv reasons and bytes (a shared input counts at its first reader), per-norm bytes, and
    the bytes after the conversion by how they are stored."""
    calls = keeping.calls
    switched = {site: d.layer for d in activations if d.switched for site in d.layer.sites}
    patched = {site for d in convs if d.action == "patched" for site in d.layer.sites}
    released = patched | set(switched)
    conv_of = {site: d for d in convs for site in d.layer.sites}
    first_reader: dict[Any, str] = {}
    for site in calls:
        if site in conv_of:
            first_reader.setdefault(calls[site].input, site)
    masks, projections = {}, {}
    if keeping.measured:
        keeping_sites = set().union(*keeping.keepers.values())
        masks = {site: math.ceil(math.prod(calls[site].output_shape) / 8) for site in switched if site in keeping_sites}
        projections = {
            site: _projection_bytes(calls[site], conv_of[site].settings.probes)
            for site in patched
            if conv_of[site].layer.trains and site in keeping.kept_by(calls[site].input)
        }
    decisions = []
    for decision in convs:
        before = after = 0
        for site in decision.layer.sites:
            value = calls[site].input
            remaining = keeping.kept_by(value) - released
            producers = [other for other in switched if calls[other].output == value]
            if first_reader[value] == site and value in keeping.keepers:
                before += keeping.nbytes.get(value, 0)
                after += keeping.nbytes.get(value, 0) if remaining else 0
                after += sum(masks.get(producer, 0) for producer in producers)
            after += projections.get(site, 0)
            if decision.action != "patched":
                continue
            if first_reader[value] != site:
                decision = decision.explained(f"input shared with '{conv_of[first_reader[value]].layer.name}', "
                                              "counted there")
            elif value not in keeping.keepers:
                decision = decision.explained("its input is not kept for backward" if keeping.measured else "")
            elif remaining:
                verb = "still kept" if keeping.measured else "may still be kept"
                decision = decision.explained(f"input {verb} by {labels(remaining, keeping)}")
            else:
                freed = "input freed" if keeping.measured else "input no longer kept"
                if producers:
                    freed += f" ({switched[producers[0]].name} now keeps a 1-bit mask)"
                if value in keeping.network_inputs:
                    freed += "; it is the model's input, which the caller holds anyway"
                decision = decision.explained(freed)
        if keeping.measured:
            decision = replace(decision, bytes_before=before, bytes_after=after)
        decisions.append(decision)
    if not keeping.measured:
        return tuple(decisions), norms, None
    norms = tuple(
        replace(norm, bytes_before=keeping.nbytes.get(norm.input, 0), bytes_after=_norm_bytes(norm, keeping))
        for norm in norms
    )
    compressed = {norm.input: norm.bytes_after for norm in norms if norm.compressed}
    kept = recomputed = 0
    for value, nbytes in keeping.nbytes.items():
        if value in compressed:
            continue
        if keeping.kept_by(value) - released:
            kept += nbytes
        elif keeping.kept_by(value) != keeping.keepers[value]:
            recomputed += nbytes
    kept += sum(nbytes for value, nbytes in keeping.stored.items()
                if any(keeping.is_recomputed(saved, site) for saved, site in keeping.stored_for[value]))
    storage = {
        "kept": kept, "compressed": sum(compressed.values()), "probed": sum(projections.values()),
        "bits": sum(masks.values()), "recomputed": recomputed,
    }  # fmt: skip
    return tuple(decisions), norms, storage


def _norm_bytes(norm: NormDecision, keeping: Keeping) -> int:
    nbytes = keeping.nbytes.get(norm.input, 0)
    if not norm.compressed:
        return nbytes
    itemsize = keeping.calls[norm.sites[0]].input_itemsize
    return stored_bytes(nbytes // itemsize, itemsize, norm.storage)


def _projection_bytes(call: Any, probes: int) -> int:
    batch, channels = call.input_shape[:2]
    return kept_bytes(batch, channels, probes, call.input_itemsize)


def labels(sites: set[str], keeping: Keeping) -> str:
    """The sites as the user's names: at most three, then a count."""
    names = sorted({keeping.labels.get(site, site) for site in sites})
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
