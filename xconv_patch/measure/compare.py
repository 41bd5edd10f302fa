"""Exact against patched on the same batch: gradient fidelity, and step time measured interleaved.

Gradient fidelity: per conv, the patched weight gradient against the exact one on the same
weights and the same batch (relative error and cosine similarity), beside the minibatch SGD noise
of the same layer (a second, independent batch's exact gradient against the first's). Step time:
the median over the measured steps, exact and patched steps interleaved in one process
(A B A B ...) so both see the same machine load.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GradientError:
    """A patched weight gradient against the exact one."""

    rel_error: float
    cosine: float


def gradient_errors(
    exact: Mapping[str, torch.Tensor], estimate: Mapping[str, torch.Tensor]
) -> dict[str, GradientError]:
    """Relative error ||g~ - g|| / ||g|| and cosine similarity for every name present in both."""
    errors = {}
    for name, reference in exact.items():
        if name not in estimate:
            continue
        g = reference.detach().double().flatten()
        g_hat = estimate[name].detach().double().flatten()
        norm = g.norm().item()
        if norm == 0:
            errors[name] = GradientError(math.nan, math.nan)
        else:
            errors[name] = GradientError((g_hat - g).norm().item() / norm, F.cosine_similarity(g_hat, g, dim=0).item())
    return errors


def minibatch_noise(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Relative minibatch SGD noise per layer, from the exact gradients of two independent batches of
    one size on the same weights: ||g2 - g1|| / (sqrt(2) ||g1||).

    E||g2 - g1||^2 = 2 E||g - E g||^2, so the numerator estimates how far one batch's gradient lies
    from the expected (full-data) gradient; dividing by ||g1|| puts it in the units of the probe error
    ||g~ - g1|| / ||g1||. Their ratio is benchmarks/variance.py's noise ratio, from two batches.
    """
    noise = {}
    for name, reference in first.items():
        if name not in second:
            continue
        g1, g2 = reference.detach().double().flatten(), second[name].detach().double().flatten()
        norm = g1.norm().item()
        noise[name] = (g2 - g1).norm().item() / (math.sqrt(2) * norm) if norm else math.nan
    return noise


def fidelity_summary(
    errors: Mapping[str, GradientError], noise: Mapping[str, float] | None = None
) -> dict[str, float | int | None]:
    """Median and worst relative error and cosine over the given layers; with `noise` (minibatch_noise),
    the median SGD noise of the same layers and the median and largest error / noise ratio."""
    rel = [error.rel_error for error in errors.values() if not math.isnan(error.rel_error)]
    cos = [error.cosine for error in errors.values() if not math.isnan(error.cosine)]
    sgd = [value for name in errors if not math.isnan(value := (noise or {}).get(name, math.nan))]
    ratios = [
        error.rel_error / noise[name]
        for name, error in errors.items()
        if noise and noise.get(name) and not math.isnan(error.rel_error) and not math.isnan(noise[name])
    ]
    return {
        "layers": len(errors),
        "rel_error_median": statistics.median(rel) if rel else None,
        "rel_error_max": max(rel) if rel else None,
        "cosine_median": statistics.median(cos) if cos else None,
        "cosine_min": min(cos) if cos else None,
        "sgd_noise_median": statistics.median(sgd) if sgd else None,
        "noise_ratio_median": statistics.median(ratios) if ratios else None,
        "noise_ratio_max": max(ratios) if ratios else None,
    }


def layer_weights(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Each conversion-report layer's weight: the parameter `<name>.weight` (a conv module's, or a
    functional call's named after its owner), else the parameter `name` (the report named the weight)."""
    parameters = dict(model.named_parameters())
    weights = {name: parameters.get(f"{name}.weight", parameters.get(name)) for name in names}
    return {name: weight for name, weight in weights.items() if weight is not None}


def time_steps(
    steps: Mapping[str, Callable[[], Any]],
    repeats: int,
    synchronize: Callable[[], None] = lambda: None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps interleaved (A B A B ...) so they share the machine's load;
    `progress` hears 'timed step i/n (name)' before each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(repeats):
        for name, step in steps.items():
            if progress is not None:
                progress(f"timed step {index + 1}/{repeats} ({name})")
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times

