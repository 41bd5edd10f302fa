"""Compressed storage of a norm's input: what is left to shrink once everything else is recomputed.

A norm keeps its input for backward, and recipes replay the following activations from it, so
it is the one full-size tensor a block keeps. Stored compressed, the norm's backward and every
replay read a decompressed copy: gradients are no longer exact, but stay unbiased, because each
element is rounded stochastically (up with probability equal to its distance from the level
below), so the stored value's expectation is the input itself.

- "bfloat16": the float32 input rounded to bfloat16 (half the bytes; 8 bits of mantissa).
- "int8": per group of `GROUP` consecutive elements (in memory order), the minimum and the step
  of 255 levels spanning the group's range, and one byte per element (~3.8x smaller than float32).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import torch

from xconv_patch.chunks import chunk_elements, spans
from xconv_patch.probes import fresh_generator

NORM_STORAGES = ("exact", "bfloat16", "int8")
"""How a norm's input is kept for backward: as it is, or compressed with stochastic rounding."""

GROUP = 256
"""Elements sharing one minimum and step under int8 storage (in memory order: within a channel's plane)."""
LEVELS = 255
_GROUP_BYTES = 8  # a float32 minimum and step per group


def check_norm_storage(kind: str, where: str = "norm_storage") -> str:
    """`kind` if it is one of NORM_STORAGES; else a ValueError naming `where`."""
    if kind not in NORM_STORAGES:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, NORM_STORAGES))}, got {kind!r}")
    return kind


def stored_bytes(numel: int, itemsize: int, kind: str) -> int:
    """The bytes a tensor of `numel` elements of `itemsize` bytes takes under `kind` storage."""
    if kind == "int8":
        return numel + math.ceil(numel / GROUP) * _GROUP_BYTES
    if kind == "bfloat16":
        return numel * min(itemsize, 2)
    return numel * itemsize


class Compressed:
    """A tensor's compressed copy: `payload` (the tensors kept) and how to decompress it."""

    __slots__ = ("__weakref__", "dtype", "kind", "order", "payload", "shape", "source")

    def __init__(self, tensor: torch.Tensor, kind: str) -> None:
        self.kind = check_norm_storage(kind)
        self.dtype = tensor.dtype
        self.order = _memory_order(tensor)
        dense = tensor.detach().permute(self.order)
        self.shape = dense.shape
        self.source = weakref.ref(tensor)
        if kind == "int8":
            self.payload = _to_int8(dense.reshape(-1))
        elif kind == "bfloat16" and tensor.dtype == torch.float32:
            self.payload = (_to_bfloat16(dense.reshape(-1)),)
        else:  # exact, or already 16 bits or fewer
            self.payload = (dense.reshape(-1),)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload)

    def decompress(self, payload: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The tensor back, in its dtype and memory layout (from `payload`, e.g. after offloading)."""
        payload = self.payload if payload is None else payload
        flat = _from_int8(*payload) if self.kind == "int8" else payload[0]
        dense = flat.to(self.dtype).view(self.shape)
        return dense.permute(_inverse(self.order))


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dimensions from outermost to innermost in memory: permuted so, a dense tensor is contiguous."""
    return sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


def _to_bfloat16(flat: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding the 16 dropped mantissa bits up with probability equal to their value."""
    bits = flat.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=flat.device,
                          generator=fresh_generator(flat.device))
    return noise.add_(bits).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _to_int8(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels as uint8, per-group minimum, per-group step): each element rounded stochastically
    to one of the 256 levels minimum + k * step spanning its group, by 15 random bits (the rounding
    is unbiased to 2**-16 of a level, below float32's own rounding of the levels)."""
    numel = flat.numel()
    generator = fresh_generator(flat.device)
    levels = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    groups = math.ceil(numel / GROUP)
    low = torch.empty(groups, dtype=torch.float32, device=flat.device)
    step = torch.empty(groups, dtype=torch.float32, device=flat.device)
    chunk = chunk_elements(flat.device, GROUP)
    largest = min(numel, chunk)
    scaled_buffer = torch.empty(largest, dtype=torch.float32, device=flat.device)
    shifted_buffer = torch.empty(largest, dtype=torch.float32, device=flat.device)
    bits = torch.empty((largest + 3) // 4, dtype=torch.int64, device=flat.device)
    for start, stop, width in _group_spans(numel, chunk):
        values = flat[start:stop].view(-1, width)
        rows = slice(start // GROUP, start // GROUP + values.shape[0])
        group_low = values.amin(dim=1, keepdim=True)
        scale = values.amax(dim=1, keepdim=True) - group_low
        scale.clamp_min_(torch.finfo(torch.float32).tiny).reciprocal_().mul_(LEVELS)
        # level = floor((x - low) * scale + u), u = (r + 1/2) / 2**15 for 15 random bits r (random_
        # fills an int64 with 63: the low 15 of each quarter): uniform on [0, 1) to 2**-16. float ->
        # uint8 truncates, the floor of these non-negative values.
        noise = bits[: (stop - start + 3) // 4].random_(generator=generator).view(torch.int16)[: stop - start]
        scaled = scaled_buffer[: stop - start].copy_(noise.bitwise_and_(0x7FFF))
        scaled.mul_(2.0**-15).add_(2.0**-16)
        shifted = torch.sub(values, group_low, out=shifted_buffer[: stop - start].view(-1, width))
        scaled.view(-1, width).addcmul_(shifted, scale).clamp_(0, LEVELS)
        levels[start:stop].copy_(noise.copy_(scaled))  # float -> uint8 through int16: 5x faster on CPU
        low[rows] = group_low.view(-1)
        step[rows] = scale.reciprocal_().view(-1)
    return levels, low, step


def _from_int8(levels: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    numel = levels.numel()
    out = torch.empty(numel, dtype=torch.float32, device=levels.device)
    for start, stop, width in _group_spans(numel, chunk_elements(levels.device, GROUP)):
        rows = slice(start // GROUP, start // GROUP + (stop - start) // width)
        values = out[start:stop].copy_(levels[start:stop]).view(-1, width)
        values.mul_(step[rows, None]).add_(low[rows, None])
    return out


def _group_spans(numel: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, group width) of the spans of whole groups in each chunk of `chunk` elements,
    then of the last, partial group."""
    whole = numel - numel % GROUP
    for start, stop in spans(whole, chunk):
        yield start, stop, GROUP
    if whole < numel:
        yield whole, numel, numel - whole
