"""xconv-patch: low-memory stochastic backpropagation for convolutional layers."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .activations import BitHardtanh, BitLeakyReLU, BitReLU, BitReLU6
from .batchnorm import recalibrate_bn, set_bn_momentum
from .checkpointing import checkpoint_blocks, find_blocks, uncheckpoint_blocks
from .conversion import (
    ConversionReport,
    MemoryBudget,
    MemoryBudgetError,
    Recipe,
    RecipeError,
    convert,
    load_recipe,
    plan,
    revert,
    shipped_recipes,
)
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

if TYPE_CHECKING:
    from .measure import ProfileSpec, measure_memory, predict_memory, profile

try:
    __version__ = version("xconv-patch")
except PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = [
    "PROBE_KINDS",
    "BitHardtanh",
    "BitLeakyReLU",
    "BitReLU",
    "BitReLU6",
    "ConversionReport",
    "MemoryBudget",
    "MemoryBudgetError",
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
    "checkpoint_blocks",
    "convert",
    "find_blocks",
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
    "uncheckpoint_blocks",
]

# The measuring package loads torch's MemTracker (and with it torch._dynamo) and FakeTensorMode:
# imported on first use (PEP 562), so `import xconv_patch` for training pays none of it.
_MEASURE_NAMES = frozenset({"ProfileSpec", "measure_memory", "predict_memory", "profile"})


def __getattr__(name: str) -> Any:
    if name in _MEASURE_NAMES:
        value = getattr(importlib.import_module(".measure", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
