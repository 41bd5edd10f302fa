"""A per-model switch: every forward of a module under `recompute_saved()`."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from xconv_patch.recompute.tracker import RecomputeTracker, keeping_saved, recompute_active, storing_norm_inputs

_thread = threading.local()


class RecomputeHook:
    """Runs every forward of a module under `recompute_saved()` (forward pre-hook + always-called hook).

    Picklable and deep-copyable with its module. Does nothing when grad is disabled, under
    torch.compile, or when a tracker is already active on the thread (e.g. an enabled parent).
    """

    def __init__(self, module: nn.Module) -> None:
        self._pre = module.register_forward_pre_hook(self._enter, prepend=True)
        self._post = module.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        tracker = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not recompute_active():
            tracker = RecomputeTracker().__enter__()
        _hook_stack().append((self, tracker))

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = _hook_stack()
        if stack and stack[-1][0] is self:
            _, tracker = stack.pop()
            if tracker is not None:
                tracker.__exit__(None, None, None)

    def remove(self) -> None:
        """Unregister both hooks."""
        self._pre.remove()
        self._post.remove()


def _hook_stack() -> list[tuple[RecomputeHook, RecomputeTracker | None]]:
    stack = getattr(_thread, "hooks", None)
    if stack is None:
        stack = _thread.hooks = []
    return stack


class ScopeHook:
    """Runs every forward of a module inside a reusable context manager (`scope`)."""

    def __init__(self, module: nn.Module, scope: AbstractContextManager) -> None:
        self.scope = scope
        self._pre = module.register_forward_pre_hook(self._enter)
        self._post = module.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.scope.__enter__()

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.scope.__exit__(None, None, None)

    def remove(self) -> None:
        """Unregister both hooks."""
        self._pre.remove()
        self._post.remove()


class KeepSavedHook(ScopeHook):
    """Runs every forward of a module under `keeping_saved()`: what it saves is kept, not recomputed."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, keeping_saved())


class NormStorageHook(ScopeHook):
    """Runs every forward of a norm under `storing_norm_inputs(kind)`: its input is kept compressed."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        super().__init__(module, storing_norm_inputs(kind))
        self.kind = kind


def keep_saved(module: nn.Module) -> KeepSavedHook:
    """Keep what `module` saves for backward as it is, inside a model where recomputation is enabled
    (a layer whose input must stay in memory, e.g. to spend memory rather than recomputation time)."""
    existing = _hooks_of(module, KeepSavedHook)
    return existing[0] if existing else KeepSavedHook(module)


def store_norm_input(module: nn.Module, kind: str) -> NormStorageHook:
    """Keep the input `module` (a norm) saves for backward as `kind` ("bfloat16", "int8"), compressed
    with stochastic rounding, inside a model where recomputation is enabled; replaces an earlier setting."""
    for hook in _hooks_of(module, NormStorageHook):
        hook.remove()
    return NormStorageHook(module, kind)


def enable(module: nn.Module) -> RecomputeHook:
    """Recompute saved norm-to-conv tensors in every forward of `module`; returns the removable hook.

    Enabling a module twice is a no-op that returns the hook already there.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"enable() expects an nn.Module, got {type(module).__name__}")
    existing = _hooks_of(module, RecomputeHook)
    return existing[0] if existing else RecomputeHook(module)


def disable(module: nn.Module) -> int:
    """Remove the hooks `enable` put on `module`, and those `keep_saved` and `store_norm_input` put on it
    or its submodules (also after deepcopy or pickling); returns how many."""
    found = [*_hooks_of(module, RecomputeHook), *(h for m in module.modules() for h in _hooks_of(m, ScopeHook))]
    for hook in found:
        hook.remove()
    return len(found)


def _hooks_of(module: nn.Module, kind: type) -> list[Any]:
    owners = (getattr(fn, "__self__", None) for fn in module._forward_pre_hooks.values())
    return [owner for owner in owners if isinstance(owner, kind)]
