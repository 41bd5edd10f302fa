"""What autograd keeps for backward, measured with saved-tensor hooks (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
