"""Activations that keep a packed 1-bit mask for backward instead of a full tensor.

A conv's input is usually a ReLU output, which nn.ReLU keeps for its own backward: unless that
ReLU keeps less, replacing the conv frees nothing (DESIGN.md section 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .chunks import chunk_elements, spans
from .retype import retyped


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes holding 8 elements each, in the tensor's logical order."""
    flat = mask.reshape(-1).view(torch.uint8)
    words = F.pad(flat, (0, -flat.numel() % 8)).view(torch.int64)
    # Each byte of a word is 0 or 1; on a little-endian machine (byte i of memory is the word's
    # i-th lowest), OR-ing in the word shifted right by 7, 14 and 28 bits gathers byte i's bit into
    # bit i of the lowest byte (no carries: no two bytes land on one bit). The lowest byte is read
    # through a view: under torch.compile, `.to` in setup_context recurses.
    words = words | words >> 7
    words = words | words >> 14
    words = words | words >> 28
    return words.view(torch.uint8).view(-1, 8)[:, 0].contiguous()


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_mask, as a bool tensor of the given shape."""
    bits = packed.unsqueeze(1).bitwise_right_shift(_bit_shifts(packed.device)).bitwise_and_(1)
    numel = torch.Size(shape).numel()
    return bits.view(torch.bool).view(-1)[:numel].view(shape)


_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _chunkable(tensor: torch.Tensor) -> bool:
    """Whether passes over `tensor` can go chunk by chunk: a dense tensor in memory order, run eagerly
    (not a torch.func wrapper; under torch.compile the whole-tensor ops are traced and fused)."""
    return (
        not torch.compiler.is_compiling()
        and tensor.layout == torch.strided
        and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        and tensor.is_contiguous()
    )


def _passes(values: torch.Tensor, lower: float, upper: float | None) -> torch.Tensor:
    """Where the gradient passes a clamp with this output (NaN passes, as in torch's relu)."""
    blocked = values <= lower if upper is None else (values <= lower) | (values >= upper)
    return blocked.logical_not_()


def _packed_passes(in_order: torch.Tensor, lower: float, upper: float | None) -> torch.Tensor:
    """pack_mask(_passes(...)) of an output permuted to its memory order, chunk by chunk when it is dense."""
    if not _chunkable(in_order):
        return pack_mask(_passes(in_order, lower, upper))
    flat = in_order.reshape(-1)
    packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=flat.device)
    for start, stop in spans(flat.numel(), chunk_elements(flat.device, 8)):
        packed[start // 8 : -(-stop // 8)] = pack_mask(_passes(flat[start:stop], lower, upper))
    return packed


def _masked_gradient(flat: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`flat` where the packed mask passes, else zero, chunk by chunk: each bit widened to an integer of
    all ones or zeros of the element's width and AND-ed with its bits (vectorised where a select is
    not, on CPU)."""
    as_integer = _SAME_WIDTH_INTEGER[flat.element_size()]
    gradient = torch.empty_like(flat)
    for start, stop in spans(flat.numel(), chunk_elements(flat.device, 8)):
        keep = unpack_mask(packed[start // 8 : -(-stop // 8)], (stop - start,)).to(as_integer).neg_()
        torch.bitwise_and(flat[start:stop].view(as_integer), keep, out=gradient[start:stop].view(as_integer))
    return gradient


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dimensions from outermost to innermost in memory (identity for contiguous tensors)."""
    return sorted(range(tensor.dim()), key=tensor.stride, reverse=True)


class _ClampFunction(torch.autograd.Function):
    """clamp(x, lower, upper) whose gradient mask is kept as bits.

    The mask follows torch's threshold rule: the gradient passes unless the input is <= lower or
    >= upper, so values exactly at a threshold block it and NaN inputs pass it (as in torch's
    relu; its hardtanh CPU kernel blocks NaN in the vectorised loop only). It is read off the
    output, which is at a threshold exactly where the input is at or beyond it, so in-place calls
    need nothing of the input. It is packed in the memory order, so a channels_last input gets a
    channels_last gradient as with torch's own activations. Backward is a differentiable
    torch.where, so double backward works as for nn.ReLU; the setup_context form and the vmap
    rule (elementwise: the batched tensor goes through whole) serve torch.func transforms.
    """

    @staticmethod
    def forward(x: torch.Tensor, lower: float, upper: float | None, inplace: bool) -> torch.Tensor:
        if upper is None:
            return torch.relu_(x) if inplace else torch.relu(x)
        return F.hardtanh(x, lower, upper, inplace=inplace)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, lower, upper, inplace = inputs
        order = _memory_order(output)
        in_memory_order = output.permute(order)
        ctx.order, ctx.packed_shape = order, in_memory_order.shape
        ctx.save_for_backward(_packed_passes(in_memory_order, lower, upper))
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (packed,) = ctx.saved_tensors
        inverse = sorted(range(len(ctx.order)), key=ctx.order.__getitem__)
        in_memory_order = grad_output.permute(ctx.order)
        if torch.is_grad_enabled() or not _chunkable(in_memory_order):
            passes = unpack_mask(packed, ctx.packed_shape).permute(inverse)
            return torch.where(passes, grad_output, 0), None, None, None
        gradient = _masked_gradient(in_memory_order.reshape(-1), packed)
        return gradient.view(ctx.packed_shape).permute(inverse), None, None, None

    @staticmethod
    def vmap(info, in_dims: tuple, x: torch.Tensor, lower: float, upper: float | None, inplace: bool):
        return _ClampFunction.apply(x, lower, upper, inplace), in_dims[0]


def _bit_clamp(x: torch.Tensor, lower: float, upper: float | None, inplace: bool) -> torch.Tensor | None:
    """The clamp through _ClampFunction when autograd records it; None: use torch's own op."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return None
    return _ClampFunction.apply(x, lower, upper, inplace)


class BitReLU(nn.ReLU):
    """nn.ReLU that keeps 1 bit per element for backward (1/32 of float32)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = _bit_clamp(input, 0.0, None, self.inplace)
        return super().forward(input) if output is None else output


class BitHardtanh(nn.Hardtanh):
    """nn.Hardtanh that keeps 1 bit per element for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = _bit_clamp(input, self.min_val, self.max_val, self.inplace)
        return super().forward(input) if output is None else output


class BitReLU6(BitHardtanh, nn.ReLU6):
    """nn.ReLU6 that keeps 1 bit per element for backward."""


BIT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: BitReLU,
    nn.ReLU6: BitReLU6,
    nn.Hardtanh: BitHardtanh,
}


def bit_activation(module: nn.Module) -> nn.Module:
    """The 1-bit-mask twin of a ReLU, ReLU6 or Hardtanh module, sharing its attributes."""
    return retyped(module, BIT_ACTIVATIONS[type(module)])
