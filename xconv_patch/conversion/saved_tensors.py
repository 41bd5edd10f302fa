"""What a forward pass keeps for backward, and which call keeps it (DESIGN.md section 2).

A patched convolution frees its input only if no other call keeps it. The conversion decides from a
`Keeping`: for every call ("site": an fx node, or a module call when fx cannot trace), the value
it reads and the value it returns, and for every value the sites keeping it. Measured, values are
storages and keepers are what saved-tensor hooks see during a forward on meta tensors (or real
ones where meta fails); from the graph alone, values are alias classes of nodes and keepers come
from a table of what each operation keeps, unknown operations counting as keeping their inputs.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import BIT_ACTIVATIONS
from ..memory import SavedTensors, storage_key
from ..recompute import RecomputeTracker, recompute_saved

CONV_FUNCTIONS: dict[Callable, tuple[int, bool]] = {
    F.conv1d: (1, False),
    F.conv2d: (2, False),
    F.conv3d: (3, False),
    F.conv_transpose1d: (1, True),
    F.conv_transpose2d: (2, True),
    F.conv_transpose3d: (3, True),
}
"""Functional convolutions (torch.conv2d is F.conv2d) -> (spatial rank, transposed)."""

CONV_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_TRANSPOSE_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

ACTIVATION_FUNCTIONS: dict[Any, tuple[type[nn.Module], tuple[str, ...], bool]] = {
    F.relu: (nn.ReLU, ("inplace",), False),
    torch.relu: (nn.ReLU, (), False),
    torch.relu_: (nn.ReLU, (), True),
    "relu": (nn.ReLU, (), False),
    "relu_": (nn.ReLU, (), True),
    F.relu6: (nn.ReLU6, ("inplace",), False),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace"), False),
    F.hardtanh_: (nn.Hardtanh, ("min_val", "max_val"), True),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace"), False),
    F.leaky_relu_: (nn.LeakyReLU, ("negative_slope",), True),
}
"""Functional ReLU-like calls (functions, or Tensor method names) -> (module class, the module's
arguments in call order after the input, always in place)."""

KEEP_NOTHING_FUNCTIONS = {
    operator.add, operator.sub, operator.iadd, operator.getitem, getattr,
    torch.add, torch.sub, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.pad, F.interpolate,
}  # fmt: skip
KEEP_NOTHING_METHODS = {
    "add", "add_", "sub", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "size",
    "dim", "chunk", "split", "unsqueeze", "squeeze", "expand", "mean", "sum",
}  # fmt: skip
KEEP_NOTHING_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)  # fmt: skip
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, torch.chunk, torch.split}  # fmt: skip
_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "chunk", "split", "unsqueeze",
                 "squeeze", "expand"}  # fmt: skip
"""Operations that keep nothing of their tensor inputs for backward (each checked by a test) and
those whose output may share its input's storage."""


def keeps_nothing(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether the node's operation keeps none of its tensor inputs for backward."""
    if node.op == "call_module":
        return isinstance(module, KEEP_NOTHING_MODULES) and getattr(module, "mode", None) != "area"
    if node.op == "call_method":
        return node.target in KEEP_NOTHING_METHODS
    if node.op == "call_function" and node.target in KEEP_NOTHING_FUNCTIONS:
        if node.target is F.interpolate:
            return node.kwargs.get("mode") != "area"
        if node.target is F.pad:  # reflect and replicate padding keep their input
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            return mode in ("constant", "circular")
        return True
    return node.op in ("placeholder", "get_attr", "output")


def activation_keeps(kind: type[nn.Module], inplace: bool) -> str:
    """What a ReLU-like activation keeps for backward: ReLU its output ('output'); LeakyReLU its
    input, or in place its output; Hardtanh and ReLU6 their input ('input'), or in place a copy of
    it that nothing else keeps ('private')."""
    if kind is nn.ReLU or (kind is nn.LeakyReLU and inplace):
        return "output"
    if kind is nn.LeakyReLU:
        return "input"
    return "private" if inplace else "input"


def torch_activation(module: nn.Module) -> type[nn.Module] | None:
    """nn.ReLU, nn.ReLU6, nn.Hardtanh or nn.LeakyReLU for such a module or its 1-bit twin (not for
    subclasses)."""
    for kind, bit_kind in BIT_ACTIVATIONS.items():
        if type(module) in (kind, bit_kind):
            return kind
    return None


def activation_call(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[type[nn.Module], dict[str, Any]] | None:
    """For a ReLU-like call, the torch module class and the arguments that build the same module."""
    if node.op == "call_module":
        module = modules[node.target]
        kind = torch_activation(module)
        return None if kind is None else (kind, {"inplace": module.inplace})
    if node.op not in ("call_function", "call_method") or node.target not in ACTIVATION_FUNCTIONS:
        return None
    kind, parameters, inplace = ACTIVATION_FUNCTIONS[node.target]
    arguments = dict(zip(parameters, node.args[1:], strict=False))
    arguments.update((key, value) for key, value in node.kwargs.items() if key in parameters)
    if inplace:
        arguments["inplace"] = True
    return kind, arguments


def is_conv_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in CONV_FUNCTIONS


def first_tensor_argument(node: fx.Node) -> fx.Node | None:
    """The node's input: its first positional argument, or `input=`."""
    candidate = node.args[0] if node.args else node.kwargs.get("input")
    return candidate if isinstance(candidate, fx.Node) else None


def _kept_by(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What the node keeps for backward: 'input', 'output', 'private', 'nothing' or 'inputs' (all
    tensor arguments)."""
    if is_conv_node(node, modules):
        return "input"
    activation = activation_call(node, modules)
    if activation is not None:
        kind, arguments = activation
        return activation_keeps(kind, arguments.get("inplace", False))
    return "nothing" if keeps_nothing(node, modules.get(node.target)) else "inputs"


@dataclass
class Call:
    """One site: the value it reads (its first tensor argument) and the value it returns."""

    owner: str
    input: Hashable | None = None
    output: Hashable | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    input_itemsize: int = 0


@dataclass
class Keeping:
    """Sites, the values they read and return, and which sites keep which values for backward.

    Measured, it also says which of those saves xconv_patch.recompute can replace by a recipe
    (`recomputed`: value -> the sites whose save of it is recomputable), with the recipe's
    description and the value it is recomputed from (`anchors`: a norm's input, kept anyway;
    `sources`: all of them, one per branch of a residual sum). Recipes may keep small tensors that
    autograd does not save (a max pool's window offsets): `stored` has their bytes and `stored_for`
    the saves (value, site) whose recipes read them, which keep them only if they are recomputed.
    """

    measured: bool
    calls: dict[str, Call] = field(default_factory=dict)
    keepers: dict[Hashable, set[str]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    nbytes: dict[Hashable, int] = field(default_factory=dict)
    network_inputs: set[Hashable] = field(default_factory=set)
    recomputed: dict[Hashable, set[str]] = field(default_factory=dict)
    recipes: dict[Hashable, str] = field(default_factory=dict)
    anchors: dict[Hashable, Hashable] = field(default_factory=dict)
    sources: dict[Hashable, frozenset[Hashable]] = field(default_factory=dict)
    stored: dict[Hashable, int] = field(default_factory=dict)
    stored_for: dict[Hashable, set[tuple[Hashable, str]]] = field(default_factory=dict)

    def keep(self, value: Hashable, site: str) -> None:
        self.keepers.setdefault(value, set()).add(site)

    def sites_of(self, owner: str) -> list[str]:
        return [site for site, call in self.calls.items() if call.owner == owner]

    def kept_by(self, value: Hashable) -> set[str]:
        """The sites that keep the value itself, not a recipe for it."""
        return self.keepers.get(value, set()) - self.recomputed.get(value, set())

    def is_recomputed(self, value: Hashable, site: str) -> bool:
        return site in self.recomputed.get(value, ())

    @property
    def total_bytes(self) -> int | None:
        return sum(self.nbytes[value] for value in self.keepers) if self.measured else None


class _SiteSaves(SavedTensors):
    """SavedTensors that also notes, for each save, whether the recompute tracker has a recipe for it."""

    def __init__(self, model: nn.Module, keeping: Keeping) -> None:
        super().__init__(exclude=model)
        self.keeping = keeping
        self.tracker: RecomputeTracker | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        super()._pack(tensor)
        tracker = self.tracker
        recipe = None if tracker is None or isinstance(tensor, nn.Parameter) else tracker.recipe(tensor)
        if recipe is not None:
            key = storage_key(tensor)
            for stored in recipe.stored():
                self.keeping.stored[storage_key(stored)] = stored.untyped_storage().nbytes()
                self.keeping.stored_for.setdefault(storage_key(stored), set()).add((key, self.site))
            self.keeping.recomputed.setdefault(key, set()).add(self.site)
            self.keeping.recipes[key] = recipe.describe()
            self.keeping.sources[key] = frozenset(map(storage_key, recipe.anchors()))
            anchor = tracker.anchor(tensor)
            if anchor is not None:
                self.keeping.anchors[key] = storage_key(anchor)
        return tensor


class _Recorder:
    """Saved-tensor hooks that credit every saved storage to the site running at the time (and say
    which saves are recomputable), and the values each site reads and returns."""

    def __init__(self, model: nn.Module) -> None:
        self.keeping = Keeping(measured=True)
        self.saved = _SiteSaves(model, self.keeping)
        self.keeping.keepers, self.keeping.nbytes = self.saved.keepers, self.saved.nbytes
        self._alive: list[torch.Tensor] = []

    @property
    def site(self) -> str:
        return self.saved.site

    @site.setter
    def site(self, site: str) -> None:
        self.saved.site = site

    @contextmanager
    def recording(self) -> Iterator[None]:
        """A training-mode forward's saves, under a recompute tracker whose own hooks ours shadow."""
        with torch.enable_grad(), recompute_saved() as tracker, self.saved:
            self.saved.tracker = tracker
            yield

    def value(self, tensor: Any) -> Hashable | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        self._alive.append(tensor)  # storages stay alive, so their keys stay unique
        return storage_key(tensor)

    def record_call(self, call: Call, input: Any, output: Any) -> None:
        call.input, call.output = self.value(input), self.value(output)
        if isinstance(input, torch.Tensor):
            call.input_shape, call.input_itemsize = tuple(input.shape), input.element_size()
        if isinstance(output, torch.Tensor):
            call.output_shape = tuple(output.shape)

    def record_inputs(self, inputs: Any) -> None:
        for tensor in _tensors(inputs):
            self.keeping.network_inputs.add(self.value(tensor))


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


UNKNOWN = "<unknown>"


def map_tensors(tree: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The tree (tensors in nested lists, tuples and dicts) with `function` applied to each tensor."""
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(item, function) for item in tree)
    if isinstance(tree, dict):
        return {key: map_tensors(item, function) for key, item in tree.items()}
    return tree


def node_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}() '{node.name}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}() '{node.name}'"
    return f"{node.op} '{node.name}'"


def node_owner(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def measure_graph(module: fx.GraphModule, inputs: tuple[Any, ...]) -> Keeping:
    """Runs the graph node by node, crediting each saved tensor to the node that saved it."""
    recorder = _Recorder(module)
    modules = dict(module.named_modules())

    class Interpreter(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            recorder.site = node.name
            output = super().run_node(node)
            if node.op in ("call_module", "call_function", "call_method"):
                source = first_tensor_argument(node)
                call = recorder.keeping.calls[node.name] = Call(node_owner(node))
                recorder.record_call(call, self.env.get(source), output)
                recorder.keeping.labels[node.name] = node_label(node, modules)
            return output

    recorder.record_inputs(inputs)
    with recorder.recording():
        Interpreter(module, garbage_collect_values=False).run(*inputs)
    return recorder.keeping


def measure_modules(model: nn.Module, inputs: tuple[Any, ...], names: dict[nn.Module, str]) -> Keeping:
    """Runs the model with module hooks, crediting each saved tensor to the innermost module running.

    Leaf modules are sites ('name', then 'name#2' ... for further calls); what a module's own
    forward code saves is credited to 'name.forward'.
    """
    recorder = _Recorder(model)
    keeping = recorder.keeping
    stack: list[str] = []
    counts: dict[str, int] = {}
    inputs_of: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[module]
        if next(module.children(), None) is None:
            counts[name] = counts.get(name, 0) + 1
            site = name if counts[name] == 1 else f"{name}#{counts[name]}"
            keeping.calls[site] = Call(name)
            inputs_of[site] = args[0] if args else None
            keeping.labels[site] = f"{type(module).__name__} '{name}'"
        else:
            site = f"{name}.forward" if name else "<forward>"
            keeping.labels[site] = f"the code of {type(module).__name__}.forward ('{name or 'model'}')"
        stack.append(site)
        recorder.site = site

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        site = stack.pop()
        if site in inputs_of:
            recorder.record_call(keeping.calls[site], inputs_of.pop(site), output)
        recorder.site = stack[-1] if stack else "<forward>"

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        recorder.record_inputs(inputs)
        with recorder.recording():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return keeping


def graph_keeping(graph: fx.Graph, modules: dict[str, nn.Module]) -> Keeping:
    """Keeping from the graph alone, by what each operation is known to keep."""
    keeping = Keeping(measured=False)
    value: dict[fx.Node, Hashable] = {}
    for node in graph.nodes:
        source = first_tensor_argument(node)
        value[node] = value[source] if source is not None and _aliases(node, modules) else node.name
        if node.op == "placeholder":
            keeping.network_inputs.add(value[node])
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        keeping.calls[node.name] = Call(node_owner(node), value.get(source), value[node])
        keeping.labels[node.name] = node_label(node, modules)
        kept = _kept_by(node, modules)
        if kept == "output":
            keeping.keep(value[node], node.name)
        elif kept == "input" and source is not None:
            keeping.keep(value[source], node.name)
        elif kept == "private":
            keeping.keep(("private", node.name), node.name)
        elif kept == "inputs":
            for argument in node.all_input_nodes:
                keeping.keep(value[argument], node.name)
    return keeping


def _aliases(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node's output may share its input's storage (views and in-place operations)."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (
        node.kwargs.get("inplace", False) is True
        or name.endswith("_")
        or node.target in _VIEW_METHODS
        or node.target in _VIEW_FUNCTIONS
        or node.target is operator.iadd
    )


def sequential_keeping(model: nn.Module, names: dict[nn.Module, str], is_conv: Callable[[nn.Module], bool]) -> Keeping:
    """Keeping without a graph: inside nn.Sequential chains (nested ones flattened), a module's
    output goes to the next module only; elsewhere who keeps a conv's input is unknown, and so is
    who else keeps an activation's input."""
    keeping = Keeping(measured=False)
    for module, name in names.items():
        if is_conv(module):
            keeping.calls[name] = Call(name, input=("input of", name))
        elif torch_activation(module) is not None:
            keeping.calls[name] = Call(name, output=("output of", name))
        keeping.labels[name] = f"{type(module).__name__} '{name}'"
    for chain in _sequential_chains(model):
        for producer, consumer in itertools.pairwise(chain):
            if torch_activation(producer) is not None and is_conv(consumer):
                activation, conv = names[producer], names[consumer]
                value = keeping.calls[activation].output
                keeping.calls[conv].input = value
                keeping.keep(value, conv)
                kept = activation_keeps(torch_activation(producer), producer.inplace)
                if kept == "output":
                    keeping.keep(value, activation)
                elif kept == "private":
                    keeping.keep(("private", activation), activation)
                else:
                    keeping.keep(("input of", activation), activation)
                    keeping.keep(("input of", activation), UNKNOWN)
    keeping.labels[UNKNOWN] = "code convert could not trace"
    return keeping


def _sequential_chains(model: nn.Module) -> list[list[nn.Module]]:
    """The modules of every nn.Sequential (or subclass keeping its forward) in call order."""

    def chains(module: nn.Module) -> bool:
        return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward

    def leaves(sequential: nn.Sequential) -> list[nn.Module]:
        chain = []
        for child in sequential:
            chain += leaves(child) if chains(child) else [child]
        return chain

    return [leaves(module) for module in model.modules() if chains(module)]
