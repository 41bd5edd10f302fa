"""Recipes: what autograd stores instead of a recomputable tensor, and how backward replays it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xconv_patch.recompute.compressed import Compressed
from xconv_patch.recompute.ops import NORM_REPLAYS


class Kept:
    """A tensor a recipe holds on to: a norm's input (anchor), a small tensor or a parameter."""

    __slots__ = ("is_anchor", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, is_anchor: bool) -> None:
        self.tensor = tensor
        self.version = tensor._version
        self.is_anchor = is_anchor

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a tensor of shape {list(self.tensor.shape)} that a recompute recipe reads is at "
                f"version {self.tensor._version}; expected version {self.version} instead."
            )
        return self.tensor


class CompressedAnchor:
    """A norm's input kept compressed (`storing_norm_inputs`): the norm's backward and the recipes
    replayed from it read it decompressed."""

    __slots__ = ("compressed",)
    is_anchor = True

    def __init__(self, tensor: torch.Tensor, kind: str) -> None:
        self.compressed = Compressed(tensor, kind)

    @property
    def tensor(self) -> torch.Tensor | None:
        """The input itself while the forward still holds it."""
        return self.compressed.source()

    def get(self) -> torch.Tensor:
        return self.compressed.decompress()


class Stored:
    """A tensor a recipe needs that autograd does not save (a max pool's window offsets): stored by
    `store`, the saved-tensor hooks around the tracker, as autograd's saves are, so that offloading
    and measurements see it; `load` reads it back."""

    __slots__ = ("handle", "load")
    is_anchor = False
    tensor = None

    def __init__(self, tensor: torch.Tensor, store: Callable[[torch.Tensor], Any],
                 load: Callable[[Any], torch.Tensor] | None) -> None:
        self.handle = store(tensor)
        self.load = load

    def get(self) -> torch.Tensor:
        return self.handle if self.load is None else self.load(self.handle)


class PendingSave:
    """A tensor saved inside a `storing_norm_inputs` scope. Autograd saves an op's inputs before the op
    runs, so whether it is a norm's input is known only then (`settle`): it becomes that input's
    compressed payload, or stays the tensor; either way, as `store` (the saved-tensor hooks around
    the tracker) stores it, and `load` reads it back."""

    __slots__ = ("anchor", "handles", "load", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor
        self.anchor: CompressedAnchor | None = None
        self.handles: tuple = ()
        self.load: Callable[[Any], torch.Tensor] | None = None

    def settle(self, anchor: CompressedAnchor | None, store: Callable[[torch.Tensor], Any],
               load: Callable[[Any], torch.Tensor] | None) -> None:
        tensors = (self.tensor,) if anchor is None else anchor.compressed.payload
        self.handles = tuple(map(store, tensors))
        self.anchor, self.load, self.tensor = anchor, load, None

    def unpack(self) -> torch.Tensor:
        if self.tensor is not None:  # never settled: kept as it is
            return self.tensor
        payload = self.handles if self.load is None else tuple(map(self.load, self.handles))
        return payload[0] if self.anchor is None else self.anchor.compressed.decompress(payload)


Ref = Kept | CompressedAnchor | Stored
"""What a recipe reads besides other recipes."""


class Recipe:
    """How to recompute one tensor: an aten op, its arguments (tensors as references) and the output index.

    While saved handles that have not been unpacked yet refer to it, a recipe keeps the value it last
    computed, so the tensors of one chain are computed once per backward (e.g. a SiLU's input, needed
    by the SiLU's backward, is computed on the way to the next convolution's input).
    """

    __slots__ = ("_value", "args", "depth", "func", "index", "kwargs", "name", "pending", "source")

    def __init__(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, index: int | None, name: str) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.index = index
        self.name = name
        self.pending = 0
        self._value: torch.Tensor | None = None
        self.depth = 1 + max((r.depth for r in self.refs() if isinstance(r, Recipe)), default=0)
        self.source = next(filter(None, map(_source, self.refs())), None)
        """The norm input (kept or compressed) the chain's first branch starts from."""

    def refs(self) -> list[Recipe | Ref]:
        """The recipes and kept tensors among the arguments, in order."""
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, Recipe | Ref)]

    def describe(self) -> str:
        """The chain as a call expression: `x` is an anchor (a norm's input), `s` a small kept tensor.

        Parameters, a norm's statistics and affine map, and a max pool's indices are left out:
        "silu(batch_norm(x))".
        """
        refs = self.refs()[:1] if self.func in NORM_REPLAYS else self.refs()
        parts = [r.describe() if isinstance(r, Recipe) else ("x" if r.is_anchor else "s") for r in refs if _shown(r)]
        return f"{self.name}({', '.join(parts)})"

    def anchors(self) -> list[torch.Tensor]:
        """Every anchor the chain starts from (a residual sum's chain has one per branch)."""
        found = []
        for ref in self.refs():
            if isinstance(ref, Recipe):
                found += ref.anchors()
            elif ref.is_anchor and ref.tensor is not None:
                found.append(ref.tensor)
        return found

    def stored(self) -> list[torch.Tensor]:
        """The tensors the chain keeps that autograd does not save (a max pool's window offsets)."""
        found = []
        for ref in self.refs():
            if isinstance(ref, Recipe):
                found += ref.stored()
            elif isinstance(ref, Stored):
                found.append(ref.get())
        return found

    def anchor(self) -> torch.Tensor | None:
        """The first anchor the chain starts from: the input of a norm, kept by the norm's backward."""
        return None if self.source is None else self.source.tensor

    def compute(self, counters: Counters | None = None, cache: bool = False) -> torch.Tensor:
        """Replay the chain (no autograd, no autocast: the recorded ops already carry their dtypes).

        With `cache`, recipes that handles still wait for keep what they computed.
        """
        with torch.no_grad(), torch._C._DisableAutocast():
            return self._evaluate(counters, cache)

    def _evaluate(self, counters: Counters | None, cache: bool) -> torch.Tensor:
        if self._value is not None:
            return self._value
        # The deepest chain first: it leaves one tensor live, while an argument resolved before it
        # (a norm's replayed output, say) would stay live through all of its work.
        order = sorted(range(len(self.args)), key=lambda i: -_depth(self.args[i]))
        resolved = {i: _resolve(self.args[i], counters, cache) for i in order}
        args = tuple(resolved[i] for i in range(len(self.args)))
        kwargs = {k: _resolve(v, counters, cache) for k, v in self.kwargs.items()}
        out = self.func(*args, **kwargs)
        if self.index is not None:
            out = out[self.index]
        if counters is not None:
            counters.recomputed += 1
        if cache and self.pending > 0:
            self._value = out
        return out


def _shown(ref: Recipe | Ref) -> bool:
    """Whether `describe` names `ref`: not a parameter, nor a chain read from no norm input (indices)."""
    if isinstance(ref, Recipe):
        return ref.source is not None
    return ref.is_anchor or not isinstance(ref.tensor, nn.Parameter)


def _source(ref: Recipe | Ref) -> Kept | CompressedAnchor | None:
    if isinstance(ref, Recipe):
        return ref.source
    return ref if ref.is_anchor else None


def _depth(value: Any) -> int:
    return value.depth if isinstance(value, Recipe) else 0


def _resolve(value: Any, counters: Counters | None, cache: bool) -> Any:
    if isinstance(value, Recipe):
        return value._evaluate(counters, cache)
    if isinstance(value, Ref):
        return value.get()
    return value


class Counters:
    """What one tracker did: recipes recorded, saved tensors stored as recipes, ops replayed."""

    __slots__ = ("packed", "recipes", "recomputed")

    def __init__(self) -> None:
        self.recipes = 0
        self.packed = 0
        self.recomputed = 0


class Packed:
    """What autograd stores in place of a recomputable tensor."""

    __slots__ = ("counters", "recipe", "unpacked")

    def __init__(self, recipe: Recipe, counters: Counters) -> None:
        recipe.pending += 1
        self.recipe = recipe
        self.counters = counters
        self.unpacked = False

    def unpack(self) -> torch.Tensor:
        recipe = self.recipe
        value = recipe.compute(self.counters, cache=True)
        if not self.unpacked:
            self.unpacked = True
            recipe.pending -= 1
            if recipe.pending <= 0:
                _release(recipe)
        return value

    def __del__(self) -> None:
        if not self.unpacked:
            self.recipe.pending -= 1
            if self.recipe.pending <= 0:
                _release(self.recipe)


def _release(recipe: Recipe) -> None:
    """Drop the cached values of a chain whose recipes no handle still waits for."""
    recipe._value = None
    for ref in recipe.refs():
        if isinstance(ref, Recipe) and ref.pending <= 0 and ref._value is not None:
            _release(ref)


def unpack(saved: Any) -> torch.Tensor:
    """The saved-tensors unpack hook: replays a recipe, decompresses a norm input, passes a kept tensor through."""
    return saved.unpack() if type(saved) is Packed or type(saved) is PendingSave else saved
