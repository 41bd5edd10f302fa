"""The XConv autograd function: exact forward and input gradient, probed weight gradient.

One implementation serves every spatial rank and both directions (convolution and transposed
convolution); torch's own convolution kernels do all the geometry (DESIGN.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .probes import ProbeSpec


@dataclass(frozen=True)
class Geometry:
    """The arguments of aten.convolution, with padding already reduced to symmetric integers."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    def convolution(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.aten.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, self.groups,
        )

    def backward(
        self,
        grad_output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        bias_sizes = [weight.shape[1] * groups if self.transposed else weight.shape[0]]
        return torch.ops.aten.convolution_backward(
            grad_output, x, weight, bias_sizes, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, groups, list(mask),
        )


def _placeholder(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tensor of the given shape that owns one element: kernels read only its size."""
    return like.new_empty(1).expand(shape)


class XConvFunction(torch.autograd.Function):
    """y = conv(x, W, b); backward keeps only a probe projection of x and a seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: Geometry, spec: ProbeSpec | None, seed: int):
        output = geometry.convolution(x, weight, bias)
        ctx.geometry, ctx.spec, ctx.seed = geometry, spec, seed
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        projection = None
        if spec is not None and ctx.needs_input_grad[1]:
            basis, weights = spec.basis(x.shape[0], x.shape[2:], x.dtype, x.device, seed)
            projection = torch.matmul(x.flatten(2), basis.flatten(2).transpose(1, 2)) * weights
        ctx.save_for_backward(weight, projection)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        weight, projection = ctx.saved_tensors
        geometry: Geometry = ctx.geometry
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = grad_bias = grad_weight = None
        if needs_input or (needs_bias and ctx.has_bias):
            grad_input, _, grad_bias = geometry.backward(
                grad_output, _placeholder(grad_output, ctx.input_shape), weight, geometry.groups,
                (needs_input, False, needs_bias and ctx.has_bias),
            )
        if needs_weight:
            grad_weight = _probed_weight_grad(ctx, grad_output, projection, weight)
        return grad_input, grad_weight, grad_bias, None, None, None


def _probed_weight_grad(ctx, grad_output: torch.Tensor, projection: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dW ~= sum_b sum_j projection[b, c, j] * G[b, o, j, k] (DESIGN.md section 1).

    G is the weight gradient of each probe image against each sample's output gradient: one
    convolution_backward over a single "sample" whose channels are (sample, probe) pairs.
    """
    geometry: Geometry = ctx.geometry
    spec: ProbeSpec = ctx.spec
    batch, spatial = ctx.input_shape[0], ctx.input_shape[2:]
    basis, _ = spec.basis(batch, spatial, grad_output.dtype, grad_output.device, ctx.seed)
    samples, probes = basis.shape[:2]
    out_channels = grad_output.shape[1]
    kernel = weight.shape[2:]
    probe_images = basis.reshape(1, samples * probes, *spatial)
    stacked_grad = grad_output.reshape(1, batch * out_channels, *grad_output.shape[2:])
    if geometry.transposed:
        probe_weight_shape = (samples * probes, batch * out_channels // samples, *kernel)
    else:
        probe_weight_shape = (batch * out_channels, probes, *kernel)
    _, per_probe, _ = geometry.backward(
        stacked_grad, probe_images, _placeholder(grad_output, probe_weight_shape), samples,
        (False, True, False),
    )
    if geometry.transposed:
        per_probe = per_probe.reshape(samples, probes, batch // samples, out_channels, -1)
        per_probe = per_probe.permute(0, 2, 3, 1, 4)
    per_probe = per_probe.reshape(batch, out_channels, probes, -1)

    groups = geometry.groups
    in_channels = projection.shape[1]
    projection = projection.to(per_probe.dtype).reshape(batch, groups, in_channels // groups, probes)
    per_probe = per_probe.reshape(batch, groups, out_channels // groups, probes, -1)
    if geometry.transposed:
        grad = torch.einsum("bgcj,bgojk->gcok", projection, per_probe)
    else:
        grad = torch.einsum("bgcj,bgojk->gock", projection, per_probe)
    return grad.reshape(weight.shape).to(weight.dtype)
