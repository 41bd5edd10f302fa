"""Step 3 of a conversion: carry a plan out on a model, and undo it (revert).

Modules are swapped in the model's own tree (one helper puts a replacement wherever the module
sits, under every name), so the model keeps its class, Parameters and state_dict keys. Only a plan
made with rewrite_forward=True that patches functional calls rewrites the forward, as a torch.fx
GraphModule.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import recompute
from ..activations import BIT_ACTIVATIONS, bit_activation
from ..checkpointing import checkpoint_blocks, uncheckpoint_blocks
from ..layers import XConvMixin, torch_class, xconv_class
from ..retype import retyped
from .functional import ConvTracer, conv_arguments, probed_conv
from .saved_tensors import CONV_TRANSPOSE_PARAMETERS, first_tensor_argument

if TYPE_CHECKING:
    from .planner import Plan

_ESTIMATOR_ATTRIBUTES = ("probe_spec", "probes", "probe", "per_sample", "deflate")


def apply(plan: Plan, target: nn.Module) -> nn.Module:
    """`target` (the model or a copy sharing its tensors) with the plan's swaps made."""
    replacements: dict[nn.Module, nn.Module] = {}
    kept: list[str] = []  # convs that keep their input although recomputation is on
    for decision in plan.convs:
        if decision.layer.functional:
            continue
        module = target.get_submodule(decision.layer.name)
        if plan.recomputes and not decision.recompute and decision.action != "patched":
            kept.append(decision.layer.name)
        if decision.action == "patched":
            replacements[module] = xconv_class(type(module)).from_conv(module, **vars(decision.settings))
        elif isinstance(module, XConvMixin):
            replacements[module] = retyped(module, torch_class(type(module)), drop=_ESTIMATOR_ATTRIBUTES)
    for decision in plan.activations:
        if decision.switched and not decision.layer.functional:
            module = target.get_submodule(decision.layer.name)
            if type(module) in BIT_ACTIVATIONS:
                replacements[module] = bit_activation(module)
    target = swap_modules(target, replacements)
    if plan.rewritten_calls:
        target = _rewrite_forward(plan, target)
    recompute.disable(target)
    if plan.recomputes:
        recompute.enable(target)
        for name in kept:
            recompute.keep_saved(target.get_submodule(name))
        for norm in plan.norms:
            for name in norm.modules if norm.compressed else ():
                recompute.store_norm_input(target.get_submodule(name), norm.storage)
    if plan.checkpointed:
        checkpoint_blocks(target, list(plan.checkpointed))
    return target


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree holding the same Parameter and buffer objects."""
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


def swap_modules(root: nn.Module, replacements: dict[nn.Module, nn.Module]) -> nn.Module:
    """Puts each replacement wherever the module it replaces sits in the tree (shared ones too)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):  # every name, also a second one for the same module
            if child in replacements:
                setattr(parent, name, replacements[child])
    return replacements.get(root, root)


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with torch's own layers back (same Parameters): XConv -> torch conv (or the
    user's conv subclass), 1-bit activations -> nn.ReLU/ReLU6/Hardtanh/LeakyReLU, rewritten functional
    convolutions -> torch's functions, no recomputation in backward, no checkpointed blocks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy_sharing_tensors(model)
    recompute.disable(target)
    uncheckpoint_blocks(target)
    torch_activations = {bit: kind for kind, bit in BIT_ACTIVATIONS.items()}
    replacements = {}
    for module in target.modules():
        if isinstance(module, XConvMixin):
            replacements[module] = retyped(module, torch_class(type(module)), drop=_ESTIMATOR_ATTRIBUTES)
        elif type(module) in torch_activations:
            replacements[module] = retyped(module, torch_activations[type(module)])
    target = swap_modules(target, replacements)
    if isinstance(target, fx.GraphModule):
        for node in target.graph.nodes:
            if node.op == "call_function" and node.target is probed_conv:
                node.target = getattr(F, node.kwargs["op"])
                node.kwargs = {key: value for key, value in node.kwargs.items() if key in CONV_TRANSPOSE_PARAMETERS}
        target.recompile()
    vars(target).pop("xconv_report", None)
    return target


def _rewrite_forward(plan: Plan, target: nn.Module) -> fx.GraphModule:
    graph = copy.deepcopy(plan.analysis.graph)
    nodes = {node.name: node for node in graph.nodes}
    added: dict[str, nn.Module] = {}
    for decision in plan.convs:
        if decision.action != "patched":
            continue
        for node in (nodes[name] for name in decision.layer.nodes):
            arguments = {**conv_arguments(node), "op": node.target.__name__, **vars(decision.settings)}
            node.target, node.args, node.kwargs = probed_conv, (), arguments
    for decision in plan.activations:
        if not decision.switched:
            continue
        layer = decision.layer
        for node in (nodes[name] for name in layer.nodes):
            added[layer.name] = bit_activation(layer.kind(**layer.build))
            node.op, node.target = "call_module", layer.name
            node.args, node.kwargs = (first_tensor_argument(node),), {}
    return _graph_module(target, graph, added, plan.analysis.reference)


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
    module._tracer_cls = ConvTracer
    return module


def _has_attribute(module: nn.Module, name: str) -> bool:
    try:
        for part in name.split("."):
            module = getattr(module, part)
    except AttributeError:
        return False
    return True
