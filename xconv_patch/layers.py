"""XConv layers: torch's convolution classes with a low-memory, probed weight gradient."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .estimator import Geometry, XConvFunction
from .probes import SEEDS, ProbeSpec

DEFAULT_PROBES = 8
DEFAULT_PROBE = "rademacher"

ConvT = TypeVar("ConvT", bound="XConvMixin")


class XConvMixin:
    """Shared behaviour of every XConv layer; combined with a torch convolution class."""

    probes: int
    probe: str
    per_sample: bool
    deflate: bool

    def __init__(
        self,
        *args,
        probes: int = DEFAULT_PROBES,
        probe: str = DEFAULT_PROBE,
        per_sample: bool = True,
        deflate: bool = True,
        **kwargs,
    ) -> None:
        """Takes the torch class's arguments plus the estimator's: probes (0 = exact), the probe
        kind ('rademacher', 'gaussian', 'orthogonal'), per_sample and deflate (see ProbeSpec)."""
        super().__init__(*args, **kwargs)
        self._set_estimator(probes, probe, per_sample, deflate)

    def _set_estimator(self, probes: int, probe: str, per_sample: bool, deflate: bool) -> None:
        self.probe_spec = ProbeSpec(probes, probe, per_sample, deflate)
        self.probes, self.probe, self.per_sample, self.deflate = probes, probe, per_sample, deflate

    def extra_repr(self) -> str:
        estimator = f"probes={self.probes}"
        if self.probes:
            estimator += f", probe={self.probe!r}, per_sample={self.per_sample}, deflate={self.deflate}"
        return f"{super().extra_repr()}, {estimator}"

    @classmethod
    def from_conv(
        cls: type[ConvT],
        conv: nn.modules.conv._ConvNd,
        probes: int = DEFAULT_PROBES,
        probe: str = DEFAULT_PROBE,
        per_sample: bool = True,
        deflate: bool = True,
    ) -> ConvT:
        """An XConv layer around the same Parameter objects, hooks and attributes as `conv`."""
        if not isinstance(conv, _torch_base(cls)):
            raise TypeError(f"{cls.__name__}.from_conv needs a {_torch_base(cls).__name__}, got {type(conv).__name__}")
        layer = copy.copy(conv)
        for name, value in vars(layer).items():
            if isinstance(value, (dict, set, list)):
                setattr(layer, name, copy.copy(value))
        layer.__class__ = xconv_class(type(conv))
        layer._set_estimator(probes, probe, per_sample, deflate)
        return layer

    def _needs_estimate(self, input: torch.Tensor) -> bool:
        return self.probes > 0 and torch.is_grad_enabled() and (self.weight.requires_grad or input.requires_grad)

    def _xconv(self, input: torch.Tensor, output_padding: tuple[int, ...]) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * len(self.kernel_size)
        elif padding == "valid":
            padding = (0,) * len(self.kernel_size)
        elif padding == "same":
            input, padding = _same_padding(input, self.kernel_size, self.dilation)
        geometry = Geometry(
            tuple(self.stride), tuple(padding), tuple(self.dilation), self.transposed,
            tuple(output_padding), self.groups,
        )
        return _apply(input, self.weight, self.bias, geometry, self.probe_spec if self.weight.requires_grad else None)


@torch.compiler.disable
def _apply(input, weight, bias, geometry: Geometry, spec: ProbeSpec | None) -> torch.Tensor:
    """Runs eagerly under torch.compile so every call draws a fresh probe seed."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        return XConvFunction.apply(input, weight, bias, geometry, spec, SEEDS.next_seed() if spec else 0)


def _same_padding(input: torch.Tensor, kernel_size, dilation) -> tuple[torch.Tensor, tuple[int, ...]]:
    """'same' padding as torch computes it: symmetric part in the conv, the odd remainder padded first."""
    symmetric, extra = [], []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        symmetric.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        pad = []
        for remainder in reversed(extra):
            pad += [0, remainder]
        input = F.pad(input, pad)
    return input, tuple(symmetric)


class _XConvNd(XConvMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._needs_estimate(input):
            return super().forward(input)
        return self._xconv(input, (0,) * len(self.kernel_size))


class _XConvTransposeNd(XConvMixin):
    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self._needs_estimate(input):
            return super().forward(input, output_size)
        spatial = len(self.kernel_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, spatial, self.dilation
        )
        return self._xconv(input, output_padding)




class XConv1d(_XConvNd, nn.Conv1d):
    """nn.Conv1d whose backward keeps a probe projection of the input instead of the input."""


class XConv2d(_XConvNd, nn.Conv2d):
    """nn.Conv2d whose backward keeps a probe projection of the input instead of the input."""


class XConv3d(_XConvNd, nn.Conv3d):
    """nn.Conv3d whose backward keeps a probe projection of the input instead of the input."""


class XConvTranspose1d(_XConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d whose backward keeps a probe projection of the input."""


class XConvTranspose2d(_XConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose backward keeps a probe projection of the input."""


class XConvTranspose3d(_XConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d whose backward keeps a probe projection of the input."""


XCONV_CLASSES: dict[type[nn.Module], type[XConvMixin]] = {
    nn.Conv1d: XConv1d,
    nn.Conv2d: XConv2d,
    nn.Conv3d: XConv3d,
    nn.ConvTranspose1d: XConvTranspose1d,
    nn.ConvTranspose2d: XConvTranspose2d,
    nn.ConvTranspose3d: XConvTranspose3d,
}


def _torch_base(cls: type) -> type[nn.Module]:
    """The torch convolution class an XConv class (or a user's conv subclass) derives from."""
    for base in cls.__mro__:
        if base in XCONV_CLASSES:
            return base
    raise TypeError(f"{cls.__name__} is not a torch convolution class")


_SUBCLASSES: dict[type[nn.Module], type[XConvMixin]] = {}


def xconv_class(conv_class: type[nn.Module]) -> type[XConvMixin]:
    """The XConv class for a torch conv class; a user's subclass keeps its class via a mixin."""
    if issubclass(conv_class, XConvMixin):
        return conv_class
    if conv_class in XCONV_CLASSES:
        return XCONV_CLASSES[conv_class]
    if conv_class not in _SUBCLASSES:
        xconv_base = XCONV_CLASSES[_torch_base(conv_class)]
        mixin = _XConvTransposeNd if issubclass(xconv_base, _XConvTransposeNd) else _XConvNd
        _SUBCLASSES[conv_class] = type(f"X{conv_class.__name__}", (mixin, conv_class), {"__module__": __name__})
    return _SUBCLASSES[conv_class]


def torch_class(xconv: type[nn.Module]) -> type[nn.Module]:
    """The class an XConv layer was made from: torch's own, or the user's subclass."""
    for base in xconv.__mro__:
        if not issubclass(base, XConvMixin) and issubclass(base, nn.modules.conv._ConvNd):
            return base
    raise TypeError(f"{xconv.__name__} is not an XConv class")
