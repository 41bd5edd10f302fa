"""Does convert(..., memory_budget=...) meet its budget? Predicted against measured, per model.

For each model: every rung's predicted step peak (xconv_patch.conversion.LADDER), then budgets at a
quarter, half and three quarters of the way from the most compressed rung's peak to exact's; at
each, the rung convert chose, its predicted peak, the measured peak of a real step
(xconv_patch.measure_memory: MemTracker, after a warm-up step) and whether it is within the budget,
and the step time against exact's and against per-block checkpointing's (medians of interleaved
rounds).

    python -m benchmarks.budget
    python -m benchmarks.budget --models resnet50 --batch-size 8 --rounds 3
    python -m benchmarks.budget --quick    # smoke run: mobilenet_v3_small at 8x3x128x128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from benchmarks.peers import build
from benchmarks.storage import unet3d
from xconv_patch import MemoryBudgetError, checkpoint_blocks, convert, measure_memory, plan
from xconv_patch.measure.batch import Batch, TrainingStep

MIB = 2**20
CPU = torch.device("cpu")


def model_and_shape(name: str, batch_size: int, image_size: int) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "unet3d":
        return unet3d(), (2, 1, 64, 64, 64)
    return build(name), (batch_size, 3, image_size, image_size)


def ladder(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """Every rung's predicted step peak: a budget of one byte fits none."""
    try:
        plan(model, input_shape=shape, memory_budget=1)
    except MemoryBudgetError as error:
        return error.choice.predicted
    raise AssertionError("a one-byte budget fitted")


def step_seconds(model: nn.Module, shape: tuple[int, ...]) -> float:
    step, batch = TrainingStep(model), Batch("classification", shape[0], shape[1:], CPU)
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def run(name: str, batch_size: int, image_size: int, rounds: int) -> list[dict]:
    model, shape = model_and_shape(name, batch_size, image_size)
    predicted = ladder(model, shape)
    low, high = min(predicted.values()), predicted["exact"]
    checkpointed = copy.deepcopy(model)
    checkpoint_blocks(checkpointed)
    contenders = {"exact": copy.deepcopy(model), "checkpoint per block": checkpointed}
    rows = []
    for fraction in (0.25, 0.5, 0.75):
        budget = int(low + fraction * (high - low))
        converted = convert(copy.deepcopy(model), input_shape=shape, memory_budget=budget, inplace=True)
        choice = converted.xconv_report.budget
        measured = measure_memory(converted, "classification", shape[0], shape[1:], device=CPU)
        contenders[f"budget {fraction}"] = converted
        rows.append({
            "model": name, "input": "x".join(map(str, shape)), "budget": budget, "rung": choice.rung,
            "predicted": choice.predicted_peak, "measured": measured.peak_bytes, "key": f"budget {fraction}",
        })  # fmt: skip
    for contender in contenders.values():
        step_seconds(contender, shape)  # warm-up
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, contender in contenders.items():
            times[key].append(step_seconds(contender, shape))
    checkpoint_peak = measure_memory(checkpointed, "classification", shape[0], shape[1:], device=CPU).peak_bytes
    for row in rows:
        key = row.pop("key")
        row["time_vs_exact"] = statistics.median(t / e for t, e in zip(times[key], times["exact"], strict=True))
        row["time_vs_checkpoint"] = statistics.median(
            t / c for t, c in zip(times[key], times["checkpoint per block"], strict=True)
        )
        row["checkpoint_peak"] = checkpoint_peak
        row["ladder"] = predicted
    return rows


def table(rows: list[dict]) -> str:
    body = [
        [
            row["model"], row["input"], f"{row['budget'] / MIB:.0f}", row["rung"], f"{row['predicted'] / MIB:.0f}",
            f"{row['measured'] / MIB:.0f}", "yes" if row["measured"] <= row["budget"] else "NO",
            f"{row['predicted'] / row['measured'] - 1:+.1%}", f"{row['time_vs_exact']:.2f}",
            f"{row['checkpoint_peak'] / MIB:.0f}", f"{row['time_vs_checkpoint']:.2f}",
        ]
        for row in rows
    ]  # fmt: skip
    headers = ["model", "input", "budget MiB", "rung chosen", "predicted MiB", "measured MiB", "within",
               "prediction error", "time / exact", "checkpoint peak MiB", "time / checkpoint"]  # fmt: skip
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0", "unet3d"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: mobilenet_v3_small, batch 8 at 128")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.image_size, args.rounds = ["mobilenet_v3_small"], 8, 128, 1
    set_threads(args.threads)
    rows = [row for name in args.models for row in run(name, args.batch_size, args.image_size, args.rounds)]
    note = f"\n{args.threads} threads, {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}"
    save_results("budget", rows, table(rows) + note, quick=args.quick)


if __name__ == "__main__":
    main()
