"""Which aten ops give a recipe, and how each is replayed in backward."""

from __future__ import annotations

from dataclasses import dataclass

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

MAX_POOLS = OpTable({
    **dict.fromkeys(_overloads("max_pool2d_with_indices"), 2),
    **dict.fromkeys(_overloads("max_pool3d_with_indices"), 3),
})
"""Max pools (their spatial dimensions): replayed from their windows' offsets (`MaxPoolWindows`)."""

POOLS = OpTable([*MAX_POOLS, *_overloads("avg_pool2d", "avg_pool3d")])
"""Window ops of one recomputable input: their outputs (a max pool's indices too) are replayed."""


@dataclass(frozen=True)
class MaxPoolWindows:
    """The windows of one max pool call, to keep where each maximum sits as its offset in its window.

    A max pool's indices are flat positions in the input's planes, int64. Replayed from a compressed
    copy of the input, a pool would move them (near ties); the offset of each maximum within its
    window (one byte for windows of up to 256 elements) keeps them exact at 1/8 of their size, and the
    output is then the input read at those indices: exact from an exact input, unbiased from a
    stochastically rounded one.
    """

    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @classmethod
    def of(cls, func: torch._ops.OpOverload, args: tuple, output: torch.Tensor) -> MaxPoolWindows:
        """The windows of `func(input, kernel_size, stride=[], padding=0, dilation=1, ceil_mode=False)`."""
        dims = MAX_POOLS[func]

        def spread(index: int, default: tuple[int, ...]) -> tuple[int, ...]:
            value = tuple(args[index]) if len(args) > index and len(args[index]) else default
            return value * dims if len(value) == 1 else value

        kernel = spread(1, ())
        sizes = tuple(args[0].shape[-dims:]), tuple(output.shape[-dims:])
        return cls(*sizes, kernel, spread(2, kernel), spread(3, (0,)), spread(4, (1,)))

    def offsets(self, indices: torch.Tensor) -> torch.Tensor:
        """Each maximum's offset in its window (row-major over the kernel), from the pool's indices."""
        table = self._table(indices.device)
        strides = _row_major_strides(self.input_size)
        span = 1 + sum((k - 1) * d * s for k, d, s in zip(self.kernel_size, self.dilation, strides, strict=True))
        # Two offsets at the same distance (a window wider than the input) name the same element.
        lookup = torch.zeros(span, dtype=torch.int64, device=indices.device)
        lookup[table] = torch.arange(table.numel(), device=indices.device)
        dtype = torch.uint8 if table.numel() <= 256 else torch.int32
        return lookup[indices - self._starts(indices.device)].to(dtype)

    def indices(self, offsets: torch.Tensor) -> torch.Tensor:
        """The pool's indices, from the offsets."""
        return self._table(offsets.device)[offsets.long()].add_(self._starts(offsets.device))

    def maxima(self, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The pool's output: `input` read at the indices."""
        dims = len(self.input_size)
        return input.flatten(-dims).gather(-1, indices.flatten(-dims)).view(indices.shape)

    def _starts(self, device: torch.device) -> torch.Tensor:
        """The flat input position of each window's first element (outside the input where padded)."""
        return _grid([torch.arange(o, device=device) * s - p for o, s, p in
                      zip(self.output_size, self.stride, self.padding, strict=True)], self.input_size)

    def _table(self, device: torch.device) -> torch.Tensor:
        """The flat distance from a window's first element to each of its elements (row-major)."""
        return _grid([torch.arange(k, device=device) * d for k, d in
                      zip(self.kernel_size, self.dilation, strict=True)], self.input_size).reshape(-1)


def _grid(positions: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
    """The flat positions, in a row-major array of `size`, of every combination of per-dimension positions."""
    dims = len(size)
    flat = None
    for dim, (position, stride) in enumerate(zip(positions, _row_major_strides(size), strict=True)):
        term = (position * stride).view([-1 if d == dim else 1 for d in range(dims)])
        flat = term if flat is None else flat + term
    return flat


def _row_major_strides(size: tuple[int, ...]) -> list[int]:
    strides = [1] * len(size)
    for dim in range(len(size) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * size[dim + 1]
    return strides


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
