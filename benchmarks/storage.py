"""How the storage plan shrinks saved activations on a model zoo, with the peak step memory and step time.

Per model: the saved-activation bytes of the exact and the converted model (default settings) from
convert()'s report, and the same two figures measured on a real forward with saved-tensor hooks
(they must be equal: a mismatch is printed); how many convs are recomputed / probed / kept; the
predicted peak memory of one SGD training step of each (FakeTensorMode, nothing allocated); and,
for resnet50 and efficientnet_b0, the step time (forward + backward) of converted over exact,
interleaved in one process, the median of paired ratios after a warm-up.

    python -m benchmarks.storage
    python -m benchmarks.storage --models resnet18,unet3d --skip-timing
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from benchmarks.unet3d import UNet3d
from xconv_patch import convert
from xconv_patch.measure import predict_memory, time_steps
from xconv_patch.memory import saved_activation_bytes

MIB = 2**20
TIMED = ("resnet50", "efficientnet_b0")
UNET_SIZE = 64


def unet3d() -> nn.Module:
    """The tests' MONAI-style 3-D U-Net at benchmark width: 4 stages, 16 to 128 channels, 2 classes."""
    return UNet3d(in_channels=1, out_channels=2, channels=(16, 32, 64, 128))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet50": tvm.resnet50,
    "efficientnet_b0": tvm.efficientnet_b0,
    "mobilenet_v3_large": tvm.mobilenet_v3_large,
    "regnet_y_400mf": tvm.regnet_y_400mf,
    "convnext_tiny": tvm.convnext_tiny,
    "densenet121": tvm.densenet121,
    "unet3d": unet3d,
}


@dataclass
class Row:
    """One model's figures (bytes; the time ratio None when not timed)."""

    model: str
    shape: tuple[int, ...]
    planned_before: int
    planned_after: int
    measured_before: int
    measured_after: int
    recomputed: int
    probed: int
    kept: int
    peak_before: int
    peak_after: int
    time_ratio: float | None = None

    @property
    def ratio(self) -> float:
        return self.planned_before / self.planned_after

    @property
    def agrees(self) -> bool:
        return (self.planned_before, self.planned_after) == (self.measured_before, self.measured_after)


def sample_shape(name: str, image_size: int) -> tuple[int, ...]:
    return (1, UNET_SIZE, UNET_SIZE, UNET_SIZE) if name == "unet3d" else (3, image_size, image_size)


def build(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """(exact, converted) with fixed weights; the converted model shares the exact one's Parameters."""
    torch.manual_seed(0)
    model = ZOO[name]().train()
    return model, convert(model, input_shape=shape)


def measure(name: str, batch_size: int, image_size: int) -> Row:
    """The plan's and a real forward's saved bytes, the plan's storage counts and the predicted peaks."""
    unet = name == "unet3d"
    batch = 2 if unet else batch_size
    sample = sample_shape(name, image_size)
    shape = (batch, *sample)
    exact, converted = build(name, shape)
    report = converted.xconv_report
    x = torch.randn(shape)
    measured = [saved_activation_bytes(net, lambda net=net: net(x)) for net in (exact, converted)]
    counts = {kind: sum(layer.storage == kind for layer in report.layers) for kind in ("recomputed", "probed", "kept")}
    peaks = [
        predict_memory(copy.deepcopy(net), "classification", batch, sample).peak_bytes for net in (exact, converted)
    ]
    return Row(
        name,
        shape,
        report.activation_bytes_before,
        report.activation_bytes_after,
        *measured,
        counts["recomputed"],
        counts["probed"],
        counts["kept"],
        *peaks,
    )


def step_time_ratio(name: str, batch_size: int, image_size: int, rounds: int) -> float:
    """Median over rounds of converted / exact seconds for forward + backward, interleaved A B A B."""
    shape = (batch_size, *sample_shape(name, image_size))
    exact, converted = build(name, shape)
    x = torch.randn(shape)

    def step(net: nn.Module) -> Callable[[], None]:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            net(x).sum().backward()

        return run

    steps = {"exact": step(exact), "converted": step(converted)}
    time_steps(steps, repeats=2)  # warm-up
    times = time_steps(steps, repeats=rounds)
    return statistics.median(b / a for a, b in zip(times["exact"], times["converted"], strict=True))


def table(rows: list[Row], timing: str) -> str:
    headers = [
        "model",
        "input",
        "saved exact (MiB)",
        "saved converted (MiB)",
        "ratio",
        "measured = report",
        "convs recomputed / probed / kept",
        "peak exact (MiB)",
        "peak converted (MiB)",
        "peak ratio",
        f"step time converted / exact ({timing})",
    ]
    body = [
        [
            row.model,
            "x".join(map(str, row.shape)),
            f"{row.planned_before / MIB:.0f}",
            f"{row.planned_after / MIB:.0f}",
            f"{row.ratio:.2f}",
            "yes" if row.agrees else f"NO: {row.measured_before / MIB:.1f} / {row.measured_after / MIB:.1f}",
            f"{row.recomputed} / {row.probed} / {row.kept}",
            f"{row.peak_before / MIB:.0f}",
            f"{row.peak_after / MIB:.0f}",
            f"{row.peak_before / row.peak_after:.2f}",
            "-" if row.time_ratio is None else f"{row.time_ratio:.2f}",
        ]
        for row in rows
    ]
    mean = math.exp(statistics.fmean(math.log(row.ratio) for row in rows))
    peak_mean = math.exp(statistics.fmean(math.log(row.peak_before / row.peak_after) for row in rows))
    body.append(["geometric mean", "", "", "", f"{mean:.2f}", "", "", "", "", f"{peak_mean:.2f}", ""])
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(ZOO), help=f"comma-separated, of: {', '.join(ZOO)}")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the 2-D models (the U-Net: 2)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (timing wants 1)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--time-batch-size", type=int, default=4)
    parser.add_argument("--time-image-size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after 2 warm-up rounds")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = set(names) - set(ZOO)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(ZOO)}")
    set_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in names:
        row = measure(name, args.batch_size, args.image_size)
        if name in TIMED and not args.skip_timing:
            row.time_ratio = step_time_ratio(name, args.time_batch_size, args.time_image_size, args.rounds)
        if not row.agrees:
            print(
                f"MISMATCH {name}: report {row.planned_before} / {row.planned_after}, "
                f"measured {row.measured_before} / {row.measured_after} bytes",
                flush=True,
            )
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row)
    timing = f"batch {args.time_batch_size} at {args.time_image_size}, {args.rounds} rounds, {args.threads} thread(s)"
    text = table(rows, timing)
    save_results("storage", [vars(row) for row in rows], text)
    print(f"wall time {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
