"""Aten ops per forward + backward of one layer: XConv2d against nn.Conv2d.

Counts every aten op dispatched (TorchDispatchMode) in one training step of a layer after a
warm-up step, to show the estimator's fixed overhead per call, which dominates small layers.

    python -m benchmarks.op_count
    python -m benchmarks.op_count --channels 64 --size 32 --batch 8 --verbose
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xconv_patch import XConv2d


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Counter[str]:
    """The ops of one forward + backward of `layer` on `x` (after one uncounted step)."""
    for counted in (False, True):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        counter = OpCounter()
        if counted:
            with counter:
                layer(x).backward(grad)
        else:
            layer(x).backward(grad)
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--verbose", action="store_true", help="list the ops of the XConv step")
    args = parser.parse_args()
    torch.manual_seed(0)
    exact = nn.Conv2d(args.channels, args.channels, args.kernel, padding=args.kernel // 2)
    xconv = XConv2d.from_conv(exact, probes=args.probes)
    x = torch.randn(args.batch, args.channels, args.size, args.size, requires_grad=True)
    grad = torch.randn_like(exact(x))
    counts = {name: count_step(layer, x, grad) for name, layer in (("nn.Conv2d", exact), ("XConv2d", xconv))}
    for name, ops in counts.items():
        print(f"{name}: {sum(ops.values())} aten ops per forward + backward")
    if args.verbose:
        for op, count in counts["XConv2d"].most_common():
            print(f"  {count:3d} {op}")


if __name__ == "__main__":
    main()
