"""Bool tensors packed 8 elements to a byte, and bytes expanded back through a table of all 256."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A bool tensor as uint8 bytes holding 8 elements each, in the tensor's logical order (into
    `out` when given)."""
    flat = mask.reshape(-1).view(torch.uint8)
    words = (F.pad(flat, (0, -flat.numel() % 8)) if flat.numel() % 8 else flat).view(torch.int64)
    # Each byte of a word is 0 or 1; on a little-endian machine (byte i of memory is the word's
    # i-th lowest), OR-ing in the word shifted right by 7, 14 and 28 bits gathers byte i's bit into
    # bit i of the lowest byte (no carries: no two bytes land on one bit). Copied into `out`, the
    # cast to uint8 keeps the lowest byte (8x faster than gathering it); else it is read through a
    # view: under torch.compile, `.to` in setup_context recurses.
    words = words | words >> 7
    words |= words >> 14
    words |= words >> 28
    return words.view(torch.uint8).view(-1, 8)[:, 0].contiguous() if out is None else out.copy_(words)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_mask, as a bool tensor of the given shape."""
    bits = packed.unsqueeze(1).bitwise_right_shift(_bit_shifts(packed.device)).bitwise_and_(1)
    numel = torch.Size(shape).numel()
    return bits.view(torch.bool).view(-1)[:numel].view(shape)


_BYTE_TABLES: dict[tuple[torch.device, torch.dtype, float, float], torch.Tensor] = {}


def byte_table(set_value: float, unset_value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row b holds the 8 bits of byte b as set_value or unset_value: (256, 8), cached per arguments.

    Only real tensors are cached: a table made under FakeTensorMode, on the meta device or as an
    inference tensor would poison later real calls, so those are rebuilt each time.
    """
    key = (device, dtype, set_value, unset_value)
    table = _BYTE_TABLES.get(key)
    if table is None:
        bits = unpack_mask(torch.arange(256, dtype=torch.uint8, device=device), (256, 8))
        table = bits.to(dtype).mul_(set_value - unset_value).add_(unset_value)
        if type(table) is torch.Tensor and not table.is_meta and not table.is_inference():
            _BYTE_TABLES[key] = table
    return table


def expand_bytes(table: torch.Tensor, data: torch.Tensor, numel: int) -> torch.Tensor:
    """The first `numel` bits of `data` (bytes as uint8 or int32), each as its value in `table`: one
    lookup per byte, where unpacking bit by bit takes several passes."""
    indices = data if data.dtype == torch.int32 else data.int()
    return table.index_select(0, indices).view(-1)[:numel]
