"""BatchNorm running statistics for models trained with XConv (DESIGN.md section 1).

XConv's weight updates are noisier than exact ones. At a constant learning rate the weights
jitter, the activation statistics move faster than BatchNorm's running averages follow, and
eval-mode accuracy can collapse while the same weights are fine once the statistics are
re-estimated. `recalibrate_bn` re-estimates them; `set_bn_momentum` lets the running averages
follow faster during training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance from `batches`; returns how many were used
    (0 for a model without BatchNorm statistics: then nothing runs).

    batches: input tensors, or tuples/lists whose first element is the input (a DataLoader of
    (x, y) pairs works). The statistics are the plain average over the batches used (at most
    `max_batches`), computed with torch.optim.swa_utils.update_bn without gradients, so XConv
    layers run exactly and cheaply. Inputs move to `device`, by default the device of the model's
    first parameter or buffer. Every module's train/eval mode and every BatchNorm momentum is left
    as it was; if a forward pass fails, the previous statistics are restored.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not any(norm.track_running_stats for norm in norms):
        return 0
    batches = iter(itertools.islice(batches, max_batches))
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_bn needs at least one batch")
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers())).device
    saved = {norm: (norm.momentum, {name: b.clone() for name, b in norm.named_buffers(recurse=False)})
             for norm in norms}
    modes = {module: module.training for module in model.modules()}
    used = 0

    def counted() -> Iterator[Any]:
        nonlocal used
        for batch in itertools.chain([first], batches):
            used += 1
            yield batch

    try:
        update_bn(counted(), model, device=device)
    except BaseException:
        for norm, (momentum, buffers) in saved.items():
            norm.momentum = momentum
            for name, buffer in buffers.items():
                getattr(norm, name).copy_(buffer)
        raise
    finally:
        for module, training in modes.items():
            module.training = training
    return used


def set_bn_momentum(model: nn.Module, momentum: float | None) -> int:
    """Set the running-average momentum of every BatchNorm layer (None: cumulative average); returns the count."""
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1] or None, got {momentum!r}")
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    for norm in norms:
        norm.momentum = momentum
    return len(norms)
