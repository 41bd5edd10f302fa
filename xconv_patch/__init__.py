"""xconv-patch: low-memory stochastic backpropagation for convolutional layers."""

from importlib.metadata import PackageNotFoundError, version

from .activations import BitHardtanh, BitReLU, BitReLU6
from .batchnorm import recalibrate_bn, set_bn_momentum
from .convert import convert, plan, revert
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
from .profiling import ProfileSpec, measure_memory, predict_memory, profile
from .recipe import Recipe, RecipeError, load_recipe, shipped_recipes
from .report import ConversionReport

try:
    __version__ = version("xconv-patch")
except PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = [
    "PROBE_KINDS",
    "BitHardtanh",
    "BitReLU",
    "BitReLU6",
    "ConversionReport",
    "ProbeSpec",
    "ProfileSpec",
    "Recipe",
    "RecipeError",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XConvMixin",
    "XConvTranspose1d",
    "XConvTranspose2d",
    "XConvTranspose3d",
    "convert",
    "load_recipe",
    "measure_memory",
    "plan",
    "predict_memory",
    "profile",
    "recalibrate_bn",
    "restart_probe_stream",
    "revert",
    "set_bn_momentum",
    "shipped_recipes",
]
