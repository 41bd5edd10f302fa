"""The tracker: a dispatch mode that records recipes and a pack hook that stores them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily

from xconv_patch.recompute.compressed import check_norm_storage
from xconv_patch.recompute.ops import (
    BATCH_NORM_EPS,
    COPIES,
    ELEMENTWISE,
    MAX_POOLS,
    NORMS,
    POOLS,
    VIEWS,
    MaxPoolWindows,
    batch_norm_from_statistics,
    mutates,
    out_of_place,
    short_name,
)
from xconv_patch.recompute.recipes import (
    CompressedAnchor,
    Counters,
    Kept,
    Packed,
    PendingSave,
    Recipe,
    Stored,
    unpack,
)

SMALL_FRACTION = 8
"""A tensor argument is small, and kept by the recipe, when it has at most 1/8 the output's elements."""

MAX_DEPTH = 64
"""Default longest chain of recipes replayed for one tensor (residual adds can chain a whole stage)."""

_thread = threading.local()


def _stack(name: str) -> list:
    """This thread's stack called `name`."""
    return vars(_thread).setdefault(name, [])


def _active() -> list[RecomputeTracker]:
    return _stack("trackers")


def recompute_active() -> bool:
    """Whether a `RecomputeTracker` is recording on this thread."""
    return bool(_active())


@contextmanager
def untracked() -> Iterator[None]:
    """Ops inside it skip this thread's tracker (when it is the innermost dispatch mode): for work
    whose results are kept as they are, such as a mask packed for backward, which would otherwise
    pay the mode's Python cost per op and record recipes nothing uses."""
    trackers = _active()
    if trackers and _get_current_dispatch_mode() is trackers[-1]:
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _keeping_depth() -> int:
    return getattr(_thread, "keeping", 0)


class keeping_saved:
    """Context manager: tensors autograd saves inside it are kept as they are, even recomputable
    ones (a module that must keep its input, see `keep_saved`); recipes are still recorded."""

    def __enter__(self) -> None:
        _thread.keeping = _keeping_depth() + 1

    def __exit__(self, *exc: object) -> None:
        _thread.keeping = _keeping_depth() - 1


def _norm_storage() -> str:
    stack = _stack("norm_storage")
    return stack[-1] if stack else "exact"


class storing_norm_inputs:
    """Context manager: the inputs norms keep for backward inside it are stored as `kind` (one of
    NORM_STORAGES: "exact", "bfloat16", "int8"), compressed with stochastic rounding, while a
    tracker is active. Gradients then stop being exact but stay unbiased. Reentrant and reusable."""

    def __init__(self, kind: str) -> None:
        self.kind = check_norm_storage(kind)

    def __enter__(self) -> None:
        _stack("norm_storage").append(self.kind)

    def __exit__(self, *exc: object) -> None:
        _stack("norm_storage").pop()


def _trackable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_nested


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _same_place(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether `a` and `b` are the same elements of the same storage."""
    return b is not None and a.untyped_storage()._cdata == b.untyped_storage()._cdata and _geometry(a) == _geometry(b)


def _geometry(tensor: torch.Tensor) -> tuple:
    return (tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)


class _Slot:
    """The recipes and anchors recorded on one storage; the weak reference keeps its address unique."""

    __slots__ = ("items", "storage")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage = StorageWeakRef(storage)
        self.items: dict[tuple, tuple[int, Recipe | Kept | CompressedAnchor]] = {}


class RecomputeTracker(TorchDispatchMode):
    """Context manager: while active, saved tensors that have a recipe are recomputed in backward.

    Usable once. Inert when entered with grad disabled or under torch.compile. Ops run with grad
    disabled inside it (as in a custom autograd Function's forward, such as BitReLU's) are recorded
    too, but a norm anchors recipes only when autograd records it (and so keeps its input).
    `describe`, `anchor`, `is_recomputable` and `recompute`
    answer for tensors of the forward while the tracker is active (also on meta tensors).
    """

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        super().__init__()
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1 (one op after a norm), got {max_depth}")
        self.max_depth = max_depth
        self._slots: dict[int, _Slot] = {}
        self._counters = Counters()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None = None
        self._used = False
        self._pending: list[PendingSave] = []
        self._storing = 0

    # -- statistics ---------------------------------------------------------------------------
    @property
    def recipes(self) -> int:
        """How many op outputs got a recipe."""
        return self._counters.recipes

    @property
    def packed(self) -> int:
        """How many saved tensors autograd stored as recipes instead of tensors."""
        return self._counters.packed

    @property
    def recomputed(self) -> int:
        """How many recipe steps (aten ops) backward replayed so far."""
        return self._counters.recomputed

    # -- analysis -----------------------------------------------------------------------------
    def recipe(self, tensor: torch.Tensor) -> Recipe | None:
        """The recipe for `tensor` as it is now, or None when it is not recomputable."""
        found = self._find(tensor)
        return found if isinstance(found, Recipe) else None

    def is_recomputable(self, tensor: torch.Tensor) -> bool:
        """Whether autograd would store `tensor` as a recipe if it saved it now."""
        return self.recipe(tensor) is not None

    def describe(self, tensor: torch.Tensor) -> str | None:
        """`tensor`'s recipe chain, e.g. "silu(batch_norm(x))", or None when it is not recomputable."""
        recipe = self.recipe(tensor)
        return recipe.describe() if recipe is not None else None

    def anchor(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The norm input `tensor` is recomputed from (it shares storage with the norm module's input)."""
        recipe = self.recipe(tensor)
        return recipe.anchor() if recipe is not None else None

    def recompute(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` recomputed from its recipe, as backward would get it; ValueError if it has none."""
        recipe = self.recipe(tensor)
        if recipe is None:
            raise ValueError("the tensor has no recipe: it is not recomputable (check is_recomputable first)")
        return recipe.compute()

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> RecomputeTracker:
        if self._used:
            raise RuntimeError("a RecomputeTracker is single use: create a new one with recompute_saved()")
        self._used = True
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
            super().__enter__()
            _active().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            _active().remove(self)
            super().__exit__(*exc)
            self._hooks.__exit__(*exc)
            self._hooks = None
            self._slots.clear()
            self._settle(None)

    # -- registry -----------------------------------------------------------------------------
    def _find(self, tensor: Any) -> Recipe | Kept | CompressedAnchor | None:
        if not _trackable(tensor):
            return None
        slot = self._slots.get(tensor.untyped_storage()._cdata)
        if slot is None:
            return None
        hit = slot.items.get(_geometry(tensor))
        # Every op that writes to the storage drops its slot; a version past the recorded one with
        # the slot still there comes from bumps that change no data, such as mark_dirty in a custom
        # autograd Function that works in place (BitReLU(inplace=True)).
        if hit is None or tensor._version < hit[0]:
            return None
        return hit[1]

    def _record(self, tensor: torch.Tensor, version: int, ref: Recipe | Kept | CompressedAnchor) -> None:
        storage = tensor.untyped_storage()
        slot = self._slots.get(storage._cdata)
        if slot is None:
            slot = self._slots[storage._cdata] = _Slot(storage)
        slot.items[_geometry(tensor)] = (version, ref)

    def _forget(self, tensor: torch.Tensor) -> None:
        if _trackable(tensor):
            self._slots.pop(tensor.untyped_storage()._cdata, None)

    def _pack(self, tensor: torch.Tensor) -> Any:
        """A recipe for a recomputable tensor; any other goes to the saved-tensor hooks active
        around the tracker (a user's offloading, or a measurement), as if the tracker were not there."""
        found = None if isinstance(tensor, nn.Parameter) or _keeping_depth() else self._find(tensor)
        if isinstance(found, CompressedAnchor):
            saved = PendingSave(tensor)
            saved.settle(found, self._store, self._load)
            return saved
        if isinstance(found, Recipe):
            self._counters.packed += 1
            return Packed(found, self._counters)
        if found is None and _norm_storage() != "exact" and not isinstance(tensor, nn.Parameter):
            saved = PendingSave(tensor)  # maybe the input of the norm about to run: settled when it runs
            self._pending.append(saved)
            return saved
        return self._store(tensor)

    def _store(self, tensor: torch.Tensor) -> Any:
        """`tensor` as the saved-tensor hooks around the tracker store it (the ops they run, such as
        an offloading copy, are not the forward's: they settle nothing)."""
        if self._outer is None:
            return tensor
        self._storing += 1
        try:
            return self._outer[0](tensor)
        finally:
            self._storing -= 1

    @property
    def _load(self) -> Callable[[Any], torch.Tensor] | None:
        return None if self._outer is None else self._outer[1]

    def _settle(self, anchor: CompressedAnchor | None) -> None:
        """Settle the saves of the op just run: those of `anchor`'s tensor become its payload."""
        pending, self._pending = self._pending, []
        for saved in pending:
            tensor = saved.tensor
            matches = anchor is not None and tensor is not None and _same_place(tensor, anchor.tensor)
            saved.settle(anchor if matches else None, self._store, self._load)

    def _unpack(self, saved: Any) -> torch.Tensor:
        if type(saved) is Packed or type(saved) is PendingSave or self._outer is None:
            return unpack(saved)
        return self._outer[1](saved)

    # -- recording ----------------------------------------------------------------------------
    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self._pending and not self._storing and func not in NORMS:
            self._settle(None)
        if func in NORMS:
            return self._norm(func, args, kwargs)
        if func in ELEMENTWISE or func in VIEWS:
            return self._pointwise(func, args, kwargs)
        if func in POOLS:
            return self._pool(func, args, kwargs)
        out = func(*args, **kwargs)
        if mutates(func):
            for arg, schema_arg in zip(args, func._schema.arguments, strict=False):
                if schema_arg.alias_info is not None and schema_arg.alias_info.is_write:
                    self._forget(arg)
            for value in kwargs.values():
                self._forget(value)
        return out

    def _norm(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict):
        try:
            return self._record_norm(func, args, kwargs)
        finally:
            if self._pending:
                x = args[0] if args else None
                found = self._find(x)
                self._settle(found if isinstance(found, CompressedAnchor) else None)

    def _record_norm(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict):
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if kwargs or not _trackable(x):
            return out
        # A norm keeps its input only when autograd records it: then the input can anchor recipes.
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        source = self._find(x)
        if source is None:
            if not needs_grad:
                return out
            kind = _norm_storage()
            source = Kept(x, is_anchor=True) if kind == "exact" else CompressedAnchor(x, kind)
            self._record(x, x._version, source)
        training_at, always_training = NORMS[func]
        training = always_training or (training_at is not None and bool(args[training_at]))
        if training and func in BATCH_NORM_EPS:
            recipe = _batch_norm_from_statistics(func, source, args, out)
            if recipe.depth <= self.max_depth:
                self._counters.recipes += 1
                self._record(out[0], out[0]._version, recipe)
            return out
        refs = [source, *(Kept(arg, is_anchor=False) if isinstance(arg, torch.Tensor) else arg for arg in args[1:])]
        recipe = Recipe(func, tuple(refs), {}, 0, short_name(func))
        if recipe.depth <= self.max_depth:
            self._counters.recipes += 1
            self._record(out[0], out[0]._version, recipe)
        return out

    def _pointwise(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict):
        found = [self._find(a) for a in args]
        in_place = mutates(func)
        if in_place:
            self._forget(args[0])
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not any(f is not None for f in found):
            return out
        if func in COPIES:
            if out.device != args[0].device:
                return out
            if isinstance(found[0], Recipe) and _same_layout(out, args[0]):
                # A plain copy (autograd's copy of an in-place op's input, a no-op cast): the source's
                # recipe serves it, so one replay feeds both and the copy is not replayed.
                self._record(out, out._version, found[0])
                return out
        refs: list[Any] = []
        for arg, ref in zip(args, found, strict=True):
            if not isinstance(arg, torch.Tensor):
                refs.append(arg)
            elif ref is not None:
                refs.append(ref)
            elif isinstance(arg, nn.Parameter) or arg.numel() * SMALL_FRACTION <= out.numel():
                refs.append(Kept(arg, is_anchor=False))
            else:
                return out
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return out
        # The version autograd will see: views share their base's counter, in-place ops bump it
        # once more after this mode returns (ADInplaceOrView sits above it).
        if func.is_view:
            version = args[0]._version
        elif in_place:
            version = args[0]._version + 1
        else:
            version = out._version
        recipe = Recipe(out_of_place(func), tuple(refs), dict(kwargs), None, short_name(func))
        if recipe.depth <= self.max_depth:
            self._counters.recipes += 1
            self._record(out, version, recipe)
        return out


    def _pool(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict):
        out = func(*args, **kwargs)
        source = self._find(args[0])
        if not isinstance(source, Recipe) or kwargs or any(isinstance(a, torch.Tensor) for a in args[1:]):
            return out
        name = short_name(func)
        if func in MAX_POOLS:
            windows = MaxPoolWindows.of(func, args, out[0])
            offsets = Stored(windows.offsets(out[1]), self._store, self._load)
            indices = Recipe(windows.indices, (offsets,), {}, None, f"{name}_indices")
            recipes = (Recipe(windows.maxima, (source, indices), {}, None, name), indices)
        else:
            recipes = (Recipe(func, (source, *args[1:]), {}, None, name),)
        for tensor, recipe in zip(out if isinstance(out, tuple) else (out,), recipes, strict=True):
            if recipe.depth <= self.max_depth:
                self._counters.recipes += 1
                self._record(tensor, tensor._version, recipe)
        return out


def _batch_norm_from_statistics(func: torch._ops.OpOverload, source: Any, args: tuple, out: tuple) -> Recipe:
    """A training-mode batch norm's output, replayed from the batch statistics it returned."""
    weight, bias = (Kept(arg, is_anchor=False) if isinstance(arg, torch.Tensor) else arg for arg in args[1:3])
    mean, invstd = (Kept(statistic, is_anchor=False) for statistic in out[1:3])
    refs = (source, weight, bias, mean, invstd, args[BATCH_NORM_EPS[func]])
    return Recipe(batch_norm_from_statistics, refs, {}, None, short_name(func))


def recompute_saved(max_depth: int = MAX_DEPTH) -> RecomputeTracker:
    """A context manager that recomputes, in backward, the saved tensors that are cheap functions of a norm's input.

    A tensor whose recipe chain would exceed `max_depth` ops is kept instead, which bounds the work of
    one replay. Example::

        with recompute_saved():
            loss = model(x).sum()
        loss.backward()
    """
    return RecomputeTracker(max_depth)
