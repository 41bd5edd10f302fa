"""xconv-patch against what users already have for memory: one SGD training step, side by side.

Options (each from the same random weights and the same synthetic batch):
- exact: torch as it is;
- checkpoint per block: torch.utils.checkpoint (non-reentrant) around every block
  (xconv_patch.checkpointing.checkpoint_blocks);
- bf16 autocast: torch.autocast(dtype=bfloat16) around the forward;
- compile, budget 0.5: torch.compile with torch._functorch.config.activation_memory_budget = 0.5
  (only with --compile: inductor compiles for minutes on a CPU; with torch 2.14.1 on CPU a cold
  compile of resnet18 under the budget can fail, RecursionError in meta_copy_ at max_pool2d);
- xconv: convert(model, input_shape=...) (recomputation; probes only where nothing is recomputable);
- xconv int8: the same with norm_storage="int8";
- and both xconv rows under bf16 autocast.

Figures: saved activations (what autograd keeps: xconv_patch.memory.SavedTensors), the step's peak
(the live tensor storages torch's MemTracker counts, as `xconv profile` measures it on CPU) ("-" for
the compiled model, whose graph saves and allocates outside both), the step's allocator peak (all
that torch's CPU allocator hands out, tensors or not, from torch.profiler's memory timeline: it sees
a compiled graph's buffers, and oneDNN's scratchpads, whose size depends on the CPU), the
input-gradient cosine against exact on the same batch, and step time as the median over interleaved
rounds of each option's step time over exact's in the same round.

    python -m benchmarks.peers
    python -m benchmarks.peers --models resnet50 --batch-size 8 --rounds 3
    python -m benchmarks.peers --quick    # smoke run: resnet18 at 64x64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from xconv_patch import convert
from xconv_patch.checkpointing import checkpoint_blocks
from xconv_patch.measure.batch import Batch, TrainingStep
from xconv_patch.measure.step_memory import allocator_peak, tracked_step

MIB = 2**20


@dataclass(frozen=True)
class Option:
    """One way to train: how the model is prepared, and whether the forward runs under bf16 autocast."""

    name: str
    prepare: Callable[[nn.Module, tuple[int, ...]], nn.Module]
    amp: bool = False
    hooks_see_saves: bool = True


def _xconv(norm_storage: str) -> Callable[[nn.Module, tuple[int, ...]], nn.Module]:
    return lambda model, shape: convert(model, input_shape=shape, norm_storage=norm_storage, inplace=True)


def _checkpointed(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    checkpoint_blocks(model)
    return model


def _compiled(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch._functorch.config.activation_memory_budget = 0.5
    return torch.compile(model)


def options(with_compile: bool, with_amp: bool = True) -> list[Option]:
    found = [
        Option("exact", lambda model, shape: model),
        Option("checkpoint per block", _checkpointed),
        Option("bf16 autocast", lambda model, shape: model, amp=True),
        Option("xconv", _xconv("exact")),
        Option("xconv int8 norms", _xconv("int8")),
        Option("xconv + bf16 autocast", _xconv("exact"), amp=True),
        Option("xconv int8 norms + bf16 autocast", _xconv("int8"), amp=True),
    ]
    if with_compile:
        found.insert(3, Option("compile, memory budget 0.5", _compiled, hooks_see_saves=False))
    return found if with_amp else [option for option in found if not option.amp]


def build(name: str) -> nn.Module:
    """torchvision's NAME or timm's timm:NAME, random weights, seed 0."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False)
    return torchvision.models.get_model(name)


def input_gradient(step: TrainingStep, batch: Batch) -> torch.Tensor:
    """The loss's gradient at the network input, weights left as they are."""
    inputs = batch.inputs[0]
    batch.inputs[0] = inputs.detach().clone().requires_grad_()
    try:
        step(batch, update=False)
        return batch.inputs[0].grad.float()
    finally:
        batch.inputs[0] = inputs


def seconds(step: TrainingStep, batch: Batch) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def compare(
    model_name: str, batch_size: int, image_size: int, rounds: int, with_compile: bool, with_amp: bool = True
) -> list[dict]:
    shape = (batch_size, 3, image_size, image_size)
    batch = Batch("classification", batch_size, shape[1:], torch.device("cpu"))
    original = build(model_name)
    steps, rows = {}, []
    for option in options(with_compile, with_amp):
        print(f"{model_name}: {option.name}", flush=True)
        model = option.prepare(copy.deepcopy(original), shape)
        step = TrainingStep(model, amp=option.amp)
        gradient = input_gradient(step, batch)
        step(batch)  # warm-up: optimizer state exists, compiled graphs built
        figures = tracked_step(step, batch)
        seen = option.hooks_see_saves
        rows.append({
            "model": model_name, "option": option.name, "peak_bytes": figures.peak_bytes if seen else None,
            "saved_bytes": figures.activation_bytes if seen else None,
            "allocator_peak_bytes": allocator_peak(step, batch), "gradient": gradient,
        })  # fmt: skip
        steps[option.name] = step
    reference = rows[0]["gradient"].double().flatten()
    for row in rows:
        gradient = row.pop("gradient").double().flatten()
        row["input_gradient_cosine"] = F.cosine_similarity(gradient, reference, dim=0).item()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        measured = {name: seconds(step, batch) for name, step in steps.items()}
        for name, value in measured.items():
            times[name].append(value / measured["exact"])
    for row in rows:
        row["time_vs_exact"] = statistics.median(times[row["option"]])
    return rows


def table(rows: list[dict]) -> str:
    exact = {row["model"]: row for row in rows if row["option"] == "exact"}
    body = []
    for row in rows:
        base = exact[row["model"]]
        cells = [row["model"], row["option"]]
        for key in ("saved_bytes", "peak_bytes", "allocator_peak_bytes"):
            seen = row[key] is not None
            cells += [f"{row[key] / MIB:.0f}" if seen else "-", f"{base[key] / row[key]:.2f}x" if seen else "-"]
        body.append([*cells, f"{row['time_vs_exact']:.2f}", f"{row['input_gradient_cosine']:.4f}"])
    headers = ["model", "option", "saved MiB", "vs exact", "peak MiB", "vs exact", "allocator peak MiB", "vs exact",
               "step time / exact", "input-grad cosine"]  # fmt: skip
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "timm:efficientnet_b0"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add torch.compile with a memory budget of 0.5")
    parser.add_argument("--no-amp", action="store_true",
                        help="leave out the bf16 autocast rows (10x slower on CPUs without bf16 arithmetic)")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18, batch 2 at 64x64, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.image_size, args.rounds = ["resnet18"], 2, 64, 1
    set_threads(args.threads)
    rows = [row for name in args.models for row in compare(name, args.batch_size, args.image_size, args.rounds,
                                                           args.compile, not args.no_amp)]
    note = (f"\nbatch {args.batch_size} at {args.image_size}x{args.image_size}, {args.threads} threads, "
            f"{args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}")
    save_results("peers", rows, table(rows) + note, quick=args.quick)


if __name__ == "__main__":
    main()
