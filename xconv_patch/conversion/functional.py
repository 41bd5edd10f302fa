"""Functional convolutions under torch.fx: the tracer convert() uses, and the call that replaces
F.conv2d (and its kin) when the user opts in to rewriting the forward."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from ..layers import XCONV_CLASSES, XConvMixin
from ..probes import ProbeSpec
from .saved_tensors import CONV_FUNCTIONS, CONV_PARAMETERS, CONV_TRANSPOSE_PARAMETERS, torch_activation


def probed_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    output_padding: int | Sequence[int] = 0,
    *,
    op: str,
    probes: int,
    probe: str = "rademacher",
    per_sample: bool = True,
    deflate: bool = True,
) -> torch.Tensor:
    """F.<op> (conv2d, conv_transpose3d, ...) with the XConv weight-gradient estimator: what a
    forward rewritten by convert() calls in place of a functional convolution.

    It runs an XConv layer with `weight` and `bias` swapped in; the layer is built on the meta
    device once per geometry and thread (functional_call swaps parameters on the layer itself).
    """
    layer = _meta_layer(
        threading.get_ident(), op, tuple(weight.shape), bias is not None, _hashable(stride), _hashable(padding),
        _hashable(dilation), groups, _hashable(output_padding), ProbeSpec(probes, probe, per_sample, deflate),
    )
    parameters = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(layer, parameters, (input,))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=256)
def _meta_layer(
    thread: int, op: str, weight_shape: tuple[int, ...], bias: bool, stride: Any, padding: Any, dilation: Any,
    groups: int, output_padding: Any, spec: ProbeSpec,
) -> XConvMixin:
    rank = len(weight_shape) - 2
    if op.startswith("conv_transpose"):
        torch_type, extra = getattr(nn, f"ConvTranspose{rank}d"), {"output_padding": output_padding}
        channels = (weight_shape[0], weight_shape[1] * groups)
    else:
        torch_type, extra = getattr(nn, f"Conv{rank}d"), {}
        channels = (weight_shape[1] * groups, weight_shape[0])
    return XCONV_CLASSES[torch_type](
        *channels, weight_shape[2:], stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
        device="meta", probes=spec.probes, probe=spec.probe, per_sample=spec.per_sample, deflate=spec.deflate,
        **extra,
    )


def conv_arguments(node: fx.Node) -> dict[str, Any]:
    """A functional convolution's arguments by name."""
    _, transposed = CONV_FUNCTIONS[node.target]
    parameters = CONV_TRANSPOSE_PARAMETERS if transposed else CONV_PARAMETERS
    return {**dict(zip(parameters, node.args, strict=False)), **node.kwargs}


class ConvTracer(fx.Tracer):
    """Keeps every convolution module (torch's, XConv's, a user's subclass), activation module and
    probed_conv call a leaf. Rewritten GraphModules carry it, so they reload after torch.save."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(probed_conv,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            isinstance(module, _ConvNd)
            or torch_activation(module) is not None
            or super().is_leaf_module(module, qualified_name)
        )
