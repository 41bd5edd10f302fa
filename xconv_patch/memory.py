"""What autograd keeps for backward, measured with saved-tensor hooks (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SavedTensors:
    """Records every tensor autograd saves while active; parameters and repeated storages excluded."""

    def __init__(self, exclude: nn.Module | None = None) -> None:
        self._excluded = {p.untyped_storage()._cdata for p in exclude.parameters()} if exclude else set()
        self._storages: dict[tuple[torch.device, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter):
            return tensor
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity: unlike data_ptr, also distinct for fake tensors
        if key not in self._excluded:
            self._storages[(tensor.device, key)] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations that `run()` (a forward through `model`) leaves saved for backward."""
    with SavedTensors(exclude=model) as saved:
        output = run()
    del output
    return saved.bytes
