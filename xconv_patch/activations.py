"""Activations that keep a packed 1-bit mask for backward instead of a full tensor.

A conv's input is usually a ReLU output, which nn.ReLU keeps for its own backward: unless that
ReLU keeps less, replacing the conv frees nothing (DESIGN.md section 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes holding 8 elements each."""
    flat = mask.reshape(-1)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 8).to(torch.uint8)
    return (flat * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of pack_mask, as a bool tensor of the given shape."""
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[: shape.numel()].reshape(shape)


class _ClampFunction(torch.autograd.Function):
    """clamp(x, lower, upper) whose gradient mask (lower < x < upper) is kept as bits."""

    @staticmethod
    def forward(ctx, x, lower: float, upper: float | None, inplace: bool):
        mask = x > lower if upper is None else (x > lower) & (x < upper)
        ctx.packed_shape = x.shape
        ctx.save_for_backward(pack_mask(mask))
        if upper is None:
            output = torch.relu_(x) if inplace else torch.relu(x)
        else:
            output = F.hardtanh(x, lower, upper, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        mask = unpack_mask(packed, ctx.packed_shape)
        return grad_output * mask, None, None, None


def _clamp(x: torch.Tensor, lower: float, upper: float | None, inplace: bool) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return None
    return _ClampFunction.apply(x, lower, upper, inplace)


class BitReLU(nn.ReLU):
    """nn.ReLU that keeps 1 bit per element for backward (1/32 of float32)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = _clamp(input, 0.0, None, self.inplace)
        return super().forward(input) if output is None else output


class BitHardtanh(nn.Hardtanh):
    """nn.Hardtanh that keeps 1 bit per element for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = _clamp(input, self.min_val, self.max_val, self.inplace)
        return super().forward(input) if output is None else output


class BitReLU6(nn.ReLU6):
    """nn.ReLU6 that keeps 1 bit per element for backward."""

    forward = BitHardtanh.forward


BIT_ACTIVATIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: BitReLU,
    nn.ReLU6: BitReLU6,
    nn.Hardtanh: BitHardtanh,
}


def bit_activation(module: nn.Module) -> nn.Module:
    """The 1-bit-mask twin of a ReLU, ReLU6 or Hardtanh module, sharing its attributes."""
    bit_class = BIT_ACTIVATIONS[type(module)]
    twin = bit_class.__new__(bit_class)
    twin.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()})
    return twin
