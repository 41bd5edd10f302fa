"""Recompute, in backward, the saved tensors that are cheap functions of a norm's input.

A norm keeps its input for its own backward. What follows it up to the next convolution (affine
map, activation, multiply by a small gate, views and casts) is elementwise and cheap, so the
tensors autograd keeps on that path, the next convolution's input included, need not be kept:
a recipe replays them in backward from the norm's input, which is kept anyway, and a few small
tensors (DESIGN.md section 2). Gradients stay exact: backward sees bit-identical tensors.

How: while a `RecomputeTracker` is active, a dispatch mode (below autograd, so it sees every aten
op) gives each output of an allow-listed op a `Recipe` when its tensor arguments are recomputable,
norm inputs ("anchors"), small, or parameters; and a saved-tensors pack hook stores that recipe
instead of the tensor. Tensors are matched by storage, geometry and version counter, so a tensor
changed in place by any other op is kept as is.

Past that exact floor, `storing_norm_inputs` / `store_norm_input` keep a norm's input compressed
("bfloat16", "int8") with stochastic rounding: unbiased, no longer exact.

Modules: `ops` (the allow-list and how each op is replayed), `recipes` (what is stored instead of a
tensor, and its replay), `tracker` (the dispatch mode and pack hook), `hooks` (per-model switch),
`compressed` (compressed norm inputs).
"""

from xconv_patch.recompute.compressed import NORM_STORAGES
from xconv_patch.recompute.hooks import (
    KeepSavedHook,
    NormStorageHook,
    RecomputeHook,
    disable,
    enable,
    keep_saved,
    store_norm_input,
)
from xconv_patch.recompute.recipes import Recipe
from xconv_patch.recompute.tracker import (
    MAX_DEPTH,
    SMALL_FRACTION,
    RecomputeTracker,
    keeping_saved,
    recompute_active,
    recompute_saved,
    storing_norm_inputs,
    untracked,
)

__all__ = [
    "MAX_DEPTH",
    "NORM_STORAGES",
    "SMALL_FRACTION",
    "KeepSavedHook",
    "NormStorageHook",
    "Recipe",
    "RecomputeHook",
    "RecomputeTracker",
    "disable",
    "enable",
    "keep_saved",
    "keeping_saved",
    "recompute_active",
    "recompute_saved",
    "store_norm_input",
    "storing_norm_inputs",
    "untracked",
]
