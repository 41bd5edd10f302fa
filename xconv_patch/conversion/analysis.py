"""Step 1 of a conversion: the model's convolutions and activations, and what its forward keeps.

The analysis traces a meta copy of the model with torch.fx (module calls of every torch conv class
and subclass, functional convolutions whose weight is a model parameter, ReLU-like activations),
then measures what each call keeps for backward with one training-mode forward on meta tensors
(real ones where meta fails), or, without an input, decides it from the graph. Nothing of the
caller's model is changed and no memory the size of the input is allocated.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _ntuple

from ..layers import XCONV_CLASSES
from .apply import revert
from .functional import ConvTracer, conv_arguments
from .recipe import ConvFacts
from .saved_tensors import (
    CONV_FUNCTIONS,
    Keeping,
    activation_call,
    graph_keeping,
    map_tensors,
    measure_graph,
    measure_modules,
    sequential_keeping,
    torch_activation,
)

MEASURED = "measured: saved tensors of a training-mode forward"


@dataclass(frozen=True)
class ConvLayer:
    """A convolution: a module (possibly called at several sites) or the functional calls sharing
    one weight. `owner` is the module holding it (for functional calls, the weight's module);
    `nodes` are the fx nodes of functional calls, which only a rewritten forward can patch."""

    name: str
    type: str
    owner: str
    facts: ConvFacts
    trains: bool
    overrides: type | None = None
    sites: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    @property
    def functional(self) -> bool:
        return bool(self.nodes)


@dataclass(frozen=True)
class ActivationLayer:
    """A ReLU-like activation: a module, or one functional call (`nodes`, with the arguments that
    build the equivalent module in `build`)."""

    name: str
    type: str
    kind: type[nn.Module]
    sites: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def functional(self) -> bool:
        return bool(self.nodes)


@dataclass(frozen=True)
class Analysis:
    """The model's layers and what its forward keeps; `reference` is the traced meta copy."""

    model_type: type[nn.Module]
    reference: nn.Module
    graph: fx.Graph | None
    trace_error: str | None
    convs: tuple[ConvLayer, ...]
    activations: tuple[ActivationLayer, ...]
    keeping: Keeping
    note: str
    input_shape: tuple[int, ...] | None


def analyse(model: nn.Module, input_shape: Sequence[int] | None = None, example_inputs: Any = None) -> Analysis:
    """The analysis of `model` for one input (or none); see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = _checked_shape(input_shape)
    reference = revert(meta_copy(model), inplace=True).train()
    try:
        graph, trace_error = ConvTracer().trace(reference), None
    except Exception as error:  # any failure of symbolic tracing sends us down the module-swap path
        graph, trace_error = None, one_line(error)
    try:
        keeping, note = _keeping(model, reference, graph, shape, example_inputs)
    except ValueError as error:
        if graph is None:
            raise
        # The graph fx traced need not be the forward: control flow on values a Proxy hides (MONAI's
        # torch.jit.isinstance checks) can drop a branch. Where the model itself runs, swap modules.
        try:
            keeping, note = _keeping(model, reference, None, shape, example_inputs)
        except ValueError:
            raise error from error.__cause__
        graph, trace_error = None, f"its traced graph does not run on the input ({one_line(error.__cause__)})"
    convs, activations = _find_layers(reference, graph)
    if graph is None:
        convs = [replace(conv, sites=tuple(keeping.sites_of(conv.name))) for conv in convs]
        activations = [replace(layer, sites=tuple(keeping.sites_of(layer.name))) for layer in activations]
    return Analysis(
        model_type=type(model),
        reference=reference,
        graph=graph,
        trace_error=trace_error,
        convs=tuple(convs),
        activations=tuple(activations),
        keeping=keeping,
        note=note,
        input_shape=shape if shape is not None else _first_shape(example_inputs),
    )


def _checked_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a sequence of positive integers, got {input_shape!r}")
    if not input_shape or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0 for size in input_shape
    ):
        raise ValueError(f"input_shape must be a sequence of positive integers, got {tuple(input_shape)!r}")
    return tuple(int(size) for size in input_shape)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device: no memory, no compute."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(parameter.detach().to("meta"), parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to("meta")
    return copy.deepcopy(model, memo)


def free_attribute(module: nn.Module, name: str) -> str:
    """`name`, with underscores appended until the module has no such attribute."""
    while hasattr(module, name):
        name += "_"
    return name


def _find_layers(reference: nn.Module, graph: fx.Graph | None) -> tuple[list[ConvLayer], list[ActivationLayer]]:
    """Convolutions in the order forward first calls them (then uncalled modules), and activations."""
    modules = dict(reference.named_modules())
    parameters = dict(reference.named_parameters())
    convs: dict[str, ConvLayer] = {}
    activations: dict[str, ActivationLayer] = {}

    def add_site(layers: dict[str, Any], name: str, layer: Any, node: fx.Node, functional: bool) -> None:
        layer = layers.get(name, layer)
        nodes = (*layer.nodes, node.name) if functional else layer.nodes
        layers[name] = replace(layer, sites=(*layer.sites, node.name), nodes=nodes)

    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module" and isinstance(modules[node.target], _ConvNd):
            add_site(convs, node.target, _module_conv(node.target, modules[node.target]), node, False)
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            weight = conv_arguments(node).get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in parameters:
                name = weight.target.removesuffix(".weight")
                if name in modules and isinstance(modules[name], _ConvNd):
                    name = weight.target
                conv = _functional_conv(name, node, weight.target, parameters[weight.target])
                add_site(convs, name, conv, node, True)
        elif (activation := activation_call(node, modules)) is not None:
            kind, arguments = activation
            if node.op == "call_module":
                add_site(activations, node.target, ActivationLayer(node.target, kind.__name__, kind), node, False)
            else:
                function = getattr(node.target, "__name__", node.target)
                name = free_attribute(reference, f"xconv_{node.name}")
                layer = ActivationLayer(name, f"F.{function}", kind, build=arguments)
                add_site(activations, name, layer, node, True)
    for name, module in modules.items():
        if isinstance(module, _ConvNd) and name not in convs:
            convs[name] = _module_conv(name, module)
        elif graph is None and (kind := torch_activation(module)) is not None:
            activations[name] = ActivationLayer(name, kind.__name__, kind)
    return _mark_first_and_last(list(convs.values()), graph is None), list(activations.values())


def _mark_first_and_last(convs: list[ConvLayer], untraced: bool) -> list[ConvLayer]:
    called = [conv for conv in convs if conv.sites or untraced]
    if not called:
        return convs
    first, last = called[0].name, called[-1].name
    return [
        replace(conv, facts=replace(conv.facts, first=conv.name == first, last=conv.name == last)) for conv in convs
    ]


def _module_conv(name: str, module: _ConvNd) -> ConvLayer:
    classes = tuple(cls.__name__ for cls in type(module).__mro__ if issubclass(cls, _ConvNd) and cls is not _ConvNd)
    facts = ConvFacts(
        name, classes, module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
        module.groups, module.transposed,
    )
    trains, overrides = module.weight.requires_grad, _forward_override(module)
    return ConvLayer(name, type(module).__name__, name, facts, trains=trains, overrides=overrides)


def _functional_conv(name: str, node: fx.Node, weight_name: str, weight: nn.Parameter) -> ConvLayer:
    arguments = conv_arguments(node)
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
    owner = weight_name.rpartition(".")[0]
    return ConvLayer(name, f"F.{node.target.__name__}", owner, facts, trains=weight.requires_grad)


def _forward_override(module: nn.Module) -> type | None:
    """The user's class that redefines forward, if any (timm's Conv2dSame, weight standardisation)."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return None if cls in XCONV_CLASSES else cls
    return None


def _keeping(
    model: nn.Module,
    reference: nn.Module,
    graph: fx.Graph | None,
    input_shape: tuple[int, ...] | None,
    example_inputs: Any,
) -> tuple[Keeping, str]:
    """What the forward keeps: measured on meta tensors, else on real ones, else from structure.

    An input the model cannot run on is the caller's error (ValueError naming the argument).
    """
    names = {module: name for name, module in reference.named_modules()}
    if input_shape is None and example_inputs is None:
        return _structural(reference, graph, names), "no input to analyse: " + _structural_note(graph)
    dtype, device = _parameter_dtype_and_device(model)
    if example_inputs is not None:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        meta_inputs = map_tensors(inputs, lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad))
    else:
        inputs = None
        meta_inputs = (torch.empty(input_shape, dtype=dtype, device="meta"),)
    try:
        return _measure(reference, graph, meta_inputs, names), f"{MEASURED} on meta tensors"
    except Exception as meta_error:  # an operation without a meta kernel, or tensors the model makes itself
        meta_failure = one_line(meta_error)
    real = revert(copy.deepcopy(model), inplace=True).train()
    try:
        if inputs is None:
            inputs = (torch.zeros(input_shape, dtype=dtype, device=device),)
        graph = ConvTracer().trace(real) if graph is not None else None
        keeping = _measure(real, graph, inputs, {module: name for name, module in real.named_modules()})
        return keeping, f"{MEASURED} on real tensors (meta tensors failed: {meta_failure})"
    except Exception as error:
        argument = f"input_shape {input_shape}" if example_inputs is None else "example_inputs"
        raise ValueError(f"{argument}: {type(model).__name__} cannot run on this input ({one_line(error)})") from error


def _parameter_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if reference is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return reference.dtype, reference.device


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


def one_line(error: BaseException) -> str:
    """The error's type and the first sentence of its message, at most 200 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    sentence = text.split(". ")[0]
    return f"{type(error).__name__}: {sentence}"[:200]


def _first_shape(example_inputs: Any) -> tuple[int, ...] | None:
    tensors: list[torch.Tensor] = []
    map_tensors(example_inputs, tensors.append)
    return tuple(tensors[0].shape) if tensors else None
