"""XConv layers: torch's convolution classes with a low-memory, probed weight gradient."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .estimator import Geometry, XConvFunction
from .probes import DEFAULT_PROBES, SEEDS, ProbeSpec
from .retype import retyped

DEFAULT_PROBE = "rademacher"

ConvT = TypeVar("ConvT", bound="XConvMixin")


class _SpecField:
    """A layer attribute held in the layer's ProbeSpec, so that setting it validates it again."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, layer: XConvMixin | None, owner: type | None = None):
        return self if layer is None else getattr(layer.probe_spec, self.field)

    def __set__(self, layer: XConvMixin, value) -> None:
        layer.probe_spec = dataclasses.replace(layer.probe_spec, **{self.field: value})


class XConvMixin:
    """Shared behaviour of every XConv layer; combined with a torch convolution class."""

    probe_spec: ProbeSpec
    probes = _SpecField("probes")
    probe = _SpecField("probe")
    per_sample = _SpecField("per_sample")
    deflate = _SpecField("deflate")

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
        self.probe_spec = ProbeSpec(probes, probe, per_sample, deflate)

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
        layer = retyped(conv, xconv_class(type(conv)))
        layer.probe_spec = ProbeSpec(probes, probe, per_sample, deflate)
        return layer

    def _uses_xconv(self, input: torch.Tensor) -> bool:
        """Whether autograd records this call: otherwise (no_grad, inference, probes=0) torch's layer runs."""
        if self.probes == 0 or not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad for t in (input, self.weight, self.bias))

    def _xconv(self, input: torch.Tensor, output_padding: tuple[int, ...]) -> torch.Tensor:
        rank = len(self.kernel_size)
        if input.dim() == rank + 1:  # unbatched, as torch's layers accept it: a batch of one
            return self._xconv(input.unsqueeze(0), output_padding).squeeze(0)
        padding, pad, pad_mode = self.padding, (), "constant"
        if self.padding_mode != "zeros":
            padding, pad, pad_mode = (0,) * rank, tuple(self._reversed_padding_repeated_twice), self.padding_mode
        elif padding == "valid":
            padding = (0,) * rank
        elif padding == "same":
            padding, pad = _same_padding(self.kernel_size, self.dilation)
        geometry = Geometry(
            tuple(self.stride), tuple(padding), tuple(self.dilation), self.transposed,
            tuple(output_padding), self.groups, pad, pad_mode,
        )
        return _apply(input, self.weight, self.bias, geometry, self.probe_spec if self.weight.requires_grad else None)


def _autocast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The cast autocast applies to a conv argument: floating point other than float64 only."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _apply(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry, spec: ProbeSpec | None
) -> torch.Tensor:
    """Runs eagerly under torch.compile so every call draws a fresh probe seed."""
    if torch.compiler.is_compiling():
        return _eager_apply()(input, weight, bias, geometry, spec)
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "XConv layers do not support torch.func transforms (their weight gradient is a random "
            "estimate drawn per call): set probes=0 on the layer, or use xconv_patch.revert(model)"
        )
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast(t, dtype) for t in (input, weight, bias))
    with torch.autocast(device_type, enabled=False):
        return XConvFunction.apply(input, weight, bias, geometry, spec, SEEDS.next_seed() if spec is not None else 0)


_eager: list[Callable[..., torch.Tensor]] = []


def _eager_apply() -> Callable[..., torch.Tensor]:
    """_apply excluded from torch.compile, made on first use: torch.compiler.disable imports
    torch._dynamo (about 1.5 s), which importing the layers must not. (Not functools.cache:
    dynamo warns that it traces through the cache.)"""
    if not _eager:
        _eager.append(torch.compiler.disable(_apply))
    return _eager[0]


def _same_padding(kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'same' padding as aten computes it: the symmetric part for the conv, and an F.pad of the
    odd remainder on the high side (empty when the padding is symmetric)."""
    symmetric, remainder = [], []
    for k, d in zip(kernel_size, dilation, strict=True):
        total = d * (k - 1)
        symmetric.append(total // 2)
        remainder.append(total % 2)
    pad = tuple(p for r in reversed(remainder) for p in (0, r)) if any(remainder) else ()
    return tuple(symmetric), pad


class _XConvNd(XConvMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._uses_xconv(input):
            return super().forward(input)
        return self._xconv(input, (0,) * len(self.kernel_size))


class _XConvTransposeNd(XConvMixin):
    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self._uses_xconv(input):
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
        _SUBCLASSES[conv_class] = type(
            f"X{conv_class.__name__}", (mixin, conv_class), {"__module__": __name__, "__reduce_ex__": _reduce_subclass}
        )
    return _SUBCLASSES[conv_class]


def _reduce_subclass(layer: XConvMixin, protocol: int):
    """Pickles a layer of a class made by xconv_class through the user's class, which pickle can find."""
    return _new_subclass_layer, (torch_class(type(layer)),), layer.__getstate__()


def _new_subclass_layer(conv_class: type[nn.Module]) -> XConvMixin:
    xconv = xconv_class(conv_class)
    return xconv.__new__(xconv)


def torch_class(xconv: type[nn.Module]) -> type[nn.Module]:
    """The class an XConv layer was made from: torch's own, or the user's subclass."""
    for base in xconv.__mro__:
        if not issubclass(base, XConvMixin) and issubclass(base, nn.modules.conv._ConvNd):
            return base
    raise TypeError(f"{xconv.__name__} is not an XConv class")
