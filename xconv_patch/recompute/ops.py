"""Which aten ops give a recipe, and how each is replayed in backward."""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _key(op: object) -> object:
    """An op's identity by name and overload: torch may build new OpOverload objects for the same op
    (a library that registers kernels later does), so tables never rely on object identity."""
    name = getattr(op, "_name", None)
    return (name, op._overloadname) if isinstance(op, torch._ops.OpOverload) and name else op


class OpTable(dict):
    """A dict (or, without values, a set) of ops matched by name and overload, not object identity."""

    def __init__(self, entries: dict | list) -> None:
        pairs = entries.items() if isinstance(entries, dict) else ((op, None) for op in entries)
        super().__init__((_key(op), value) for op, value in pairs)

    def __contains__(self, op: object) -> bool:
        return super().__contains__(_key(op))

    def __getitem__(self, op: object) -> object:
        return super().__getitem__(_key(op))


def _overloads(*names: str) -> list[torch._ops.OpOverload]:
    """Every overload of the named ops but the out= ones (they write to a tensor given as a keyword)."""
    found = []
    for name in names:
        packet = getattr(aten, name)
        for overload in map(packet.__getattr__, packet.overloads()):
            arguments = overload._schema.arguments
            if not any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in arguments):
                found.append(overload)
    return found


# Norm ops: (index of the `training` flag or None if fixed, True when always training). A norm in
# inference mode is replayed by its own op; one in training mode by `batch_norm_from_statistics`
# (every training-mode norm here is a batch norm listed in BATCH_NORM_EPS), so the module's running
# statistics are never updated twice.
_NORM_OPS = {
    aten.native_batch_norm.default: (5, False),
    aten.cudnn_batch_norm.default: (5, False),
    aten.miopen_batch_norm.default: (5, False),
    aten._native_batch_norm_legit.default: (5, False),
    aten._batch_norm_with_update.default: (None, True),
    aten._native_batch_norm_legit.no_stats: (3, False),
    aten._native_batch_norm_legit_no_training.default: (None, False),
    aten._batch_norm_no_update.default: (None, False),
    aten.native_group_norm.default: (None, False),
    aten.native_layer_norm.default: (None, False),
}
NORMS = OpTable(_NORM_OPS)

BATCH_NORM_EPS = OpTable({
    aten.native_batch_norm.default: 7,
    aten.cudnn_batch_norm.default: 7,
    aten.miopen_batch_norm.default: 7,
    aten._native_batch_norm_legit.default: 7,
    aten._native_batch_norm_legit.no_stats: 5,
    aten._batch_norm_with_update.default: 6,
})
"""Batch norms whose training-mode outputs 1 and 2 are the batch mean and inverse standard deviation
(index of `eps`): replayed in backward by the inference kernel with those statistics, one
elementwise pass instead of the statistics pass and the transform (measured 10x faster on CPU)."""

def batch_norm_from_statistics(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """A training-mode batch norm's output from its batch mean and inverse standard deviation (which
    its backward keeps anyway), by the inference kernel: exact to rounding, not bit for bit."""
    variance = invstd.double().reciprocal().square().sub(eps).to(invstd.dtype)
    return aten._native_batch_norm_legit_no_training.default(input, weight, bias, mean, variance, 0.0, eps)[0]


NORM_REPLAYS = OpTable([*_NORM_OPS, batch_norm_from_statistics])
"""What a norm's recipe may call: its own op, or the replay from statistics."""

ELEMENTWISE = OpTable(
    _overloads(
        *"""relu relu_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ celu celu_ selu selu_ silu silu_
        gelu gelu_ mish mish_ hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid sigmoid_ tanh tanh_
        softplus _prelu_kernel clone _to_copy mul mul_ add add_ sub sub_ div div_""".split()
    )
)

POOLS = OpTable(
    _overloads("max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool2d", "avg_pool3d")
)
"""Window ops of one recomputable input: their outputs (a max-pool's indices too) are replayed."""

VIEWS = OpTable(
    [
        aten.view.default,
        aten._unsafe_view.default,
        *_overloads(*"permute transpose t expand squeeze unsqueeze alias detach".split()),
    ]
)

COPIES = OpTable([aten.clone.default, aten._to_copy.default])

_SHORT_NAMES = {
    "native_batch_norm": "batch_norm", "cudnn_batch_norm": "batch_norm", "miopen_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "_batch_norm_with_update": "batch_norm", "_batch_norm_no_update": "batch_norm",
    "native_group_norm": "group_norm", "native_layer_norm": "layer_norm", "_prelu_kernel": "prelu",
    "_to_copy": "to", "_unsafe_view": "view", "max_pool2d_with_indices": "max_pool2d",
    "max_pool3d_with_indices": "max_pool3d",
}  # fmt: skip


def out_of_place(func: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The out-of-place twin of an in-place op (relu_ -> relu): replays never write to shared tensors."""
    name = func.overloadpacket.__name__
    if func.is_view or not name.endswith("_") or name.startswith("__"):
        return func
    return getattr(getattr(aten, name[:-1]), func._overloadname)


def short_name(func: torch._ops.OpOverload) -> str:
    name = out_of_place(func).overloadpacket.__name__
    return _SHORT_NAMES.get(name, name)


_MUTATES: dict[torch._ops.OpOverload, bool] = {}


def mutates(func: torch._ops.OpOverload) -> bool:
    """Whether `func` writes to any tensor argument (in-place and out= ops), from its schema."""
    found = _MUTATES.get(func)
    if found is None:
        found = _MUTATES[func] = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
    return found
