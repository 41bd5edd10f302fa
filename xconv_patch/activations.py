"""Activations that keep a packed 1-bit mask for backward instead of a full tensor.

A conv's input is usually a ReLU output, which nn.ReLU keeps for its own backward: unless that
ReLU keeps less, replacing the conv frees nothing (DESIGN.md section 2). And an activation replayed
from a compressed norm input would pick its gradient's branch from the replayed value, which moves
near zero: a mask of the forward's branches keeps it where it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bits import byte_table, expand_bytes, pack_mask, unpack_mask
from .chunks import chunk_elements, spans
from .recompute import untracked
from .retype import retyped

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


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """values != 0: eagerly as a cast to bool, 8x faster on a CPU than the comparison, whose bool
    output is not vectorised (under torch.compile, where `.bool()` in setup_context recurses, the
    comparison, which inductor fuses anyway)."""
    return values != 0 if torch.compiler.is_compiling() else values.bool()


def _small_integer(bound: float) -> bool:
    """Whether every float dtype (bfloat16 and float16 included) holds the bound exactly."""
    return float(bound).is_integer() and abs(bound) <= 256


def _passes(values: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Where the gradient passes a hardtanh with this output: strictly between the bounds, or NaN (as
    in torch's relu). With small integer bounds (ReLU6's, Hardtanh's default), which every float
    dtype holds exactly, a difference is zero exactly at its bound: two subtractions tested for zero
    are 4x faster on a CPU than two comparisons."""
    if _small_integer(lower) and _small_integer(upper):
        return _nonzero(values - lower).logical_and_(_nonzero(values - upper))
    return ((values <= lower) | (values >= upper)).logical_not_()


def _positive(values: torch.Tensor) -> torch.Tensor:
    """Where leaky_relu's gradient passes unscaled (NaN takes the slope, as in torch's leaky_relu)."""
    return values > 0


Predicate = Callable[[torch.Tensor], torch.Tensor]
Select = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SelectInto = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
ByteTable = Callable[[torch.Tensor], torch.Tensor]


def _packed(in_order: torch.Tensor, predicate: Predicate) -> torch.Tensor:
    """pack_mask(predicate(in_order)), chunk by chunk when the tensor is dense."""
    if not _chunkable(in_order):
        return pack_mask(predicate(in_order))
    flat = in_order.reshape(-1)
    packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=flat.device)
    for start, stop in spans(flat.numel(), chunk_elements(flat.device, 8)):
        pack_mask(predicate(flat[start:stop]), out=packed[start // 8 : -(-stop // 8)])
    return packed


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dimensions from outermost to innermost in memory (identity for contiguous tensors)."""
    return sorted(range(tensor.dim()), key=tensor.stride, reverse=True)


def _save_mask(ctx, values: torch.Tensor, output: torch.Tensor, predicate: Predicate) -> None:
    """Saves predicate(values) packed in the output's memory order, so that the gradient gets the
    output's layout (channels_last stays channels_last, as with torch's own activations)."""
    order = _memory_order(output)
    with untracked():  # the mask is kept as it is: nothing to record for a replay
        in_order = values.permute(order)
        packed = _packed(in_order, predicate)
    ctx.order, ctx.packed_shape = order, in_order.shape
    ctx.save_for_backward(packed)


def _masked_backward(
    ctx, grad_output: torch.Tensor, select: Select, select_into: SelectInto, table: ByteTable
) -> torch.Tensor:
    """The input gradient from the saved mask: select(grad_output, mask), differentiable; or, when
    autograd does not record and the gradient is dense, select_into(gradient, expanded mask, out) a
    cache-sized chunk at a time, the mask expanded through the byte table `table(grad_output)`."""
    (packed,) = ctx.saved_tensors
    inverse = sorted(range(len(ctx.order)), key=ctx.order.__getitem__)
    in_order = grad_output.permute(ctx.order)
    if torch.is_grad_enabled() or not _chunkable(in_order):
        return select(grad_output, unpack_mask(packed, ctx.packed_shape).permute(inverse))
    flat = in_order.reshape(-1)
    gradient = torch.empty_like(flat)
    expanded_mask = table(grad_output)
    for start, stop in spans(flat.numel(), chunk_elements(flat.device, 8)):
        mask = expand_bytes(expanded_mask, packed[start // 8 : -(-stop // 8)], stop - start)
        select_into(flat[start:stop], mask, gradient[start:stop])
    return gradient.view(ctx.packed_shape).permute(inverse)


def _pass_or_zero(gradient: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    return torch.where(passes, gradient, 0)


def _pass_or_zero_into(gradient: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> None:
    """The gradient's bits AND-ed with all ones where it passes (vectorised where torch's CPU select
    is not)."""
    torch.bitwise_and(gradient.view(keep.dtype), keep, out=out.view(keep.dtype))


def _all_ones_where_set(gradient: torch.Tensor) -> torch.Tensor:
    """Bytes to integers of the gradient's width: all ones for a set bit, zero for a clear one."""
    return byte_table(-1, 0, _SAME_WIDTH_INTEGER[gradient.element_size()], gradient.device)


def _one_where_set(gradient: torch.Tensor) -> torch.Tensor:
    """Bytes to the gradient's dtype: one for a set bit, zero for a clear one."""
    return byte_table(1, 0, gradient.dtype, gradient.device)


def _slope_or_pass(gradient: torch.Tensor, positive: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.ops.aten.leaky_relu_backward(gradient, positive.to(gradient.dtype), slope, False)


def _slope_or_pass_into(gradient: torch.Tensor, positive: torch.Tensor, out: torch.Tensor, slope: float) -> None:
    """torch's leaky_relu_backward with the mask, as ones and zeros, standing in for the input."""
    torch.ops.aten.leaky_relu_backward.grad_input(gradient, positive, slope, False, grad_input=out)


class _ClampFunction(torch.autograd.Function):
    """clamp(x, lower, upper) whose gradient mask is kept as bits.

    The mask follows torch's threshold rule: the gradient passes unless the input is <= lower or
    >= upper, so values exactly at a threshold block it and NaN inputs pass it (as in torch's
    relu; its hardtanh CPU kernel blocks NaN in the vectorised loop only). It is read off the
    output, which is at a threshold exactly where the input is at or beyond it, so in-place calls
    need nothing of the input. Backward is a differentiable torch.where, so double backward works
    as for nn.ReLU; the setup_context form and the vmap rule (elementwise: the batched tensor goes
    through whole) serve torch.func transforms.
    """

    @staticmethod
    def forward(x: torch.Tensor, lower: float, upper: float | None, inplace: bool) -> torch.Tensor:
        if upper is None:
            return torch.relu_(x) if inplace else torch.relu(x)
        return F.hardtanh(x, lower, upper, inplace=inplace)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, lower, upper, inplace = inputs
        # A ReLU's output is zero exactly where its input is at most zero (NaN passes, as in torch's).
        predicate = _nonzero if upper is None else functools.partial(_passes, lower=lower, upper=upper)
        _save_mask(ctx, output, output, predicate)
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        gradient = _masked_backward(ctx, grad_output, _pass_or_zero, _pass_or_zero_into, _all_ones_where_set)
        return gradient, None, None, None

    @staticmethod
    def vmap(info, in_dims: tuple, x: torch.Tensor, lower: float, upper: float | None, inplace: bool):
        return _ClampFunction.apply(x, lower, upper, inplace), in_dims[0]


class _LeakyFunction(torch.autograd.Function):
    """leaky_relu(x, slope) whose branch mask (x > 0) is kept as bits.

    Backward is torch's own leaky_relu_backward with the unpacked mask standing in for the input, so
    the gradient is torch's bit for bit and double backward and torch.func work as for
    nn.LeakyReLU. The mask is read off the output where that has the input's sign (slope >= 0,
    in-place calls included), else off the input.
    """

    @staticmethod
    def forward(x: torch.Tensor, slope: float, inplace: bool) -> torch.Tensor:
        return F.leaky_relu(x, slope, inplace=inplace)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, slope, inplace = inputs
        _save_mask(ctx, output if slope >= 0 else x, output, _positive)
        ctx.slope = slope
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        select = functools.partial(_slope_or_pass, slope=ctx.slope)
        select_into = functools.partial(_slope_or_pass_into, slope=ctx.slope)
        return _masked_backward(ctx, grad_output, select, select_into, _one_where_set), None, None

    @staticmethod
    def vmap(info, in_dims: tuple, x: torch.Tensor, slope: float, inplace: bool):
        return _LeakyFunction.apply(x, slope, inplace), in_dims[0]


def _records(x: torch.Tensor) -> bool:
    """Whether autograd records a call on x; where it does not, torch's own op runs and keeps nothing."""
    return torch.is_grad_enabled() and x.requires_grad


class BitReLU(nn.ReLU):
    """nn.ReLU that keeps 1 bit per element for backward (1/32 of float32)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _records(input):
            return super().forward(input)
        return _ClampFunction.apply(input, 0.0, None, self.inplace)


class BitHardtanh(nn.Hardtanh):
    """nn.Hardtanh that keeps 1 bit per element for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _records(input):
            return super().forward(input)
        return _ClampFunction.apply(input, self.min_val, self.max_val, self.inplace)


class BitReLU6(BitHardtanh, nn.ReLU6):
    """nn.ReLU6 that keeps 1 bit per element for backward."""


class BitLeakyReLU(nn.LeakyReLU):
    """nn.LeakyReLU that keeps 1 bit per element for backward instead of its input.

    In place with a negative slope, torch's op runs (its backward rejects that case, as here).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _records(input) or (self.inplace and self.negative_slope < 0):
            return super().forward(input)
        return _LeakyFunction.apply(input, self.negative_slope, self.inplace)


BIT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: BitReLU,
    nn.ReLU6: BitReLU6,
    nn.Hardtanh: BitHardtanh,
    nn.LeakyReLU: BitLeakyReLU,
}


def bit_activation(module: nn.Module) -> nn.Module:
    """The 1-bit-mask twin of a ReLU, ReLU6, Hardtanh or LeakyReLU module, sharing its attributes."""
    return retyped(module, BIT_ACTIVATIONS[type(module)])
