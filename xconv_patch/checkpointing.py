"""Per-block activation checkpointing: what users reach for first, as one call, and as a rung of
the memory budget.

A block (a ResNet bottleneck, an MBConv, a timm stage's block) keeps nothing for backward but its
input: its forward runs again in backward under torch.utils.checkpoint (non-reentrant). Blocks are
the children of the model's nn.Sequential containers (stages) that are not themselves Sequential
and hold a convolution. The block keeps its class (a subclass is swapped in, as convert does), its
Parameters and state_dict keys, and its BatchNorm running statistics are updated once per step:
the recomputation in backward runs the norms with momentum 0 (pytorch/pytorch#96136).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

_CONV_TYPES = (nn.modules.conv._ConvNd,)


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks: children of nn.Sequential containers that are not
    Sequential themselves, have layers of their own and hold a convolution (in forward order of the
    containers). A lone layer is no block: checkpointed, it would keep its input all the same."""
    found: list[str] = []

    def visit(module: nn.Module, prefix: str, in_sequence: bool) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                visit(child, f"{path}.", True)
            elif in_sequence and _has_layers(child) and any(isinstance(m, _CONV_TYPES) for m in child.modules()):
                found.append(path)
            elif not in_sequence:
                visit(child, f"{path}.", False)

    visit(model, "", isinstance(model, nn.Sequential))
    return found


def _has_layers(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


class CheckpointedBlock:
    """Mixin: the block's forward under torch.utils.checkpoint (non-reentrant); its norms do not
    update running statistics again when backward recomputes it."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return super().forward(*args, **kwargs)
        context = partial(_forward_and_recompute_contexts, self)
        return checkpoint(super().forward, *args, use_reentrant=False, context_fn=context, **kwargs)


def _forward_and_recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, Any]:
    return contextlib.nullcontext(), _statistics_frozen(block)


@contextlib.contextmanager
def _statistics_frozen(block: nn.Module) -> Iterator[None]:
    """Norms in training mode run as in the forward (same ops, same saved tensors), but leave their
    running statistics and batch count as they were: momentum 0 keeps the averages bit for bit."""
    norms = [m for m in block.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    state = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, state, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    found = _CLASSES.get(cls)
    if found is None:
        namespace = {"__module__": __name__, "__reduce_ex__": _reduce_block}
        found = _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedBlock, cls), namespace)
    return found


def _original_class(cls: type) -> type:
    return next(base for base in cls.__mro__[1:] if not issubclass(base, CheckpointedBlock))


def _reduce_block(block: nn.Module, protocol: int) -> tuple:
    """Pickles a checkpointed block through its own class, which pickle can find."""
    return _new_block, (_original_class(type(block)),), block.__getstate__()


def _new_block(cls: type[nn.Module]) -> nn.Module:
    checkpointed = _checkpointed_class(cls)
    return checkpointed.__new__(checkpointed)


def checkpoint_blocks(model: nn.Module, blocks: list[str] | None = None) -> list[str]:
    """Run each block's forward under activation checkpointing, in place (the block objects stay,
    with a subclass of their class); returns the names of the blocks checkpointed (`blocks`: these
    names instead of `find_blocks(model)`)."""
    names = find_blocks(model) if blocks is None else blocks
    for name in names:
        block = model.get_submodule(name)
        if not isinstance(block, CheckpointedBlock):
            block.__class__ = _checkpointed_class(type(block))
    return names


def uncheckpoint_blocks(model: nn.Module) -> int:
    """Undo checkpoint_blocks, in place; returns how many blocks were restored."""
    blocks = [module for module in model.modules() if isinstance(module, CheckpointedBlock)]
    for block in blocks:
        block.__class__ = _original_class(type(block))
    return len(blocks)
