"""Synthetic 3-D segmentation data for the seg3d task of benchmarks.train, generated on the fly.

Each volume holds one to four ellipsoids (three random radii) and axis-aligned cubes of random size,
position (possibly cut by the border) and intensity (0.5 to 2 times the noise's standard deviation),
in Gaussian noise; the target is the foreground mask, every shape's voxels against the background.
Every number is drawn from the caller's torch.Generator, so a seed fixes the data; nothing touches
the global random state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SHAPES, MAX_SHAPES = 1, 4
ELLIPSOID_RADII = (0.1, 0.25)
"""Each radius, as a fraction of the volume's side."""
CUBE_HALF_SIDE = (0.08, 0.2)
INTENSITY = (0.5, 2.0)
"""A shape's intensity above the background, in units of the noise's standard deviation."""


def synthetic_volumes(count: int, side: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` volumes (count, 1, side, side, side) and their foreground masks (count, side, side, side),
    int64 with 1 inside a shape and 0 outside, all drawn from `generator`."""
    axis = torch.arange(side, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).view(3, -1)
    images = torch.randn((count, 1, side, side, side), generator=generator)
    labels = torch.zeros((count, side, side, side), dtype=torch.int64)

    def uniform(bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape, generator=generator)

    for index in range(count):
        shapes = int(torch.randint(MIN_SHAPES, MAX_SHAPES + 1, (), generator=generator))
        for _ in range(shapes):
            ellipsoid = bool(torch.rand((), generator=generator) < 0.5)
            offset = grid - side * torch.rand((3, 1), generator=generator)
            if ellipsoid:
                inside = ((offset / (side * uniform(ELLIPSOID_RADII, 3, 1))) ** 2).sum(0) <= 1
            else:
                inside = (offset.abs() <= side * uniform(CUBE_HALF_SIDE)).all(0)
            inside = inside.view(side, side, side)
            images[index, 0][inside] += uniform(INTENSITY)
            labels[index][inside] = 1
    return images, labels


def dice(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The Dice score (%) of the predicted foreground (argmax over classes) against `labels`, over
    all the given volumes' voxels together; 100 when both are empty."""
    predicted, target = logits.argmax(1) == 1, labels == 1
    total = predicted.sum() + target.sum()
    return 100.0 if total == 0 else (200 * (predicted & target).sum() / total).item()


def dice_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss of the foreground over the batch (as MONAI's DiceCELoss)."""
    foreground = logits.softmax(1)[:, 1]
    target = labels.to(foreground.dtype)
    soft_dice = (2 * (foreground * target).sum() + 1) / (foreground.sum() + target.sum() + 1)
    return F.cross_entropy(logits, labels) + 1 - soft_dice
