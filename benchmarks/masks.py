"""What 1-bit activation masks do for compressed norm inputs: weight-gradient error against exact.

An activation replayed from a decompressed norm input picks its backward branch from the replayed
value, so elements near zero can take the other branch; the conversion gives such activations 1-bit
masks of the forward's branches (BitLeakyReLU, BitReLU). The same 3-D U-Net (benchmarks.unet3d, as
in `benchmarks.train seg3d`) with its LeakyReLUs and with ReLUs in their place, converted with exact,
bfloat16 and int8 norm inputs and no probes, with the masks and with torch's activations put back
(replayed); relative error of every conv's weight gradient against the unconverted model's on the
same batch. Then the time of each 1-bit activation's forward and backward against torch's on one
norm-input-sized tensor (16x256x56x56, resnet50's layer1 at batch 16), interleaved rounds.

    python -m benchmarks.masks
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from benchmarks.unet3d import UNet3d
from xconv_patch import convert
from xconv_patch.activations import BIT_ACTIVATIONS, bit_activation


def unet(activation: str) -> nn.Module:
    """seg3d's network, seed 0; activation 'leaky' as built, or 'relu' in the LeakyReLUs' place."""
    torch.manual_seed(0)
    model = UNet3d(in_channels=1, out_channels=2, channels=(8, 16, 32), act="leaky", norm="instance")
    if activation == "relu":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LeakyReLU):
                    setattr(parent, name, nn.ReLU(inplace=True))
    return model


def conv_weight_gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.dim() == x.dim()}


def without_masks(model: nn.Module) -> nn.Module:
    """The converted model with torch's activations in the 1-bit twins' place (they share attributes)."""
    torch_kinds = {bit: kind for kind, bit in BIT_ACTIVATIONS.items()}
    for module in model.modules():
        if type(module) in torch_kinds:
            module.__class__ = torch_kinds[type(module)]
    return model


def errors(activation: str, norm_storage: str, masks: bool, x: torch.Tensor) -> list[float]:
    """Sorted relative errors of the conv weight gradients, converted against unconverted."""
    model = unet(activation)
    exact = conv_weight_gradients(model, x)
    converted = convert(copy.deepcopy(model), input_shape=tuple(x.shape), norm_storage=norm_storage, probes=0)
    if not masks:
        converted = without_masks(converted)
    torch.manual_seed(1)
    got = conv_weight_gradients(converted, x)
    return sorted(((got[name] - grad).norm() / grad.norm()).item() for name, grad in exact.items())


TIMED = (nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 2.0), nn.LeakyReLU(0.1))


def forward_backward_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    leaf = x.detach().requires_grad_()
    start = time.perf_counter()
    output = module(leaf)
    middle = time.perf_counter()
    output.backward(grad)
    return middle - start, time.perf_counter() - middle


def timings(shape: tuple[int, ...], rounds: int) -> list[dict]:
    """Median forward and backward seconds of each torch activation and its 1-bit twin, alternating."""
    generator = torch.Generator().manual_seed(0)
    x, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    rows = []
    for module in TIMED:
        pair = {"torch": module, "1-bit": bit_activation(module)}
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in pair}
        for _ in range(rounds + 1):  # the first round warms up
            for name, layer in pair.items():
                seconds[name].append(forward_backward_seconds(layer, x, grad))
        medians = {name: [statistics.median(column) for column in zip(*found[1:], strict=True)]
                   for name, found in seconds.items()}
        rows.append({"activation": repr(module), **{f"{name} {step}": medians[name][i]
                                                   for name in pair for i, step in enumerate(("forward", "backward"))}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds of each activation")
    args = parser.parse_args()
    set_threads(args.threads)
    x = torch.randn((args.batch_size, 1, args.side, args.side, args.side), generator=torch.Generator().manual_seed(0))
    rows, body = [], []
    for activation in ("leaky", "relu"):
        for norm_storage in ("exact", "bfloat16", "int8"):
            for masks in (True, False) if norm_storage != "exact" else (False,):
                found = errors(activation, norm_storage, masks, x)
                rows.append({"activation": activation, "norm_storage": norm_storage, "masks": masks,
                             "relative_errors": found})
                kept = "1-bit masks" if masks else "replayed"
                body.append([activation, norm_storage, kept, f"{found[len(found) // 2]:.4f}", f"{found[-1]:.4f}"])
    header = ["activation", "norm inputs", "activation branches", "median relative error", "max relative error"]
    table = markdown_table(header, body)
    note = f"\nbatch {tuple(x.shape)}, no probes, {args.threads} threads, {time.strftime('%Y-%m-%d')}"
    shape = (16, 256, 56, 56)
    timed = timings(shape, args.rounds)
    time_body = [
        [row["activation"], *(f"{row[f'{name} {step}'] * 1e3:.1f}" for name in ("torch", "1-bit")
                              for step in ("forward", "backward")),
         f"{(row['1-bit forward'] + row['1-bit backward']) / (row['torch forward'] + row['torch backward']):.2f}"]
        for row in timed
    ]
    time_header = ["activation", "torch forward ms", "torch backward ms", "1-bit forward ms", "1-bit backward ms",
                   "1-bit / torch"]
    time_note = f"\none {'x'.join(map(str, shape))} float32 tensor, median of {args.rounds} interleaved rounds"
    save_results("masks", {"errors": rows, "timings": timed},
                 table + note + "\n\n" + markdown_table(time_header, time_body) + time_note)


if __name__ == "__main__":
    main()
