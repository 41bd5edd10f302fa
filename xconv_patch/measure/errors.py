"""Errors of a profiling run, and torch's out-of-memory errors turned into one of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class ProfileError(RuntimeError):
    """Profiling failed; the message says which run and why."""


class OutOfMemoryError(ProfileError):
    """A training step ran out of memory."""


@contextmanager
def out_of_memory_as_error(batch_size: int) -> Iterator[None]:
    """Turn torch's out-of-memory errors (CUDA's, and the CPU allocator's) into OutOfMemoryError."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
            raise OutOfMemoryError(f"out of memory at batch size {batch_size}: {first_line(error)}") from error
        raise


def first_line(error: BaseException) -> str:
    """The informative line of an exception (torch prefixes allocator messages with an assertion)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].split("err == 0. ")[-1] if lines else type(error).__name__
