"""What autograd keeps for backward, measured with saved-tensor hooks (DESIGN.md section 3)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage: unlike data_ptr, also distinct for fake and meta tensors."""
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """Records every tensor autograd saves while active, storages de-duplicated, parameters excluded.

    Each saved storage is credited to `site`, which the caller may set as the forward goes (the
    conversion analysis names the operation running): `keepers` maps a storage to the sites that
    saved it and `nbytes` to its size.
    """

    def __init__(self, exclude: nn.Module | None = None) -> None:
        self._excluded = {storage_key(p) for p in exclude.parameters()} if exclude is not None else set()
        self.site = "<forward>"
        self.nbytes: dict[int, int] = {}
        self.keepers: dict[int, set[str]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter):
            return tensor
        key = storage_key(tensor)
        if key not in self._excluded:
            self.nbytes[key] = tensor.untyped_storage().nbytes()
            self.keepers.setdefault(key, set()).add(self.site)
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.nbytes.values())


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations that `run()` (a forward through `model`) leaves saved for backward."""
    with SavedTensors(exclude=model) as saved:
        output = run()
    del output
    return saved.bytes


class LiveStorages(TorchDispatchMode):
    """Weak references to the storage of every op output made while active, with the op's name.

    What is still alive afterwards is what the code run under it leaves allocated, whoever keeps it
    (saved-tensor hooks, caches, a Function's attributes): the figure no hook can hide.
    """

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[StorageWeakRef, int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an argument's storage is a view or an in-place result; any other is made here
        # (ops that may alias, such as `to` or `reshape`, often copy).
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in given:
                storage = tensor.untyped_storage()
                made = self.made.get(storage._cdata)
                if made is None or made[0].expired():  # a freed storage's address may be reused
                    name = func.overloadpacket.__name__
                    self.made[storage._cdata] = (StorageWeakRef(storage), storage.nbytes(), name)
        return out

    def alive(self, exclude: Any = None) -> Counter[str]:
        """Bytes still alive per producing op, the storages of the tensors in `exclude` left out."""
        excluded = {t.untyped_storage()._cdata for t in tree_leaves(exclude) if isinstance(t, torch.Tensor)}
        by_op: Counter[str] = Counter()
        for key, (ref, nbytes, name) in self.made.items():
            if key not in excluded and not ref.expired():
                by_op[name] += nbytes
        return by_op


def retained_bytes(run: Callable[[], Any]) -> int:
    """Bytes that `run()` (a forward) leaves allocated once it returns, its output excluded."""
    with LiveStorages() as live:
        output = run()
    return live.alive(output).total()
