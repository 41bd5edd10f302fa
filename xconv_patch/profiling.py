"""What XConv saves in a real training step, measured or predicted (DESIGN.md section 3).

A training step here is: gradients set to None, forward, loss, backward, SGD (momentum 0.9)
update. Every figure comes from a step taken after a warm-up step, so the optimizer state exists.

- Peak memory: on CUDA, torch.cuda.max_memory_allocated after a reset; on CPU, the peak of live
  tensor storages counted by torch's MemTracker (a TorchDispatchMode), which also splits the
  peak into parameters, gradients, optimizer state, activations, temporaries and inputs. Process
  RSS is never used.
- Saved activation bytes: what autograd keeps for backward (xconv_patch.memory.SavedTensors).
- Step time: the median over the measured steps, exact and patched steps interleaved in one
  process (A B A B ...) so both see the same machine load.
- Gradient fidelity: per conv, the patched weight gradient against the exact one on the same
  weights and the same batch (relative error and cosine similarity).

`profile` measures the exact and the patched model each in a fresh Python process, so neither
can pollute the other's memory figures; timing and fidelity run in a third. `MemoryPredictor`
(and `predict_memory`) runs the same tracked step under FakeTensorMode, allocating nothing, and
`largest_batch` searches the largest batch that fits a memory limit from such predictions.

Loss (synthetic, generic): the model's own scalar outputs are added as they are (torchvision
detection models return their losses in train mode, given synthetic boxes as targets); every
other floating output with a class dimension (dim 1 of size > 1: logits, segmentation maps,
video logits, auxiliary heads) gets cross-entropy against fixed random labels; the remaining
outputs get mean squared error against fixed random targets.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeCopyMode,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_leaves

from .convert import convert, plan
from .memory import SavedTensors
from .models import LoadedModel, resolve_model, with_image_size
from .report import ConversionReport

DEFAULT_BATCH_SIZE = 8
DEFAULT_STEPS = 3
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")
BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
_PROGRESS = "\x1exconv-progress "
_WORKER = "import sys; from xconv_patch.profiling import worker_main; sys.exit(worker_main(sys.argv[1:]))"


class ProfileError(RuntimeError):
    """Profiling failed; the message says which run and why."""


class OutOfMemoryError(ProfileError):
    """A training step ran out of memory."""


class SpecError(ValueError):
    """An option has a value profiling cannot use; the message names the option."""


@dataclass
class ProfileSpec:
    """What to profile: the model, the batch, the patch and the run. JSON-serialisable."""

    model: str
    attr: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    input_shape: tuple[int, ...] | None = None
    image_size: int | None = None
    probes: int | None = None
    recipe: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    amp: bool = False
    steps: int = DEFAULT_STEPS
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise SpecError naming the first option with an unusable value."""
        if self.batch_size < 1:
            raise SpecError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.probes is not None and self.probes < 0:
            raise SpecError(f"--probes must be 0 (exact) or more, got {self.probes}")
        if self.steps < 1:
            raise SpecError(f"--steps must be at least 1, got {self.steps}")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"--threads must be at least 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise SpecError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SpecError("--device cuda: CUDA is not available on this machine")
        if self.image_size is not None and self.input_shape is not None:
            raise SpecError("--image-size and --input-shape both set the input size: give one")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def sample_shape(self, loaded: LoadedModel) -> tuple[int, ...]:
        """The shape of one input sample: --input-shape, else the model's default with --image-size."""
        if self.input_shape is not None:
            return tuple(self.input_shape)
        if self.image_size is not None:
            return with_image_size(loaded.input_shape, self.image_size)
        return loaded.input_shape

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileSpec:
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(values["input_shape"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Synthetic batches and the training step


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
    ) -> torch.Tensor:
        """Run the step and return the loss; `saved` records what the forward keeps for backward."""
        self.optimizer.zero_grad(set_to_none=True)
        device_type = batch.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.amp else nullcontext()
        with saved if saved is not None else nullcontext(), autocast:
            loss = batch.loss(batch.forward(self.model))
        loss.backward()
        if before_update is not None:
            before_update()
        self.optimizer.step()
        return loss.detach()


# ---------------------------------------------------------------------------------------------
# Memory: measured and predicted


@dataclass
class MemoryFigures:
    """Peak memory of a training step with its breakdown, and the forward's saved activations."""

    peak_bytes: int
    activation_bytes: int
    breakdown: dict[str, int]
    predicted: bool = False


def tracked_step(step: TrainingStep, batch: Batch) -> MemoryFigures:
    """Run one step under MemTracker and SavedTensors; on CUDA the peak is max_memory_allocated."""
    tracker = MemTracker()
    tracker.track_external(step.model, step.optimizer, *batch.tensors())
    saved = SavedTensors(exclude=step.model)
    device = batch.inputs[0].device  # with its index: the tracker's key
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tracker:
        step(batch, saved=saved)
    breakdown = _breakdown(tracker.get_tracker_snapshot("peak").get(device, {}))
    peak = torch.cuda.max_memory_allocated(device) if cuda else sum(breakdown.values())
    return MemoryFigures(peak, saved.bytes, breakdown, predicted=isinstance(batch.inputs[0], FakeTensor))


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
) -> MemoryFigures:
    """Peak and saved-activation memory of a real training step after one warm-up step."""
    step = TrainingStep(model.to(device=device, dtype=dtype), amp=amp)
    with out_of_memory_as_error(batch_size):
        batch = Batch(family, batch_size, sample_shape, device, dtype, seed)
        step(batch)
        return tracked_step(step, batch)


class MemoryPredictor:
    """Predicts training-step memory for any batch size under FakeTensorMode, allocating nothing.

    The model is copied as fake tensors; a warm-up step at batch 2 creates the optimizer state.
    Predictions count tensor storages on CPU; a CUDA caching allocator adds rounding on top.
    """

    def __init__(
        self, model: nn.Module, family: str, sample_shape: tuple[int, ...], *,
        dtype: torch.dtype = torch.float32, amp: bool = False, seed: int = 0,
    ) -> None:
        self.family, self.sample_shape, self.dtype, self.seed = family, sample_shape, dtype, seed
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with _quiet_fake_tensor_log(), FakeCopyMode(self.mode):
            fake_model = copy.deepcopy(model)
        with self._faking():
            _cast_floating(fake_model, dtype)
            self.step = TrainingStep(fake_model, amp=amp)
            self.step(self._batch(2))

    def __call__(self, batch_size: int) -> MemoryFigures:
        """The predicted figures for one training step at `batch_size`."""
        with self._faking():
            return tracked_step(self.step, self._batch(batch_size))

    def _batch(self, batch_size: int) -> Batch:
        return Batch(self.family, batch_size, self.sample_shape, torch.device("cpu"), self.dtype, self.seed)

    @contextmanager
    def _faking(self) -> Iterator[None]:
        try:
            with _quiet_fake_tensor_log(), self.mode:
                yield
        except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as error:
            raise ProfileError(f"cannot predict this model's memory: it runs a data-dependent operation ({error})") \
                from error


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) for fake tensors, which Module._apply cannot swap in place."""
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and parameter.is_floating_point():
                module._parameters[name] = nn.Parameter(parameter.detach().to(dtype), parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def predict_memory(
    model: nn.Module, family: str, batch_size: int, sample_shape: tuple[int, ...], *,
    dtype: torch.dtype = torch.float32, amp: bool = False, seed: int = 0,
) -> MemoryFigures:
    """The figures `measure_memory` would give, predicted under FakeTensorMode."""
    return MemoryPredictor(model, family, sample_shape, dtype=dtype, amp=amp, seed=seed)(batch_size)


def largest_batch(peak: Callable[[int], int], limit: int, cap: int = 1 << 20) -> int:
    """The largest batch size in [1, cap] whose `peak(batch)` is at most `limit` bytes (0 if none).

    Peak memory is close to affine in the batch size, so a secant guess and a check of its
    neighbour usually settle it in two predictions; every third step bisects, which bounds the rest.
    """
    known: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in known:
            known[size] = peak(size)
        return known[size] <= limit

    low = min(2, cap)
    if not fits(low):
        return 1 if low == 2 and fits(1) else 0
    high, previous, turn = cap + 1, low, 0
    while high - low > 1:
        if turn % 3 == 0:
            candidate = _secant_guess(known, low, high, limit)
        elif turn % 3 == 1:
            candidate = previous + 1 if known[previous] <= limit else previous - 1
        else:
            candidate = (low + high) // 2 if high <= cap else 2 * low
        candidate = min(max(candidate, low + 1), high - 1)
        if fits(candidate):
            low = candidate
        else:
            high = candidate
        previous, turn = candidate, turn + 1
    return low


def _secant_guess(known: Mapping[int, int], low: int, high: int, limit: int) -> int:
    """Where the peak crosses `limit` on the line through `low` and `high` (once a batch is known
    not to fit), else on the line through the smallest known batch and `low`."""
    other = high if high in known else min(known)
    if other == low:
        return 2 * low
    slope = (known[other] - known[low]) / (other - low)
    return low + int((limit - known[low]) // slope) if slope > 0 else 2 * low


# ---------------------------------------------------------------------------------------------
# Gradient fidelity and timing


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


# ---------------------------------------------------------------------------------------------
# Building and patching, the same way in every process


def build(spec: ProfileSpec) -> tuple[LoadedModel, tuple[int, ...]]:
    """The model and one sample's input shape, seeded so every process builds the same weights."""
    torch.manual_seed(spec.seed)
    loaded = resolve_model(spec.model, spec.attr)
    return loaded, spec.sample_shape(loaded)


def analysis_inputs(family: str, batch_size: int, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """What convert()/plan() need to put byte figures on the plan for this model family."""
    if family == "optical_flow":
        example = Batch(family, batch_size, sample_shape, torch.device("cpu"))
        return {"example_inputs": tuple(example.inputs)}
    if family == "detection":
        return {}
    return {"input_shape": (batch_size, *sample_shape)}


def patch(model: nn.Module, spec: ProfileSpec, family: str, sample_shape: tuple[int, ...]) -> nn.Module:
    """The model converted in place by the spec's recipe and probe budget."""
    with out_of_memory_as_error(spec.batch_size):
        return convert(
            model, spec.probes, spec.recipe, inplace=True, **analysis_inputs(family, spec.batch_size, sample_shape)
        )


def plan_for(model: nn.Module, spec: ProfileSpec, family: str, sample_shape: tuple[int, ...]) -> ConversionReport:
    """The conversion report (per-layer plan) for the spec, leaving the model as it is."""
    with out_of_memory_as_error(spec.batch_size):
        return plan(model, spec.probes, spec.recipe, **analysis_inputs(family, spec.batch_size, sample_shape))


def batchnorm_count(model: nn.Module) -> int:
    """How many BatchNorm layers the model has (their statistics need recalibrating after XConv training)."""
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def notes(batchnorm_layers: int) -> list[str]:
    """What a user of the patched model should know; today: BatchNorm recalibration."""
    if not batchnorm_layers:
        return []
    return [
        f"The model has {batchnorm_layers} BatchNorm layers. XConv's noisier weight updates move activation "
        "statistics faster than BatchNorm's running averages follow: before evaluating, re-estimate them with "
        "xconv_patch.recalibrate_bn(model, train_batches) (see the README)."
    ]


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '8G' (binary), '8GB' (decimal) or a plain byte count, as bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size like 8GiB, 512MiB or 8000000000")
    number, unit, binary, byte = match.groups()
    base = 1000 if byte and unit and not binary else 1024
    size = int(float(number) * base ** "_kmgt".index(unit.lower() or "_"))
    if size < 1:
        raise ValueError(f"{text!r}: the size must be at least one byte")
    return size


# ---------------------------------------------------------------------------------------------
# Worker processes


def _memory_task(spec: ProfileSpec, patched: bool) -> dict[str, Any]:
    loaded, shape = build(spec)
    model = patch(loaded.model, spec, loaded.family, shape) if patched else loaded.model
    _emit("measuring")
    figures = measure_memory(
        model, loaded.family, spec.batch_size, shape,
        device=spec.torch_device, dtype=DTYPES[spec.dtype], amp=spec.amp, seed=spec.seed,
    )
    return asdict(figures)


def _compare_task(spec: ProfileSpec) -> dict[str, Any]:
    """Gradient fidelity on the first step (same weights, same batch), then interleaved timing."""
    loaded, shape = build(spec)
    device, dtype = spec.torch_device, DTYPES[spec.dtype]
    exact = loaded.model.to(device=device, dtype=dtype)
    patched = patch(copy.deepcopy(exact), spec, loaded.family, shape)
    names = [layer.name for layer in patched.xconv_report.layers]
    steps = {"exact": TrainingStep(exact, amp=spec.amp), "xconv": TrainingStep(patched, amp=spec.amp)}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    with out_of_memory_as_error(spec.batch_size):
        batch = Batch(loaded.family, spec.batch_size, shape, device, dtype, spec.seed)
        for name, step in steps.items():
            weights = layer_weights(step.model, names)
            torch.manual_seed(spec.seed)
            step(batch, before_update=lambda n=name, w=weights: grads.__setitem__(n, _grads(w)))
        _emit("timing")
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        times = time_steps({name: partial(step, batch) for name, step in steps.items()}, spec.steps, synchronize)
    errors = gradient_errors(grads["exact"], grads["xconv"])
    return {"times": times, "gradients": {name: asdict(error) for name, error in errors.items()}}


def _grads(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: weight.grad.detach().clone() for name, weight in weights.items() if weight.grad is not None}


_TASKS: dict[str, Callable[[ProfileSpec], dict[str, Any]]] = {
    "exact": partial(_memory_task, patched=False),
    "xconv": partial(_memory_task, patched=True),
    "compare": _compare_task,
}


@contextmanager
def out_of_memory_as_error(batch_size: int) -> Iterator[None]:
    """Turn torch's out-of-memory errors (CUDA's, and the CPU allocator's) into OutOfMemoryError."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
            raise OutOfMemoryError(f"out of memory at batch size {batch_size}: {_first_line(error)}") from error
        raise


def _first_line(error: BaseException) -> str:
    """The informative line of an exception (torch prefixes allocator messages with an assertion)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].split("err == 0. ")[-1] if lines else type(error).__name__


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a traceback for each op it cannot run; the exception says enough."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _emit(stage: str) -> None:
    """A progress event for the parent process (worker side)."""
    print(f"{_PROGRESS}{json.dumps({'stage': stage})}", file=sys.stderr, flush=True)


def run_worker(task: str, spec: ProfileSpec, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one task ('exact', 'xconv' or 'compare') in a fresh Python process and return its result."""
    with tempfile.TemporaryDirectory(prefix="xconv-") as directory:
        result_path = Path(directory) / "result.json"
        command = [sys.executable, "-c", _WORKER, task, str(result_path)]
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output: list[str] = []
        try:
            process.stdin.write(json.dumps(spec.to_dict()))
            process.stdin.close()
            for line in process.stdout:
                if not line.startswith(_PROGRESS):
                    output.append(line)
                elif progress is not None:
                    progress(json.loads(line[len(_PROGRESS):])["stage"])
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if not result_path.exists():
            reason = f"was killed by signal {-code} (out of memory?)" if code < 0 else f"exited with status {code}"
            raise ProfileError(f"the {task} run {reason}: {''.join(output[-1:]).strip()}")
        payload = json.loads(result_path.read_text())
    if payload["ok"]:
        return payload["result"]
    error_class = OutOfMemoryError if payload["kind"] == "out_of_memory" else ProfileError
    error = error_class(f"the {task} run failed: {payload['message']}")
    error.worker_traceback = payload["traceback"]
    raise error


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: task name and result path in argv, the spec on stdin."""
    task, result_path = argv
    spec = ProfileSpec.from_dict(json.loads(sys.stdin.read()))
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        payload = {"ok": True, "result": _TASKS[task](spec)}
    except Exception as error:
        kind = "out_of_memory" if isinstance(error, OutOfMemoryError) else type(error).__name__
        message = str(error) if isinstance(error, ProfileError) else f"{type(error).__name__}: {_first_line(error)}"
        payload = {"ok": False, "kind": kind, "message": message, "traceback": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(payload))
    return 0


# ---------------------------------------------------------------------------------------------
# The profile


@dataclass
class Variant:
    """The figures of one model variant (exact or patched); step_seconds is None for predictions."""

    peak_bytes: int
    activation_bytes: int
    step_seconds: float | None
    breakdown: dict[str, int]
    step_times: list[float] = field(default_factory=list)


@dataclass
class MaxBatch:
    """The largest batch that fits a memory limit, predicted for both variants."""

    limit_bytes: int
    exact: int
    xconv: int

    @property
    def ratio(self) -> float | None:
        return self.xconv / self.exact if self.exact else None


@dataclass
class ProfileResult:
    """Everything `xconv profile` reports."""

    spec: ProfileSpec
    device: str
    input_shape: tuple[int, ...]
    predicted: bool
    exact: Variant
    xconv: Variant
    layers: list[dict[str, Any]]
    batchnorm_layers: int
    conversion: dict[str, Any]
    max_batch: MaxBatch | None = None

    @property
    def threads(self) -> int:
        """The intra-op threads the measuring processes used."""
        return self.spec.threads or torch.get_num_threads()

    @property
    def ratios(self) -> dict[str, float | None]:
        """exact / xconv for peak memory, saved activations and step time (above 1: XConv is better)."""
        pairs = {
            "peak_bytes": (self.exact.peak_bytes, self.xconv.peak_bytes),
            "activation_bytes": (self.exact.activation_bytes, self.xconv.activation_bytes),
            "step_seconds": (self.exact.step_seconds, self.xconv.step_seconds),
        }
        return {key: a / b if a is not None and b else None for key, (a, b) in pairs.items()}

    @property
    def fidelity(self) -> dict[str, float | int | None]:
        """Summary of the gradient errors over the patched layers."""
        errors = {
            layer["name"]: GradientError(layer["grad_rel_error"], layer["grad_cosine"])
            for layer in self.layers
            if layer["action"] == "patched" and layer.get("grad_rel_error") is not None
        }
        return fidelity_summary(errors)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `xconv profile --json`."""
        document = {
            "model": self.spec.model,
            "device": self.device,
            "batch_size": self.spec.batch_size,
            "input_shape": list(self.input_shape),
            "probes": self.spec.probes,
            "recipe": self.spec.recipe or "default",
            "dtype": self.spec.dtype,
            "amp": self.spec.amp,
            "steps": self.spec.steps,
            "threads": self.threads,
            "predicted": self.predicted,
            "exact": asdict(self.exact),
            "xconv": asdict(self.xconv),
            "ratios": self.ratios,
            "gradient_fidelity": self.fidelity,
            "batchnorm_layers": self.batchnorm_layers,
            "notes": notes(self.batchnorm_layers),
            "conversion": self.conversion,
            "layers": self.layers,
        }
        if self.max_batch is not None:
            document["max_batch"] = {**asdict(self.max_batch), "ratio": self.max_batch.ratio}
        return document


def profile(
    spec: ProfileSpec,
    *,
    predict: bool = False,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Measure (or, with predict=True, predict) the exact and the patched model's training step.

    Measured: the exact and patched memory each in a fresh process, then fidelity and timing in
    a third. max_memory (bytes) adds the predicted largest batch that fits, for both models.
    """
    spec.validate()
    say = progress or (lambda stage: None)
    say("building the model and planning the patch")
    loaded, shape = build(spec)
    report = plan_for(loaded.model, spec, loaded.family, shape)
    dtype = DTYPES[spec.dtype]
    predictors: dict[str, MemoryPredictor] = {}
    if predict or max_memory is not None:
        for name in ("exact", "xconv"):
            say(f"{name}: preparing the prediction (FakeTensorMode)")
            model = patch(copy.deepcopy(loaded.model), spec, loaded.family, shape) if name == "xconv" else loaded.model
            predictors[name] = MemoryPredictor(model, loaded.family, shape, dtype=dtype, amp=spec.amp, seed=spec.seed)
    if predict:
        figures = {name: asdict(predictor(spec.batch_size)) for name, predictor in predictors.items()}
        compared: dict[str, Any] = {"times": {}, "gradients": {}}
    else:
        figures = {}
        for name in ("exact", "xconv"):
            say(f"{name}: building in a fresh process")
            figures[name] = run_worker(name, spec, lambda stage, n=name: say(f"{n}: {stage} (fresh process)"))
        say("exact vs xconv: gradient fidelity (fresh process)")
        compared = run_worker("compare", spec, lambda stage: say(f"exact vs xconv: {stage}"))
    return ProfileResult(
        spec=spec,
        device=str(spec.torch_device),
        input_shape=shape,
        predicted=predict,
        exact=_variant(figures["exact"], compared["times"].get("exact", [])),
        xconv=_variant(figures["xconv"], compared["times"].get("xconv", [])),
        layers=_layers(report, compared["gradients"]),
        batchnorm_layers=batchnorm_count(loaded.model),
        conversion=_conversion_summary(report),
        max_batch=_max_batch(predictors, max_memory, say) if max_memory is not None else None,
    )


def _max_batch(predictors: Mapping[str, MemoryPredictor], limit: int, say: Callable[[str], None]) -> MaxBatch:
    sizes = {}
    for name, predictor in predictors.items():
        say(f"{name}: searching the largest batch under {limit / 2**30:.2f} GiB (FakeTensorMode)")
        sizes[name] = largest_batch(lambda size, p=predictor: p(size).peak_bytes, limit)
    return MaxBatch(limit, sizes["exact"], sizes["xconv"])


def _variant(figures: Mapping[str, Any], times: list[float]) -> Variant:
    return Variant(
        peak_bytes=figures["peak_bytes"],
        activation_bytes=figures["activation_bytes"],
        step_seconds=statistics.median(times) if times else None,
        breakdown=figures["breakdown"],
        step_times=times,
    )


def _layers(report: ConversionReport, gradients: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    layers = []
    for record in report.to_dicts():
        error = gradients.get(record["name"], {})
        layers.append({
            **record,
            "probes": record["probes"] if record["action"] == "patched" else 0,
            "grad_rel_error": error.get("rel_error"),
            "grad_cosine": error.get("cosine"),
        })
    return layers


def _conversion_summary(report: ConversionReport) -> dict[str, Any]:
    summary = report.to_dict()
    del summary["layers"]
    return summary



# ---------------------------------------------------------------------------------------------
# xconv patch: plan a user's model, write a recipe and optionally the patched model


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not allowed."""


@dataclass
class PatchPlan:
    """The conversion plan of one model for one input, and what `xconv patch` writes from it."""

    loaded: LoadedModel
    report: ConversionReport
    analysis: dict[str, Any]
    batch_size: int
    sample_shape: tuple[int, ...]
    probes: int | None
    recipe: str | None
    batchnorm_layers: int

    def recipe_toml(self) -> str:
        """A recipe pinning every layer's decision by name: editable, and loadable by convert()."""
        return self.report.to_recipe().to_toml()

    def usage(self, recipe_path: Path | str) -> str:
        """The lines a training script needs to apply the written recipe."""
        analysis = ", ".join(f"{key}={_python(value)}" for key, value in self.analysis.items())
        return (
            "from xconv_patch import convert\n"
            f"model = convert(model, recipe={str(recipe_path)!r}{', ' + analysis if analysis else ''})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `xconv patch --json` (without the outputs written)."""
        summary = _conversion_summary(self.report)
        return {
            "model": self.loaded.name,
            "batch_size": self.batch_size,
            "input_shape": list(self.sample_shape),
            "probes": self.probes,
            "recipe": self.recipe or "default",
            "batchnorm_layers": self.batchnorm_layers,
            "notes": notes(self.batchnorm_layers),
            "totals": {key: summary.pop(key) for key in ("activation_bytes_before", "activation_bytes_after",
                                                         "bytes_freed", "counts")},
            "conversion": summary,
            "layers": [
                {**record, "probes": record["probes"] if record["action"] == "patched" else 0}
                for record in self.report.to_dicts()
            ],
        }


def _python(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def plan_patch(
    model: str,
    *,
    attr: str | None = None,
    probes: int | None = None,
    recipe: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    image_size: int | None = None,
    batch_size: int = 1,
) -> PatchPlan:
    """Load the model (see xconv_patch.models for the file rules) and plan its conversion."""
    spec = ProfileSpec(
        model, attr=attr, batch_size=batch_size, input_shape=input_shape, image_size=image_size,
        probes=probes, recipe=recipe, device="cpu",
    )
    spec.validate()
    loaded, shape = build(spec)
    report = plan_for(loaded.model, spec, loaded.family, shape)
    analysis = analysis_inputs(loaded.family, batch_size, shape)
    analysis = {"input_shape": analysis["input_shape"]} if "input_shape" in analysis else {}
    return PatchPlan(loaded, report, analysis, batch_size, shape, probes, recipe, batchnorm_count(loaded.model))


def check_outputs(paths: list[Path], force: bool) -> None:
    """Refuse before anything is written if an output exists and force is False."""
    for path in paths:
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: exists; pass --force to overwrite it")


def write_patch(plan: PatchPlan, recipe_path: Path, model_path: Path | None = None, force: bool = False) -> None:
    """Write the recipe TOML and, if model_path is given, the patched model (torch.save of the module).

    The saved model is the loaded model converted with the written recipe; load it with
    torch.load(path, weights_only=False) where xconv_patch and the model's own module import.
    """
    check_outputs([recipe_path, *([model_path] if model_path else [])], force)
    recipe_path.write_text(plan.recipe_toml(), encoding="utf-8")
    if model_path is not None:
        torch.save(convert(plan.loaded.model, recipe=recipe_path, inplace=True, **plan.analysis), model_path)
