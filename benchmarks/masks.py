"""What 1-bit activation masks do for compressed norm inputs: weight-gradient error against exact.

An activation replayed from a decompressed norm input picks its backward branch from the replayed
value, so elements near zero can take the other branch. ReLU-like activations keep a 1-bit mask of
the forward's branches (BitReLU); LeakyReLU has no such twin. The same 3-D U-Net (benchmarks.unet3d,
as in `benchmarks.train seg3d`) with its LeakyReLUs and with ReLUs in their place, converted with
exact, bfloat16 and int8 norm inputs and no probes; relative error of every conv's weight gradient
against the unconverted model's on the same batch.

    python -m benchmarks.masks
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from benchmarks._common import markdown_table, save_results, set_threads
from benchmarks.unet3d import UNet3d
from xconv_patch import convert


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


def errors(activation: str, norm_storage: str, x: torch.Tensor) -> list[float]:
    """Sorted relative errors of the conv weight gradients, converted against unconverted."""
    model = unet(activation)
    exact = conv_weight_gradients(model, x)
    converted = convert(copy.deepcopy(model), input_shape=tuple(x.shape), norm_storage=norm_storage, probes=0)
    torch.manual_seed(1)
    got = conv_weight_gradients(converted, x)
    return sorted(((got[name] - grad).norm() / grad.norm()).item() for name, grad in exact.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    x = torch.randn((args.batch_size, 1, args.side, args.side, args.side), generator=torch.Generator().manual_seed(0))
    rows, body = [], []
    for activation in ("leaky", "relu"):
        for norm_storage in ("exact", "bfloat16", "int8"):
            found = errors(activation, norm_storage, x)
            rows.append({"activation": activation, "norm_storage": norm_storage, "relative_errors": found})
            body.append([activation, norm_storage, f"{found[len(found) // 2]:.4f}", f"{found[-1]:.4f}"])
    table = markdown_table(["activation", "norm inputs", "median relative error", "max relative error"], body)
    note = f"\nbatch {tuple(x.shape)}, no probes, {args.threads} threads, {time.strftime('%Y-%m-%d')}"
    save_results("masks", rows, table + note)


if __name__ == "__main__":
    main()
