"""Layer benchmark: torch's exact convolution against XConv on ResNet-like layer shapes.

For each shape it times forward + backward of both layers side by side (A B A B ..., medians
after warm-up; DESIGN.md section 3) and measures what each keeps for backward with saved-tensor
hooks. The input requires grad, as for any layer but the first. --baseline also times another
version of XConv in the same rounds (exact, XConv, baseline, ...), e.g. the last commit's:

    python -m benchmarks.layer_benchmark --quick
    python -m benchmarks.layer_benchmark --device cuda --sizes 64x56 256x14 --kernels 3
    git archive HEAD xconv_patch | tar -x -C /tmp/xconv_head
    python -m benchmarks.layer_benchmark --threads 1 --clock cpu --sizes 16x16 32x16 64x16 \
        64x56 128x28 256x14 512x7 --baseline /tmp/xconv_head
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from xconv_patch import PROBE_KINDS, XConv2d
from xconv_patch.memory import saved_activation_bytes

# (channels, spatial size): the four ResNet stages at 224 x 224 input.
RESNET_SHAPES = ("64x56", "128x28", "256x14", "512x7")


@dataclass(frozen=True)
class Measurement:
    channels: int
    size: int
    kernel: int
    exact_ms: float
    xconv_ms: float
    ratio: float
    exact_bytes: int
    xconv_bytes: int
    baseline_ms: float | None = None
    baseline_ratio: float | None = None


def parse_shape(text: str) -> tuple[int, int]:
    """'CxS' -> (channels, spatial size)."""
    channels, _, size = text.partition("x")
    if not (channels.isdigit() and size.isdigit()):
        raise argparse.ArgumentTypeError(f"shape must look like 64x56 (channels x size), got {text!r}")
    return int(channels), int(size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step: Callable[[], None], device: torch.device, clock: Callable[[], float]) -> float:
    synchronize(device)
    started = clock()
    step()
    synchronize(device)
    return clock() - started


def training_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of one layer; gradients are dropped, not accumulated."""

    def step() -> None:
        layer.weight.grad = x.grad = None
        layer(x).backward(grad)

    return step


def load_baseline(directory: Path) -> ModuleType:
    """The xconv_patch package under `directory`, imported as xconv_baseline beside this one."""
    init = directory / "xconv_patch" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no xconv_patch package in {directory}")
    spec = importlib.util.spec_from_file_location("xconv_baseline", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["xconv_baseline"] = module
    spec.loader.exec_module(module)
    return module


def measure(
    channels: int, size: int, kernel: int, args: argparse.Namespace, device: torch.device, baseline: ModuleType | None
) -> Measurement:
    exact = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False, device=device, dtype=args.dtype)
    layers = {"exact": exact, "xconv": XConv2d.from_conv(exact, probes=args.probes, probe=args.probe)}
    if baseline is not None:
        layers["baseline"] = baseline.XConv2d.from_conv(exact, probes=args.probes, probe=args.probe)
    x = torch.randn(args.batch, channels, size, size, device=device, dtype=args.dtype, requires_grad=True)
    grad = torch.randn_like(x)
    steps = [(name, training_step(layer, x, grad)) for name, layer in layers.items()]
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_index in range(args.warmup + args.repeats):
        for name, step in steps[:: 1 if round_index % 2 else -1]:  # A B C, C B A, ...: drift cancels
            seconds = timed(step, device, CLOCKS[args.clock])
            if round_index >= args.warmup:
                times[name].append(seconds)

    def median_ratio(name: str) -> float:
        return statistics.median(b / a for a, b in zip(times["exact"], times[name], strict=True))

    xconv = layers["xconv"]
    return Measurement(
        channels,
        size,
        kernel,
        exact_ms=1000 * statistics.median(times["exact"]),
        xconv_ms=1000 * statistics.median(times["xconv"]),
        ratio=median_ratio("xconv"),
        exact_bytes=saved_activation_bytes(exact, lambda: exact(x)),
        xconv_bytes=saved_activation_bytes(xconv, lambda: xconv(x)),
        baseline_ms=None if baseline is None else 1000 * statistics.median(times["baseline"]),
        baseline_ratio=None if baseline is None else median_ratio("baseline"),
    )


def table(rows: list[Measurement]) -> str:
    baseline = rows[0].baseline_ms is not None
    headers = ["layer", "exact ms", "XConv ms", "time ratio"]
    headers += ["baseline ms", "baseline time ratio"] * baseline
    headers += ["exact kept MiB", "XConv kept MiB", "kept ratio"]
    lines = []
    for row in rows:
        line = [f"{row.kernel}x{row.kernel}, C={row.channels}, {row.size}x{row.size}"]
        line += [f"{row.exact_ms:.1f}", f"{row.xconv_ms:.1f}", f"{row.ratio:.2f}"]
        if baseline:
            line += [f"{row.baseline_ms:.1f}", f"{row.baseline_ratio:.2f}"]
        line += [
            f"{row.exact_bytes / 2**20:.2f}",
            f"{row.xconv_bytes / 2**20:.3f}",
            f"1/{row.exact_bytes / row.xconv_bytes:.0f}",
        ]
        lines.append(line)
    return markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_shape,
        default=[parse_shape(s) for s in RESNET_SHAPES],
        metavar="CxS",
        help="channels x spatial size, default: " + " ".join(RESNET_SHAPES),
    )
    parser.add_argument("--kernels", nargs="+", type=int, default=[3, 1])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument(
        "--probe",
        default="rademacher",
        choices=PROBE_KINDS,
        help="probe kind, per-sample and deflated (the layer defaults)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op CPU threads")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="cpu: process CPU time, which on a shared machine leaves out the time spent waiting "
        "for a core (use with --threads 1)",
    )
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed rounds per shape")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also time the xconv_patch package in DIR (e.g. a git archive of an older commit)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; time a GPU with the wall clock")
    if args.quick:
        args.warmup, args.repeats = 1, 3
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    set_threads(args.threads)
    baseline = None if args.baseline is None else load_baseline(args.baseline)
    torch.manual_seed(0)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    print(
        f"torch {torch.__version__}, {machine}, {args.threads} threads, {args.clock} clock, "
        f"batch {args.batch}, {args.dtype}, "
        f"r = {args.probes} {args.probe} probes; {args.warmup} warm-up + {args.repeats} interleaved rounds",
        flush=True,
    )
    rows = []
    for channels, size in args.sizes:
        for kernel in args.kernels:
            row = measure(channels, size, kernel, args, device, baseline)
            rows.append(row)
            against = "" if baseline is None else f" (baseline {row.baseline_ratio:.2f})"
            print(f"  {kernel}x{kernel} C={channels} {size}x{size}: time ratio {row.ratio:.2f}{against}", flush=True)
    save_results(
        "layer_benchmark" + "_cuda" * (device.type == "cuda") + "_baseline" * (baseline is not None),
        {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(row) for row in rows]},
        table(rows),
        quick=args.quick,
    )
    print(f"XConv no slower than the exact layer on {sum(row.ratio <= 1 for row in rows)} of {len(rows)} layers")


if __name__ == "__main__":
    main()
