"""Measuring what XConv saves in a real training step (DESIGN.md section 3), one module per concept.

- spec: what to profile (ProfileSpec) and the options' values; errors: what a run can fail with;
- batch: synthetic batches per model family, their loss, and the training step measured;
- building: the model a spec names, built, planned and patched the same way in every process;
- step_memory: peak memory (MemTracker on CPU, the allocator on CUDA) and saved activations;
- prediction: the same figures under FakeTensorMode, allocating nothing;
- batch_search: the largest batch, or input side, under a memory limit;
- compare: gradient fidelity against the exact model, and interleaved step timing;
- worker: the protocol of the fresh processes each measurement runs in;
- profiling: `profile`, which puts all of it together for `xconv profile`.

Names are imported from their modules on first use (PEP 562), so a worker process that imports
one module does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import Batch, TrainingStep
    from .batch_search import largest_batch, largest_side
    from .building import batchnorm_count, notes
    from .compare import GradientError, fidelity_summary, gradient_errors, layer_weights, minibatch_noise, time_steps
    from .errors import OutOfMemoryError, ProfileError
    from .prediction import MemoryPredictor, predict_memory
    from .profiling import MaxBatch, ProfileResult, Progress, Variant, profile
    from .spec import DEFAULT_BATCH_SIZE, DEFAULT_STEPS, DEVICES, DTYPES, ProfileSpec, SpecError, parse_size
    from .step_memory import BREAKDOWN_KEYS, MemoryFigures, allocator_peak, measure_memory, tracked_step
    from .worker import run_worker

_SOURCES = {
    "Batch": "batch",
    "TrainingStep": "batch",
    "largest_batch": "batch_search",
    "largest_side": "batch_search",
    "batchnorm_count": "building",
    "notes": "building",
    "GradientError": "compare",
    "fidelity_summary": "compare",
    "gradient_errors": "compare",
    "layer_weights": "compare",
    "minibatch_noise": "compare",
    "time_steps": "compare",
    "OutOfMemoryError": "errors",
    "ProfileError": "errors",
    "MemoryPredictor": "prediction",
    "predict_memory": "prediction",
    "MaxBatch": "profiling",
    "ProfileResult": "profiling",
    "Progress": "profiling",
    "Variant": "profiling",
    "profile": "profiling",
    "DEFAULT_BATCH_SIZE": "spec",
    "DEFAULT_STEPS": "spec",
    "DEVICES": "spec",
    "DTYPES": "spec",
    "ProfileSpec": "spec",
    "SpecError": "spec",
    "parse_size": "spec",
    "BREAKDOWN_KEYS": "step_memory",
    "allocator_peak": "step_memory",
    "MemoryFigures": "step_memory",
    "measure_memory": "step_memory",
    "tracked_step": "step_memory",
    "run_worker": "worker",
}

__all__ = [
    "BREAKDOWN_KEYS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_STEPS",
    "DEVICES",
    "DTYPES",
    "Batch",
    "GradientError",
    "MaxBatch",
    "MemoryFigures",
    "MemoryPredictor",
    "OutOfMemoryError",
    "ProfileError",
    "ProfileResult",
    "ProfileSpec",
    "Progress",
    "SpecError",
    "TrainingStep",
    "Variant",
    "allocator_peak",
    "batchnorm_count",
    "fidelity_summary",
    "gradient_errors",
    "largest_batch",
    "largest_side",
    "layer_weights",
    "measure_memory",
    "minibatch_noise",
    "notes",
    "parse_size",
    "predict_memory",
    "profile",
    "run_worker",
    "time_steps",
    "tracked_step",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
