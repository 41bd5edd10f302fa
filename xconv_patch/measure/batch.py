"""Synthetic batches for each model family, their generic loss, and the training step measured.

A training step here is: gradients set to None, forward, loss, backward, SGD (momentum 0.9)
update.

Loss (synthetic, generic): the model's own scalar outputs are added as they are (torchvision
detection models return their losses in train mode, given synthetic boxes as targets); every
other floating output with a class dimension (dim 1 of size > 1: logits, segmentation maps,
video logits, auxiliary heads) gets cross-entropy against fixed random labels; the remaining
outputs get mean squared error against fixed random targets.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from ..memory import SavedTensors
from .errors import ProfileError


class Batch:
    """A synthetic batch for a model family, and the generic loss on the model's outputs.

    Labels and targets are drawn once from a generator seeded with `seed` and kept, so every
    step (and the exact and patched models) see the same batch.
    """

    def __init__(
        self,
        family: str,
        batch_size: int,
        sample_shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        self.family, self.device = family, device
        self._generator = torch.Generator().manual_seed(seed)
        self._targets: dict[tuple, torch.Tensor] = {}
        shape = (batch_size, *sample_shape)
        self.inputs = [
            torch.randn(shape, generator=self._generator).to(device=device, dtype=dtype)
            for _ in range(2 if family == "optical_flow" else 1)
        ]
        self.detection_targets = (
            _detection_targets(batch_size, sample_shape, device, seed) if family == "detection" else None
        )

    def forward(self, model: nn.Module) -> Any:
        if self.family == "detection":
            return model(list(self.inputs[0]), self.detection_targets)
        return model(*self.inputs)

    def loss(self, output: Any) -> torch.Tensor:
        """The synthetic loss described in the module docstring."""
        terms = []
        for leaf in tree_leaves(output):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad):
                continue
            if leaf.ndim == 0:
                terms.append(leaf.float())
            elif leaf.ndim >= 2 and leaf.shape[1] > 1:
                labels = self._target("labels", (leaf.shape[0], *leaf.shape[2:]), leaf.shape[1], leaf.device)
                terms.append(F.cross_entropy(leaf.float(), labels))
            else:
                target = self._target("values", tuple(leaf.shape), 0, leaf.device)
                terms.append(F.mse_loss(leaf.float(), target))
        if not terms:
            raise ProfileError("the model's output has no floating tensor that requires grad: nothing to train")
        return torch.stack(terms).sum()

    def _target(self, kind: str, shape: tuple[int, ...], classes: int, device: torch.device) -> torch.Tensor:
        key = (kind, shape, classes)
        if key not in self._targets:
            if kind == "labels":
                target = torch.randint(0, classes, shape, generator=self._generator)
            else:
                target = torch.randn(shape, generator=self._generator)
            self._targets[key] = target.to(device)
        return self._targets[key]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the batch holds (inputs, labels, targets), for the memory tracker."""
        detection = [value for target in self.detection_targets or () for value in target.values()]
        return [*self.inputs, *self._targets.values(), *detection]


def _detection_targets(
    batch_size: int, sample_shape: tuple[int, ...], device: torch.device, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Two random boxes of class 1 per image, with their masks and 17 keypoints (Mask/Keypoint R-CNN)."""
    height, width = sample_shape[1:]
    rng = random.Random(seed)
    targets = []
    for _ in range(batch_size):
        boxes, masks, keypoints = [], torch.zeros(2, height, width, dtype=torch.uint8), []
        for mask in masks:
            x0, y0 = rng.randrange(width // 2 + 1), rng.randrange(height // 2 + 1)
            x1, y1 = x0 + rng.randint(1, (width + 1) // 2), y0 + rng.randint(1, (height + 1) // 2)
            boxes.append([x0, y0, x1, y1])
            mask[y0:y1, x0:x1] = 1
            keypoints.append([[rng.uniform(x0, x1), rng.uniform(y0, y1), 1.0] for _ in range(17)])
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.ones(2, dtype=torch.int64),
            "masks": masks,
            "keypoints": torch.tensor(keypoints),
        }
        targets.append({key: value.to(device) for key, value in target.items()})
    return targets


class TrainingStep:
    """One training step of `model`: gradients to None, forward, loss, backward, SGD momentum update."""

    def __init__(self, model: nn.Module, *, amp: bool = False, lr: float = 1e-3) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.amp = amp

    def __call__(
        self,
        batch: Batch,
        saved: SavedTensors | None = None,
        before_update: Callable[[], None] | None = None,
        before_backward: Callable[[], None] | None = None,
        *,
        update: bool = True,
    ) -> torch.Tensor:
        """Run the step and return the loss; `saved` records what the forward keeps for backward,
        `before_backward` and `before_update` run between the phases (measurements); with
        update=False the optimizer does not step (the gradients of the current weights, nothing else)."""
        self.optimizer.zero_grad(set_to_none=True)
        device_type = batch.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.amp else nullcontext()
        with saved if saved is not None else nullcontext(), autocast:
            loss = batch.loss(batch.forward(self.model))
        if before_backward is not None:
            before_backward()
        loss.backward()
        if before_update is not None:
            before_update()
        if update:
            self.optimizer.step()
        return loss.detach()
