"""xconv-patch: low-memory stochastic backpropagation for convolutional layers."""

from importlib.metadata import PackageNotFoundError, version

from .activations import BitHardtanh, BitReLU, BitReLU6
from .layers import (
    XConv1d,
    XConv2d,
    XConv3d,
    XConvMixin,
    XConvTranspose1d,
    XConvTranspose2d,
    XConvTranspose3d,
)
from .probes import PROBE_KINDS, ProbeSpec, restart_probe_stream

try:
    __version__ = version("xconv-patch")
except PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = [
    "PROBE_KINDS",
    "BitHardtanh",
    "BitReLU",
    "BitReLU6",
    "ProbeSpec",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XConvMixin",
    "XConvTranspose1d",
    "XConvTranspose2d",
    "XConvTranspose3d",
    "restart_probe_stream",
]
