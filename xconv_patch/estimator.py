"""The XConv autograd function: exact forward and input gradient, probed weight gradient.

One implementation serves every spatial rank and both directions (convolution and transposed
convolution); torch's own convolution kernels do all the geometry (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .probes import ProbeSpec


@dataclass(frozen=True)
class Geometry:
    """The arguments of aten.convolution, plus an explicit padding applied before it.

    pad and pad_mode are F.pad's arguments: padding modes other than zeros, and the odd part
    of 'same' padding, which aten.convolution's symmetric integer padding cannot express.
    """

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    pad: tuple[int, ...] = ()
    pad_mode: str = "constant"

    def convolution(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.aten.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, self.groups,
        )

    def input_grad(self, grad_output: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """The exact input gradient, as the forward pass of the adjoint convolution.

        A convolution's adjoint is the transposed convolution with the same weight and geometry
        (and vice versa). On CPU its forward kernel beat the data gradient of
        aten.convolution_backward by 1.4x for a 3x3 C = 64 layer and was no slower elsewhere.
        """
        spatial = input_shape[2:]
        output_padding = [0] * len(spatial)
        if not self.transposed:
            # The rows of the input that no output reads: the transposed convolution adds them back.
            geometry = zip(
                spatial, grad_output.shape[2:], weight.shape[2:], self.stride, self.padding, self.dilation, strict=True
            )
            for i, (size, out, kernel, stride, padding, dilation) in enumerate(geometry):
                output_padding[i] = size - ((out - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1)
        grad = torch.ops.aten.convolution(
            grad_output, weight, None, self.stride, self.padding, self.dilation,
            not self.transposed, output_padding, self.groups,
        )
        # A transposed convolution's output_padding may reach past a stride: crop what it added.
        return grad[(..., *(slice(0, size) for size in spatial))] if grad.shape[2:] != spatial else grad

    def weight_grad(
        self, grad_output: torch.Tensor, images: torch.Tensor, weight_shape: tuple[int, ...], groups: int
    ) -> torch.Tensor:
        """The weight gradient of input images against the output gradient (aten.convolution_backward)."""
        _, grad, _ = torch.ops.aten.convolution_backward(
            grad_output, images, _placeholder(grad_output, weight_shape), None, self.stride, self.padding,
            self.dilation, self.transposed, self.output_padding, groups, [False, True, False],
        )
        return grad

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, mode=self.pad_mode) if self.pad else x

    def unpad_grad(self, grad: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """The gradient with respect to the unpadded input, from the padded input's gradient.

        Runs F.pad's own backward on a one-element stand-in: the padding pullback depends only
        on shapes, so no input is kept (torch's reflect and replicate pads keep theirs).
        """
        if not self.pad:
            return grad
        with torch.enable_grad():
            stand_in = _placeholder(grad, input_shape).requires_grad_()
            (grad_input,) = torch.autograd.grad(self.pad_input(stand_in), stand_in, grad)
        return grad_input


def _placeholder(like: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A zero tensor of the given shape that owns one element: kernels read only its size."""
    return like.new_zeros(1).expand(shape)


def _grad_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout of torch's own input gradient: channels_last when the input or the weight is."""
    for memory_format, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dims and any(
            not t.is_contiguous() and t.is_contiguous(memory_format=memory_format) for t in (x, weight)
        ):
            return memory_format
    return torch.contiguous_format


_SEED_DTYPE = torch.int64


def kept_bytes(batch: int, channels: int, probes: int, itemsize: int) -> int:
    """Bytes XConvFunction keeps of one input for backward: the projection and the seed."""
    return batch * channels * probes * itemsize + _SEED_DTYPE.itemsize


def keeps_input(spec: ProbeSpec, spatial: torch.Size) -> bool:
    """Whether a layer keeps its (padded) input and computes the exact weight gradient: when it
    has no more pixels than probes, the projection would be no smaller than the input."""
    return spec.probes >= math.prod(spatial)


class XConvFunction(torch.autograd.Function):
    """y = conv(pad(x), W, b); backward keeps W, a probe projection of pad(x) and a seed.

    spec None: keep nothing derived from x (the weight gradient is not needed). An input with no
    more pixels than probes is kept whole (padded) instead, for the exact weight gradient. The
    seed is kept as a saved tensor (8 bytes), not a ctx attribute: activation checkpointing swaps
    the saved tensors for recomputed ones, and the recomputed projection comes with its own seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: Geometry, spec: ProbeSpec | None, seed: int):
        padded = geometry.pad_input(x)
        output = geometry.convolution(padded, weight, bias)
        ctx.geometry, ctx.spec = geometry, spec
        ctx.input_shape, ctx.padded_shape = x.shape, padded.shape
        ctx.grad_format = _grad_format(x, weight)
        kept = seed_tensor = None
        if spec is not None and ctx.needs_input_grad[1]:
            if keeps_input(spec, padded.shape[2:]):
                kept = padded
            else:
                basis = spec.basis(x.shape[0], padded.shape[2:], x.dtype, x.device, seed)
                kept = torch.matmul(padded.flatten(2), basis.flatten(2).transpose(1, 2))
                seed_tensor = torch.tensor(seed, dtype=_SEED_DTYPE)
        ctx.save_for_backward(weight, kept, seed_tensor)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "XConv layers have no double backward (create_graph=True): their weight gradient "
                "is a random estimate. Use probes=0 on layers that must be differentiated twice."
            )
        weight, kept, seed = ctx.saved_tensors
        geometry: Geometry = ctx.geometry
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            grad_input = geometry.input_grad(grad_output, weight, ctx.padded_shape)
            grad_input = geometry.unpad_grad(grad_input, ctx.input_shape).contiguous(memory_format=ctx.grad_format)
        if needs_weight and seed is None:  # the kept padded input
            grad_weight = geometry.weight_grad(grad_output, kept, weight.shape, geometry.groups)
        elif needs_weight:
            grad_weight = _probed_weight_grad(ctx, grad_output, kept, weight, int(seed))
        if needs_bias:
            grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
        return grad_input, grad_weight, grad_bias, None, None, None


def _probed_weight_grad(
    ctx, grad_output: torch.Tensor, projection: torch.Tensor, weight: torch.Tensor, seed: int
) -> torch.Tensor:
    """dW ~= sum_b sum_j projection[b, c, j] * G[b, o, j, k] (DESIGN.md section 1).

    G is the weight gradient of each probe image against each sample's output gradient: one
    convolution_backward over a single "sample" whose channels are (sample, probe) pairs, with
    one group per independent basis, so per-sample probes cost what shared ones do.
    """
    geometry: Geometry = ctx.geometry
    batch, spatial = ctx.padded_shape[0], ctx.padded_shape[2:]
    basis = ctx.spec.basis(batch, spatial, grad_output.dtype, grad_output.device, seed)
    samples, probes = basis.shape[:2]
    out_channels, kernel = grad_output.shape[1], weight.shape[2:]
    per_basis = batch // samples  # samples sharing one basis: all of them, or one
    if geometry.transposed:  # weight (C, Co / groups, K): G comes out as (sample, probe, b, o, k)
        probe_weight_shape = (samples * probes, per_basis * out_channels, *kernel)
    else:  # weight (Co, C / groups, K): G comes out as (sample, b, o, probe, k)
        probe_weight_shape = (batch * out_channels, probes, *kernel)
    per_probe = geometry.weight_grad(
        grad_output.reshape(1, batch * out_channels, *grad_output.shape[2:]),
        basis.reshape(1, samples * probes, *spatial),
        probe_weight_shape,
        samples,
    )
    groups = geometry.groups
    projection = projection.to(per_probe.dtype).view(samples, per_basis, groups, -1, probes)
    if geometry.transposed:
        per_probe = per_probe.reshape(samples, probes, per_basis, groups, out_channels // groups, -1)
        grad = torch.einsum("stgcj,sjtgok->gcok", projection, per_probe)
    else:
        per_probe = per_probe.reshape(samples, per_basis, groups, out_channels // groups, probes, -1)
        grad = torch.einsum("stgcj,stgojk->gock", projection, per_probe)
    return grad.reshape(weight.shape).to(weight.dtype)
