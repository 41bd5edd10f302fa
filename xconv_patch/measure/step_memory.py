"""Peak memory of a real training step with its breakdown, and what its forward saves (DESIGN.md 3).

Peak: on CUDA, torch.cuda.max_memory_allocated after a reset; on CPU, the peak of live tensor
storages counted by torch's MemTracker (a TorchDispatchMode), which also splits the peak into
parameters, gradients, optimizer state, activations, temporaries and inputs. Process RSS is never
used. Saved activation bytes: what autograd keeps for backward (xconv_patch.memory.SavedTensors).
Retained bytes: what the forward leaves allocated (the activations MemTracker counts live once the
loss is computed; on CUDA, memory_allocated after the forward less before it), the figure that no
hook can hide: whatever keeps a tensor, it is counted.
Every figure comes from a step taken after a warm-up step, so the optimizer state exists.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

from ..memory import SavedTensors
from .batch import Batch, TrainingStep
from .errors import out_of_memory_as_error

BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs")


@dataclass
class MemoryFigures:
    """Peak memory of a training step with its breakdown, and the forward's saved activations."""

    peak_bytes: int
    activation_bytes: int
    breakdown: dict[str, int]
    retained_bytes: int
    predicted: bool = False


class StepPeakTracker(MemTracker):
    """torch's MemTracker keeping the whole step's peak only.

    MemTracker updates, after every op, the peak of each module it has seen (a walk over all modules:
    O(modules) per op, about 40% of a FakeTensorMode step of resnet50); nothing here reads those. The
    step's own peak and its breakdown are updated exactly as MemTracker does.
    """

    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = copy.deepcopy(snapshot)


def tracked_step(step: TrainingStep, batch: Batch) -> MemoryFigures:
    """Run one step under StepPeakTracker and SavedTensors; on CUDA the peak is max_memory_allocated."""
    tracker = StepPeakTracker()
    tracker.track_external(step.model, step.optimizer, *batch.tensors())
    saved = SavedTensors(exclude=step.model)
    device = batch.inputs[0].device  # with its index: the tracker's key
    cuda = device.type == "cuda"
    retained: list[int] = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_forward = torch.cuda.memory_allocated(device)

    def after_forward() -> None:
        if cuda:
            retained.append(torch.cuda.memory_allocated(device) - before_forward)
        else:
            retained.append(_breakdown(tracker.get_tracker_snapshot("current").get(device, {}))["activations"])

    with tracker:
        step(batch, saved=saved, before_backward=after_forward)
    breakdown = _breakdown(tracker.get_tracker_snapshot("peak").get(device, {}))
    peak = torch.cuda.max_memory_allocated(device) if cuda else sum(breakdown.values())
    predicted = isinstance(batch.inputs[0], FakeTensor)
    return MemoryFigures(peak, saved.bytes, breakdown, retained[0], predicted=predicted)


def allocator_peak(step: TrainingStep, batch: Batch) -> int:
    """The peak of all that a CPU step allocates through torch's allocator, tensors or not, from
    torch.profiler's memory timeline: it sees what MemTracker cannot (a compiled graph's buffers,
    oneDNN's scratchpads and weight reorders), at the cost of a profiled step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as run:
        step(batch)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA's snapshots
        timeline = Path(folder) / "timeline.json"
        run.export_memory_timeline(str(timeline), device="cpu")
        _, sizes = json.loads(timeline.read_text())
    return max(sum(categories) for categories in sizes)


def _breakdown(snapshot: Mapping[Any, int]) -> dict[str, int]:
    """MemTracker's categories (keyed by its enum) as ours."""
    categories = {
        "Parameter": "parameters",
        "Buffer": "parameters",
        "Gradient": "gradients",
        "Optstate": "optimizer_state",
        "Activation": "activations",
        "Temp": "temporaries",
        "Other": "inputs",
    }
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for key, value in snapshot.items():
        name = categories.get(getattr(key, "value", key))
        if name is not None:
            breakdown[name] += value
    return breakdown


def measure_memory(
    model: nn.Module, family: str, batch_size: int, sample_shape: tuple[int, ...], *,
    device: torch.device, dtype: torch.dtype = torch.float32, amp: bool = False, seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> MemoryFigures:
    """Peak and saved-activation memory of a real training step after one warm-up step;
    `progress` hears 'warm-up step' and 'measured step' as each starts."""
    say = progress or (lambda stage: None)
    step = TrainingStep(model.to(device=device, dtype=dtype), amp=amp)
    with out_of_memory_as_error(batch_size):
        batch = Batch(family, batch_size, sample_shape, device, dtype, seed)
        say("warm-up step")
        step(batch)
        say("measured step")
        return tracked_step(step, batch)
