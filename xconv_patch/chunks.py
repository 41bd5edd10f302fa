"""Elementwise passes over large tensors, a chunk at a time.

On a CPU, a pass over a whole activation allocates full-size temporaries that the allocator hands
back to the OS and page-faults in again on the next call (about five times the pass's own work
on the 2-core machine of the README's figures); in chunks that fit in cache, the temporaries come
from the allocator's free lists and every pass after the first reads from cache. An accelerator
gets larger chunks, enough work per kernel.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_CPU_CHUNK = 1 << 18
_ACCELERATOR_CHUNK = 1 << 22


def chunk_elements(device: torch.device, multiple: int = 1) -> int:
    """Elements a pass takes at a time on `device`, a multiple of `multiple`."""
    elements = _CPU_CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK
    return max(multiple, elements - elements % multiple)


def spans(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of `chunk` elements covering `numel`."""
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)
