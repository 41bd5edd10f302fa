"""Change a module's class in a copy that shares its Parameters, buffers, hooks and attributes.

The one helper behind every swap convert() and revert() make: torch conv <-> XConv layer,
activation <-> its 1-bit twin. The copy is shallow (same Parameter and buffer objects), but its
containers (parameter, buffer, module and hook dicts) are copied, so changing one module's tree
never changes the other's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TypeVar

from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def retyped(module: nn.Module, cls: type[ModuleT], drop: Iterable[str] = ()) -> ModuleT:
    """A copy of `module` as an instance of `cls`, without the attributes named in `drop`."""
    twin = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, (dict, set, list)):
            setattr(twin, name, copy.copy(value))
    for name in drop:
        vars(twin).pop(name, None)
    twin.__class__ = cls
    return twin
