"""A per-model switch: every forward of a module under `recompute_saved()`."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from xconv_patch.recompute.tracker import RecomputeTracker, recompute_active

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


def enable(module: nn.Module) -> RecomputeHook:
    """Recompute saved norm-to-conv tensors in every forward of `module`; returns the removable hook.

    Enabling a module twice is a no-op that returns the hook already there.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"enable() expects an nn.Module, got {type(module).__name__}")
    existing = _hooks_of(module)
    return existing[0] if existing else RecomputeHook(module)


def disable(module: nn.Module) -> int:
    """Remove the hooks `enable` put on `module` (also after deepcopy or pickling); returns how many."""
    found = _hooks_of(module)
    for hook in found:
        hook.remove()
    return len(found)


def _hooks_of(module: nn.Module) -> list[RecomputeHook]:
    owners = (getattr(fn, "__self__", None) for fn in module._forward_pre_hooks.values())
    return [owner for owner in owners if isinstance(owner, RecomputeHook)]
