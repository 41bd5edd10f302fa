"""Training-step memory predicted under FakeTensorMode: the figures of step_memory, allocating nothing."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeCopyMode,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from .batch import Batch, TrainingStep
from .errors import ProfileError
from .step_memory import MemoryFigures, tracked_step


class MemoryPredictor:
    """Predicts training-step memory for any batch size (and input size) under FakeTensorMode,
    allocating nothing.

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

    def __call__(self, batch_size: int, sample_shape: tuple[int, ...] | None = None) -> MemoryFigures:
        """The predicted figures for one training step at `batch_size`, with samples of
        `sample_shape` (the predictor's own when None)."""
        with self._faking():
            batch = self._batch(batch_size, sample_shape)
            # The loss's targets exist before a measured step (its warm-up step made them): make them
            # here too, or a peak in the forward would miss them (a segmentation map's labels).
            batch.loss(batch.forward(self.step.model))
            return tracked_step(self.step, batch)

    def _batch(self, batch_size: int, sample_shape: tuple[int, ...] | None = None) -> Batch:
        shape = self.sample_shape if sample_shape is None else sample_shape
        return Batch(self.family, batch_size, shape, torch.device("cpu"), self.dtype, self.seed)

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

