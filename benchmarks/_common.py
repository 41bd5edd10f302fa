"""Pieces shared by the variance and training benchmarks: estimators, patching, data, output."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xconv_patch import Recipe, convert

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass(frozen=True)
class Estimator:
    """One configuration of the probing estimator, as XConv layers take it."""

    name: str
    label: str
    probe: str
    per_sample: bool
    deflate: bool

    def options(self) -> dict[str, object]:
        return {"probe": self.probe, "per_sample": self.per_sample, "deflate": self.deflate}


ESTIMATORS = {
    estimator.name: estimator
    for estimator in (
        Estimator("paper", "Gaussian, shared (paper)", "gaussian", per_sample=False, deflate=False),
        Estimator("shared", "Rademacher, shared", "rademacher", per_sample=False, deflate=False),
        Estimator("shared-deflated", "Rademacher, shared + deflated", "rademacher", per_sample=False, deflate=True),
        Estimator("per-sample", "Rademacher, per-sample", "rademacher", per_sample=True, deflate=False),
        Estimator("deflated", "Rademacher, per-sample + deflated", "rademacher", per_sample=True, deflate=True),
        Estimator("orthogonal", "orthogonal, per-sample + deflated", "orthogonal", per_sample=True, deflate=True),
    )
}


def patch(
    model: nn.Module,
    probes: int,
    estimator: Estimator,
    recipe: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    **options: Any,
) -> nn.Module:
    """`model` converted in place by xconv_patch.convert: every convolution with `estimator` at
    `probes`, or, given a shipped recipe's name, that recipe with `probes` as its default budget.
    With `input_shape`, convert plans what it can recompute exactly (and probes the rest); `options`
    are convert's other keyword arguments (recompute ...)."""
    if recipe is None:
        recipe = Recipe.from_dict({"defaults": {"probes": probes, **estimator.options()}})
    return convert(model, probes=probes, recipe=recipe, inplace=True, input_shape=input_shape, **options)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def sample_photographs() -> dict[str, torch.Tensor]:
    """scikit-learn's bundled photographs by name ('china', 'flower'): (3, H, W) floats in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images()
    return {
        Path(filename).stem: torch.tensor(image).permute(2, 0, 1).float().div(255)
        for filename, image in zip(images.filenames, images.images, strict=True)
    }


def crop_corners(image: torch.Tensor, size: int, count: int, generator: torch.Generator, step: int = 1) -> torch.Tensor:
    """Top-left corners (count, 2) of random size x size crops of a (C, H, W) image, multiples of `step`."""
    limits = torch.tensor(image.shape[-2:]) - size
    return torch.randint(0, 2**31, (count, 2), generator=generator) % (limits // step + 1) * step


def crops(image: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """The size x size crops of a (C, H, W) image at the given corners, stacked to (count, C, size, size)."""
    return torch.stack([image[:, top : top + size, left : left + size] for top, left in corners.tolist()])


def shuffled_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (inputs, targets) minibatches in a random order; the last one may be smaller."""
    order = torch.randperm(len(inputs), generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield inputs[index], targets[index]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_spread(values: Sequence[float], digits: int = 2) -> str:
    """'mean +- standard deviation' of a few runs (the deviation over seeds, not the error of the mean)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


def result_file(name: str, extension: str, quick: bool = False) -> Path:
    """benchmarks/results/<name>.<extension>, with _quick after the name for smoke runs."""
    return RESULTS / f"{name}{'_quick' * quick}.{extension}"


def save_results(name: str, results: object, table: str, quick: bool = False) -> None:
    """Write the results as JSON and the table as markdown under benchmarks/results/; print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file(name, "json", quick).write_text(json.dumps(results, indent=1))
    result_file(name, "md", quick).write_text(table + "\n")
    print(table, flush=True)


def save_figure(figure, name: str, quick: bool = False) -> Path:
    """Save a matplotlib figure as docs/<name>.png for the README (results/<name>_quick.png for smoke runs)."""
    path = result_file(name, "png", quick=True) if quick else DOCS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    print(f"wrote {path}", flush=True)
    return path
