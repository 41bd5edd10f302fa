"""What recompute_saved saves and costs: bytes a forward leaves allocated, and step time, on CPU.

Memory: every storage an op creates during the forward is watched through a weak reference; the
figure is the bytes still alive after the forward returns, its output excluded: what the autograd
graph (or anything else) keeps, hooks or not. Broken down by the op that made each storage.
Time: one forward + backward, plain (A) and with `enable` (B), interleaved A B A B after a
warm-up, one intra-op thread; the median of B / A over rounds.

    python -m benchmarks.recompute_overhead
    python -m benchmarks.recompute_overhead --memory-batch 8 --time-batch 2 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import efficientnet_b0, resnet50

from xconv_patch.memory import LiveStorages
from xconv_patch.recompute import enable

MIB = 2**20


def kept_by_op(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    with LiveStorages() as live:
        out = model(x)
    return live.alive(out)


def step_seconds(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward and of its backward."""
    start = time.perf_counter()
    loss = model(x).sum()
    middle = time.perf_counter()
    loss.backward()
    return middle - start, time.perf_counter() - middle


def interleaved(plain: nn.Module, recomputed: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median plain step seconds and median recomputed / plain ratios (step, forward, backward) over A B rounds."""
    step_seconds(plain, x), step_seconds(recomputed, x)
    rows = []
    for _ in range(rounds):
        a, b = step_seconds(plain, x), step_seconds(recomputed, x)
        rows.append((sum(a), sum(b) / sum(a), b[0] / a[0], b[1] / a[1]))
    columns = zip(*rows, strict=True)
    return dict(zip(("plain_s", "step", "forward", "backward"), map(statistics.median, columns), strict=True))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: resnet50(),
    "efficientnet_b0": lambda: efficientnet_b0(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--time-batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        torch.manual_seed(0)
        plain = MODELS[name]()
        recomputed = copy.deepcopy(plain)
        enable(recomputed)
        x = torch.randn(args.memory_batch, 3, args.size, args.size, requires_grad=True)
        before, after = kept_by_op(plain, x), kept_by_op(recomputed, x)
        total_before, total_after = sum(before.values()) / MIB, sum(after.values()) / MIB
        print(
            f"{name} batch {args.memory_batch} at {args.size}, float32: forward leaves "
            f"{total_before:.1f} MiB plain, {total_after:.1f} MiB recomputed ({total_before / total_after:.2f}x)"
        )
        for op in sorted(before.keys() | after.keys(), key=lambda k: -before[k]):
            if before[op] + after[op] > 0.05 * MIB:
                print(f"  made by {op:28s} {before[op] / MIB:8.1f} -> {after[op] / MIB:8.1f} MiB")
        x = torch.randn(args.time_batch, 3, args.size, args.size)
        t = interleaved(plain, recomputed, x, args.rounds)
        print(
            f"  step, batch {args.time_batch}, 1 thread: plain {t['plain_s']:.3f} s; recomputed / plain: "
            f"step {t['step']:.3f}, forward {t['forward']:.3f}, backward {t['backward']:.3f} "
            f"(medians of {args.rounds} A B rounds)"
        )


if __name__ == "__main__":
    main()
