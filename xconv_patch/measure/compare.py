"""Exact against patched on the same batch: gradient fidelity, and step time measured interleaved.

Gradient fidelity: per conv, the patched weight gradient against the exact one on the same
weights and the same batch (relative error and cosine similarity). Step time: the median over the
measured steps, exact and patched steps interleaved in one process (A B A B ...) so both see the
same machine load.
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


def fidelity_summary(errors: Mapping[str, GradientError]) -> dict[str, float | int | None]:
    """Median and worst relative error and cosine over the given layers."""
    rel = [error.rel_error for error in errors.values() if not math.isnan(error.rel_error)]
    cos = [error.cosine for error in errors.values() if not math.isnan(error.cosine)]
    return {
        "layers": len(errors),
        "rel_error_median": statistics.median(rel) if rel else None,
        "rel_error_max": max(rel) if rel else None,
        "cosine_median": statistics.median(cos) if cos else None,
        "cosine_min": min(cos) if cos else None,
    }


def layer_weights(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Each conversion-report layer's weight: the parameter `<name>.weight` (a conv module's, or a
    functional call's named after its owner), else the parameter `name` (the report named the weight)."""
    parameters = dict(model.named_parameters())
    weights = {name: parameters.get(f"{name}.weight", parameters.get(name)) for name in names}
    return {name: weight for name, weight in weights.items() if weight is not None}


def time_steps(
    steps: Mapping[str, Callable[[], Any]], repeats: int, synchronize: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps interleaved (A B A B ...) so they share the machine's load."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times

