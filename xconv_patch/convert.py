"""convert(), plan() and revert(): patch every convolution of a model, driven by a recipe.

convert() traces the model with torch.fx to find every convolution (module calls of any torch
conv class or subclass, and functional calls whose weight is a model parameter) and the
activations producing their inputs. It then swaps modules in the model's own module tree, so the
model keeps its class, Parameters and state_dict keys; only functional calls need the forward
rewritten, which makes the result a GraphModule. Where fx cannot trace the model, every conv
module is still swapped. What each conv frees depends on what else keeps its input for backward
(DESIGN.md section 2): see keeping.py.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _ntuple

from .activations import BIT_ACTIVATIONS, bit_activation
from .estimator import kept_bytes
from .keeping import (
    CONV_FUNCTIONS,
    CONV_PARAMETERS,
    CONV_TRANSPOSE_PARAMETERS,
    Keeping,
    activation_call,
    first_tensor_argument,
    graph_keeping,
    map_tensors,
    measure_graph,
    measure_modules,
    meta_copy,
    sequential_keeping,
    torch_activation,
)
from .layers import XCONV_CLASSES, XConvMixin, torch_class, xconv_class
from .recipe import PATTERN_RANK, ConvFacts, LayerSettings, Recipe, RecipeError, load_recipe
from .report import ActivationRecord, ConversionReport, LayerRecord

FilterFn = Callable[[nn.Module, str], bool]
_MEASURED = "measured: saved tensors of a training-mode forward"
_SWITCHED = "switching frees"
_ESTIMATOR_ATTRIBUTES = ("probe_spec", "probes", "probe", "per_sample", "deflate")


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
) -> nn.Module:
    """The model with its convolutions patched; the report is on the result as `xconv_report`.

    probes: the default probe budget (replaces the recipe's default, not its explicit rules).
    recipe: a shipped recipe's name, a TOML path or a Recipe; the 'default' recipe when None.
    inplace: modify `model` itself (a model whose forward is rewritten still comes back as a new
        GraphModule: always use the return value); otherwise `model`'s module tree is left
        untouched and the result is a copy sharing its Parameter and buffer objects, so an
        optimizer built on `model.parameters()` trains the patched model.
    input_shape / example_inputs: an input to analyse: with one, byte figures are measured and
        decisions follow what autograd really keeps; without, they follow the graph alone.
    strict: a recipe rule selecting by name, pattern or type that matches no layer is an error
        instead of a warning.
    filter_fn(module, name): False leaves that conv untouched (for a functional call, `module` is
        the module owning the weight).
    """
    conversion = _plan(model, probes, recipe, input_shape, example_inputs, strict, filter_fn)
    result = conversion.apply(model if inplace else _copy_sharing_tensors(model))
    result.xconv_report = conversion.report
    return result


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree holding the same Parameter and buffer objects."""
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


def plan(
    model: nn.Module,
    probes: int | None = None,
    recipe: str | Path | Recipe | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    filter_fn: FilterFn | None = None,
) -> ConversionReport:
    """The report convert() would produce with these arguments; the model is not changed."""
    return _plan(model, probes, recipe, input_shape, example_inputs, strict, filter_fn).report


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with torch's own layers back (same Parameters): XConv -> torch conv (or the
    user's conv subclass), 1-bit activations -> nn.ReLU/ReLU6/Hardtanh, rewritten functional
    convolutions -> torch's functions."""
    target = model if inplace else _copy_sharing_tensors(model)
    torch_activations = {bit: kind for kind, bit in BIT_ACTIVATIONS.items()}
    replacements = {}
    for module in target.modules():
        if isinstance(module, XConvMixin):
            replacements[module] = _retyped(module, torch_class(type(module)))
        elif type(module) in torch_activations:
            replacements[module] = _retyped(module, torch_activations[type(module)])
    target = _swap(target, replacements)
    if isinstance(target, fx.GraphModule):
        for node in target.graph.nodes:
            if node.op == "call_function" and node.target is probed_conv:
                node.target = getattr(F, node.kwargs["op"])
                node.kwargs = {key: value for key, value in node.kwargs.items() if key in CONV_TRANSPOSE_PARAMETERS}
        target.recompile()
    vars(target).pop("xconv_report", None)
    return target


def probed_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    output_padding: int | Sequence[int] = 0,
    *,
    op: str,
    probes: int,
    probe: str = "rademacher",
    per_sample: bool = True,
    deflate: bool = True,
) -> torch.Tensor:
    """F.<op> (conv2d, conv_transpose3d, ...) with the XConv weight-gradient estimator: what a
    forward rewritten by convert() calls in place of a functional convolution.

    It runs an XConv layer built on the meta device with `weight` and `bias` swapped in.
    """
    rank = weight.dim() - 2
    transposed = op.startswith("conv_transpose")
    if transposed:
        torch_type, extra = getattr(nn, f"ConvTranspose{rank}d"), {"output_padding": output_padding}
        channels = (weight.shape[0], weight.shape[1] * groups)
    else:
        torch_type, extra = getattr(nn, f"Conv{rank}d"), {}
        channels = (weight.shape[1] * groups, weight.shape[0])
    layer = XCONV_CLASSES[torch_type](
        *channels,
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
        device="meta",
        probes=probes,
        probe=probe,
        per_sample=per_sample,
        deflate=deflate,
        **extra,
    )
    parameters = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(layer, parameters, (input,))


class _Tracer(fx.Tracer):
    """Keeps every convolution module (torch's, XConv's, a user's subclass), activation module and
    probed_conv call a leaf. Rewritten GraphModules carry it, so they reload after torch.save."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(probed_conv,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            isinstance(module, _ConvNd)
            or torch_activation(module) is not None
            or super().is_leaf_module(module, qualified_name)
        )


@dataclass
class _Layer:
    """A convolution or activation of the model: a module, or functional calls (fx nodes) that
    share a weight. `owner` is the module holding it (for functional calls, the weight's)."""

    name: str
    type: str
    owner: str
    sites: list[str] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    facts: ConvFacts | None = None
    trains: bool = True
    overrides: type | None = None
    kind: type[nn.Module] | None = None
    settings: LayerSettings = field(default_factory=LayerSettings)
    action: str = ""
    reasons: list[str] = field(default_factory=list)
    rule: str = ""
    build: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes: tuple[int, int] | None = None

    @property
    def functional(self) -> bool:
        return bool(self.nodes)

    def explain(self, reason: str) -> None:
        if reason and reason not in self.reasons:
            self.reasons.append(reason)


@dataclass
class _Conversion:
    """The decisions of one conversion, ready to apply to the model or a copy of it."""

    report: ConversionReport
    convs: list[_Layer]
    activations: list[_Layer]
    graph: fx.Graph | None
    reference: nn.Module

    def apply(self, target: nn.Module) -> nn.Module:
        replacements: dict[nn.Module, nn.Module] = {}
        for conv in self.convs:
            if conv.functional:
                continue
            module = target.get_submodule(conv.name)
            if conv.action == "patched":
                replacements[module] = xconv_class(type(module)).from_conv(module, **vars(conv.settings))
            elif isinstance(module, XConvMixin):
                replacements[module] = _retyped(module, torch_class(type(module)))
        for activation in self.activations:
            if activation.action == "switched" and not activation.functional:
                module = target.get_submodule(activation.name)
                if type(module) in BIT_ACTIVATIONS:
                    replacements[module] = bit_activation(module)
        target = _swap(target, replacements)
        if self.report.forward_rewritten:
            target = self._rewrite_forward(target)
        return target

    def _rewrite_forward(self, target: nn.Module) -> fx.GraphModule:
        graph = copy.deepcopy(self.graph)
        nodes = {node.name: node for node in graph.nodes}
        added: dict[str, nn.Module] = {}
        for conv in self.convs:
            if conv.action != "patched":
                continue
            for node in (nodes[original.name] for original in conv.nodes):
                arguments = {**_conv_arguments(node), "op": node.target.__name__, **vars(conv.settings)}
                node.target, node.args, node.kwargs = probed_conv, (), arguments
        for activation in self.activations:
            if activation.action != "switched":
                continue
            for node in (nodes[original.name] for original in activation.nodes):
                added[activation.name] = bit_activation(activation.kind(**activation.build[node.name]))
                node.op, node.target = "call_module", activation.name
                node.args, node.kwargs = (first_tensor_argument(node),), {}
        return _graph_module(target, graph, added, self.reference)


def _graph_module(
    target: nn.Module, graph: fx.Graph, added: dict[str, nn.Module], reference: nn.Module
) -> fx.GraphModule:
    """A GraphModule running `graph` with target's whole module tree, parameters and buffers.

    Attributes the tracer created (tensor constants) come from the reference copy.
    """

    def attribute(name: str) -> Any:
        if name in added:
            return added[name]
        owner = target if _has_attribute(target, name) else reference
        for part in name.split("."):
            owner = getattr(owner, part)
        return owner

    targets = {node.target: attribute(node.target) for node in graph.nodes if node.op in ("call_module", "get_attr")}
    module = fx.GraphModule(targets, graph, class_name=type(target).__name__)
    for name in [name for name, _ in module.named_children()]:
        delattr(module, name)
    for name in [name for name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]:
        delattr(module, name)
    persistent = set(target.state_dict(keep_vars=True))
    for name, child in (*target._modules.items(), *added.items()):
        module.add_module(name, child)
    for name, parameter in target.named_parameters(recurse=False):
        module.register_parameter(name, parameter)
    for name, buffer in target.named_buffers(recurse=False):
        module.register_buffer(name, buffer, persistent=name in persistent)
    for name, tensor in targets.items():
        if isinstance(tensor, torch.Tensor) and not _has_attribute(module, name):
            setattr(module, name, tensor)
    module.train(target.training)
    module._tracer_cls = _Tracer
    return module


def _has_attribute(module: nn.Module, name: str) -> bool:
    try:
        for part in name.split("."):
            module = getattr(module, part)
    except AttributeError:
        return False
    return True


def _free_attribute(module: nn.Module, name: str) -> str:
    while hasattr(module, name):
        name += "_"
    return name


def _swap(root: nn.Module, replacements: dict[nn.Module, nn.Module]) -> nn.Module:
    """Puts each replacement wherever the module it replaces sits in the tree (shared ones too)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):  # every name, also a second one for the same module
            if child in replacements:
                setattr(parent, name, replacements[child])
    return replacements.get(root, root)


def _retyped(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A copy of the module as another class (XConv -> torch, BitReLU -> ReLU): same Parameters."""
    twin = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, (dict, set, list)):
            setattr(twin, name, copy.copy(value))
    for name in _ESTIMATOR_ATTRIBUTES:
        vars(twin).pop(name, None)
    twin.__class__ = cls
    return twin


def _conv_arguments(node: fx.Node) -> dict[str, Any]:
    """A functional convolution's arguments by name."""
    _, transposed = CONV_FUNCTIONS[node.target]
    parameters = CONV_TRANSPOSE_PARAMETERS if transposed else CONV_PARAMETERS
    return {**dict(zip(parameters, node.args, strict=False)), **node.kwargs}


def _plan(
    model: nn.Module,
    probes: int | None,
    recipe: str | Path | Recipe | None,
    input_shape: Sequence[int] | None,
    example_inputs: Any,
    strict: bool,
    filter_fn: FilterFn | None,
) -> _Conversion:
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 0):
        raise ValueError(f"probes must be a non-negative integer (0 = exact), got {probes!r}")
    recipe = load_recipe("default" if recipe is None else recipe)
    reference = revert(meta_copy(model), inplace=True).train()
    try:
        graph, trace_error = _Tracer().trace(reference), None
    except Exception as error:  # any failure of symbolic tracing sends us down the module-swap path
        graph, trace_error = None, error
    convs, activations = _find_layers(reference, graph)
    warnings_ = _decide_convs(model, convs, recipe, probes, strict, filter_fn)
    keeping, analysis = _keeping(model, reference, graph, input_shape, example_inputs)
    for layer in (*convs, *activations):
        if graph is None:
            layer.sites = keeping.sites_of(layer.name)
        if not layer.sites and layer.facts is not None:
            layer.explain("not called by forward")
    if keeping.measured:
        _keep_exact_where_nothing_to_save(convs, keeping)
    _decide_activations(convs, activations, keeping)
    totals = _explain(convs, activations, keeping)
    rewritten = sum(len(layer.nodes) for layer in (*convs, *activations) if layer.action in ("patched", "switched"))
    if graph is None:
        path, path_reason = "module-swap", f"torch.fx could not trace {type(model).__name__} ({_one_line(trace_error)})"
        path_reason += "; every conv module swapped without a graph"
    elif rewritten:
        path, path_reason = "fx", f"traced with torch.fx; forward rewritten for {rewritten} functional calls"
        path_reason += ", so the result is a GraphModule"
    else:
        path, path_reason = "fx", "traced with torch.fx; modules swapped in the model's own tree, forward unchanged"
    report = ConversionReport(
        layers=[_layer_record(conv, keeping) for conv in convs],
        activations=[
            ActivationRecord(
                layer.name,
                layer.type,
                BIT_ACTIVATIONS[layer.kind].__name__ if layer.action == "switched" else None,
                "; ".join(layer.reasons),
                len(layer.sites),
            )
            for layer in activations
            if layer.reasons
        ],
        path=path,
        path_reason=path_reason,
        forward_rewritten=bool(rewritten),
        recipe=recipe.source,
        defaults=recipe.budget(probes),
        probes=probes,
        analysis=analysis,
        input_shape=_first_shape(input_shape, example_inputs),
        activation_bytes_before=totals[0],
        activation_bytes_after=totals[1],
        warnings=warnings_,
    )
    return _Conversion(report, convs, activations, graph, reference)


def _find_layers(reference: nn.Module, graph: fx.Graph | None) -> tuple[list[_Layer], list[_Layer]]:
    """Convolutions in the order forward first calls them (then uncalled modules), and activations."""
    modules = dict(reference.named_modules())
    parameters = dict(reference.named_parameters())
    convs: dict[str, _Layer] = {}
    activations: dict[str, _Layer] = {}
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module" and isinstance(modules[node.target], _ConvNd):
            convs.setdefault(node.target, _module_conv(node.target, modules[node.target])).sites.append(node.name)
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            weight = _conv_arguments(node).get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in parameters:
                name = weight.target.removesuffix(".weight")
                if name in modules and isinstance(modules[name], _ConvNd):
                    name = weight.target
                layer = convs.setdefault(name, _functional_conv(name, node, weight.target, parameters[weight.target]))
                layer.sites.append(node.name)
                layer.nodes.append(node)
        elif (activation := activation_call(node, modules)) is not None:
            kind, arguments = activation
            if node.op == "call_module":
                layer = activations.setdefault(node.target, _Layer(node.target, kind.__name__, node.target, kind=kind))
            else:
                function = getattr(node.target, "__name__", node.target)
                name = _free_attribute(reference, f"xconv_{node.name}")
                layer = activations[name] = _Layer(name, f"F.{function}", "", kind=kind)
                layer.nodes.append(node)
                layer.build[node.name] = arguments
            layer.sites.append(node.name)
    for name, module in modules.items():
        if isinstance(module, _ConvNd) and name not in convs:
            convs[name] = _module_conv(name, module)
        elif graph is None and (kind := torch_activation(module)) is not None:
            activations[name] = _Layer(name, kind.__name__, name, kind=kind)
    ordered = [conv for conv in convs.values() if conv.sites or graph is None]
    for conv in convs.values():
        conv.facts = replace(conv.facts, first=conv is ordered[0], last=conv is ordered[-1]) if ordered else conv.facts
    return list(convs.values()), list(activations.values())


def _module_conv(name: str, module: _ConvNd) -> _Layer:
    classes = tuple(cls.__name__ for cls in type(module).__mro__ if issubclass(cls, _ConvNd) and cls is not _ConvNd)
    facts = ConvFacts(
        name,
        classes,
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        tuple(module.stride),
        module.groups,
        module.transposed,
    )
    return _Layer(
        name,
        type(module).__name__,
        name,
        facts=facts,
        trains=module.weight.requires_grad,
        overrides=_forward_override(module),
    )


def _functional_conv(name: str, node: fx.Node, weight_name: str, weight: nn.Parameter) -> _Layer:
    arguments = _conv_arguments(node)
    rank, transposed = CONV_FUNCTIONS[node.target]
    groups = arguments.get("groups", 1) if isinstance(arguments.get("groups", 1), int) else 1
    stride = arguments.get("stride", 1)
    grouped = weight.shape[1] * groups
    channels = (weight.shape[0], grouped) if transposed else (grouped, weight.shape[0])
    torch_name = f"ConvTranspose{rank}d" if transposed else f"Conv{rank}d"
    facts = ConvFacts(
        name,
        (f"F.{node.target.__name__}", torch_name),
        *channels,
        tuple(weight.shape[2:]),
        _ntuple(rank)(stride) if isinstance(stride, (int, tuple, list)) else (1,) * rank,
        groups,
        transposed,
    )
    return _Layer(name, f"F.{node.target.__name__}", _parent(weight_name), facts=facts, trains=weight.requires_grad)


def _parent(qualified_name: str) -> str:
    return qualified_name.rpartition(".")[0]


def _forward_override(module: nn.Module) -> type | None:
    """The user's class that redefines forward, if any (timm's Conv2dSame, weight standardisation)."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return None if cls in XCONV_CLASSES else cls
    return None


def _decide_convs(
    model: nn.Module,
    convs: list[_Layer],
    recipe: Recipe,
    probes: int | None,
    strict: bool,
    filter_fn: FilterFn | None,
) -> list[str]:
    """Recipe settings and action for every conv; returns the warnings about unmatched rules."""
    for conv in convs:
        conv.settings, rules = recipe.settings_for(conv.facts, probes)
        conv.rule = ", ".join(rule.label for rule in rules) or "defaults"
        if conv.overrides is not None:
            conv.action = "skipped"
            conv.explain(f"{conv.overrides.__qualname__} overrides forward")
        elif filter_fn is not None and not filter_fn(model.get_submodule(conv.owner), conv.name):
            conv.action = "skipped"
            conv.explain("filter_fn returned False")
        else:
            conv.action = "patched" if conv.settings.probes else "exact"
            conv.explain(next((rule.why for rule in reversed(rules) if rule.why), ""))
    problems = []
    for rule in recipe.rules:
        selects_by_name_or_type = rule.rank >= PATTERN_RANK or "type" in rule.match
        if selects_by_name_or_type and not any(rule.matches(conv.facts) for conv in convs):
            problems.append(f"{recipe.source}: {rule.label} (match = {dict(rule.match)}) matches no convolution")
    if strict and problems:
        raise RecipeError(problems[0])
    for problem in problems:
        warnings.warn(problem, stacklevel=4)
    return problems


def _keeping(
    model: nn.Module,
    reference: nn.Module,
    graph: fx.Graph | None,
    input_shape: Sequence[int] | None,
    example_inputs: Any,
) -> tuple[Keeping, str]:
    """What the forward keeps: measured on meta tensors, else on real ones, else from structure."""
    names = {module: name for name, module in reference.named_modules()}
    if input_shape is None and example_inputs is None:
        return _structural(reference, graph, names), "no input to analyse: " + _structural_note(graph)
    inputs = _inputs(model, input_shape, example_inputs)
    try:
        meta_inputs = map_tensors(inputs, lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad))
        return _measure(reference, graph, meta_inputs, names), f"{_MEASURED} on meta tensors"
    except Exception as meta_error:  # an operation without a meta kernel, or tensors the model makes itself
        meta_failure = _one_line(meta_error)
    real = revert(copy.deepcopy(model), inplace=True).train()
    try:
        graph = _Tracer().trace(real) if graph is not None else None
        keeping = _measure(real, graph, inputs, {module: name for name, module in real.named_modules()})
        return keeping, f"{_MEASURED} on real tensors (meta tensors failed: {meta_failure})"
    except Exception as error:  # the model cannot run on this input: decide from structure alone
        note = f"could not run the model on the given input ({_one_line(error)}): " + _structural_note(graph)
        return _structural(reference, graph, names), note


def _measure(module: nn.Module, graph: fx.Graph | None, inputs: tuple[Any, ...], names: dict) -> Keeping:
    if graph is None:
        return measure_modules(module, inputs, names)
    return measure_graph(fx.GraphModule(module, graph), inputs)


def _structural(reference: nn.Module, graph: fx.Graph | None, names: dict[nn.Module, str]) -> Keeping:
    if graph is None:
        return sequential_keeping(reference, names, lambda module: isinstance(module, _ConvNd))
    return graph_keeping(graph, dict(reference.named_modules()))


def _structural_note(graph: fx.Graph | None) -> str:
    if graph is None:
        return "activations switched only where one directly precedes a conv in an nn.Sequential"
    return "decided from the graph, operations not known to keep nothing counted as keeping their inputs"


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    sentence = text.split(". ")[0]
    return f"{type(error).__name__}: {sentence}"[:200]


def _inputs(model: nn.Module, input_shape: Sequence[int] | None, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else torch.device("cpu")
    return (torch.zeros(tuple(input_shape), dtype=dtype, device=device),)


def _first_shape(input_shape: Sequence[int] | None, example_inputs: Any) -> tuple[int, ...] | None:
    if input_shape is not None:
        return tuple(input_shape)
    tensors: list[torch.Tensor] = []
    map_tensors(example_inputs, tensors.append)
    return tuple(tensors[0].shape) if tensors else None


def _keep_exact_where_nothing_to_save(convs: list[_Layer], keeping: Keeping) -> None:
    """A conv whose input has no more pixels than probes would keep a projection no smaller than it."""
    for conv in convs:
        shapes = [keeping.calls[site].input_shape for site in conv.sites if keeping.calls[site].input_shape]
        if conv.action == "patched" and shapes:
            pixels = min(math.prod(shape[2:]) for shape in shapes)
            if pixels <= conv.settings.probes:
                conv.action = "exact"
                conv.reasons = [f"its input has {pixels} pixels, not more than {conv.settings.probes} probes"]


def _decide_activations(convs: list[_Layer], activations: list[_Layer], keeping: Keeping) -> None:
    """Switch an activation producing a conv's input to 1-bit masks where that frees what it keeps:
    nothing but patched convs keeps it too."""
    patched = {site for conv in convs if conv.action == "patched" for site in conv.sites}
    conv_inputs = {keeping.calls[site].input for conv in convs for site in conv.sites}
    kept_by: dict[str, list[Any]] = {}
    for value, sites in keeping.keepers.items():
        for site in sites:
            kept_by.setdefault(site, []).append(value)
    for activation in activations:
        activation.action = "kept"
        for site in activation.sites:
            call = keeping.calls[site]
            if call.output is None or call.output not in conv_inputs:
                continue
            kept = kept_by.get(site, [])
            others = set().union(*(keeping.keepers[value] for value in kept)) - patched - {site}
            if not kept:
                activation.explain("keeps nothing for backward")
            elif others:
                verb = "is also kept" if keeping.measured else "may also be kept"
                activation.explain(f"what it keeps {verb} by {_labels(others, keeping)}")
            else:
                activation.action = "switched"
                activation.explain(f"{_SWITCHED} {_kept_description(kept, call)}")
        if activation.action == "switched":
            activation.reasons = [reason for reason in activation.reasons if reason.startswith(_SWITCHED)]


def _kept_description(kept: list[Any], call: Any) -> str:
    if call.output in kept:
        return "its output"
    return "its input" if call.input in kept else "its copy of its input"


def _explain(convs: list[_Layer], activations: list[_Layer], keeping: Keeping) -> tuple[int | None, int | None]:
    """Per-conv reasons and bytes (a shared input counts at its first reader); returns the totals."""
    calls, keepers = keeping.calls, keeping.keepers
    switched = {
        site: activation for activation in activations if activation.action == "switched" for site in activation.sites
    }
    patched = {site for conv in convs if conv.action == "patched" for site in conv.sites}
    released = patched | set(switched)
    first_reader: dict[Any, str] = {}
    conv_of = {site: conv for conv in convs for site in conv.sites}
    for site in calls:
        if site in conv_of:
            first_reader.setdefault(calls[site].input, site)
    masks, projections = {}, {}
    if keeping.measured:
        keeping_sites = set().union(*keepers.values())
        masks = {site: _mask_bytes(calls[site]) for site in switched if site in keeping_sites}
        projections = {
            site: _projection_bytes(calls[site], conv_of[site].settings.probes)
            for site in patched
            if conv_of[site].trains and site in keepers.get(calls[site].input, ())
        }
    for conv in convs:
        before = after = 0
        for site in conv.sites:
            value = calls[site].input
            remaining = keepers.get(value, set()) - released
            producers = [other for other in switched if calls[other].output == value]
            if first_reader[value] == site and value in keepers:
                before += keeping.nbytes.get(value, 0)
                after += keeping.nbytes.get(value, 0) if remaining else 0
                after += sum(masks.get(producer, 0) for producer in producers)
            after += projections.get(site, 0)
            if conv.action != "patched":
                continue
            if first_reader[value] != site:
                conv.explain(f"input shared with '{conv_of[first_reader[value]].name}', counted there")
            elif value not in keepers:
                conv.explain("its input is not kept for backward" if keeping.measured else "")
            elif remaining:
                verb = "still kept" if keeping.measured else "may still be kept"
                conv.explain(f"input {verb} by {_labels(remaining, keeping)}")
            else:
                freed = "input freed" if keeping.measured else "input no longer kept"
                if producers:
                    freed += f" ({switched[producers[0]].name} now keeps a 1-bit mask)"
                if value in keeping.network_inputs:
                    freed += "; it is the model's input, which the caller holds anyway"
                conv.explain(freed)
        if keeping.measured:
            conv.bytes = (before, after)
    if not keeping.measured:
        return None, None
    total_after = sum(keeping.nbytes[value] for value, sites in keepers.items() if sites - released)
    total_after += sum(masks.values()) + sum(projections.values())
    return keeping.total_bytes, total_after


def _projection_bytes(call: Any, probes: int) -> int:
    batch, channels = call.input_shape[:2]
    return kept_bytes(batch, channels, probes, call.input_itemsize)


def _mask_bytes(call: Any) -> int:
    return math.ceil(math.prod(call.output_shape) / 8)


def _labels(sites: set[str], keeping: Keeping) -> str:
    labels = sorted({keeping.labels.get(site, site) for site in sites})
    return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


def _names(sites: list[str], conv_of: dict[str, _Layer]) -> str:
    return ", ".join(dict.fromkeys(f"'{conv_of[site].name}'" for site in sites))


def _layer_record(conv: _Layer, keeping: Keeping) -> LayerRecord:
    first_call = keeping.calls.get(conv.sites[0]) if conv.sites else None
    before, after = conv.bytes or (None, None)
    return LayerRecord(
        name=conv.name,
        type=conv.type,
        action=conv.action,
        reason="; ".join(conv.reasons),
        probes=conv.settings.probes,
        probe=conv.settings.probe,
        per_sample=conv.settings.per_sample,
        deflate=conv.settings.deflate,
        rule=conv.rule,
        calls=len(conv.sites),
        input_shape=first_call.input_shape if first_call else None,
        output_shape=first_call.output_shape if first_call else None,
        activation_bytes_before=before,
        activation_bytes_after=after,
    )
