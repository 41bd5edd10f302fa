"""A small MONAI-style 3-D U-Net (BasicUNet layout) for the storage-plan tests and the benchmarks
(`benchmarks.storage`, the seg3d task of `benchmarks.train`).

Each stage is two (Conv3d, norm, activation) units, the norm InstanceNorm3d(affine) or BatchNorm3d;
down is a max-pool or a strided conv, up a ConvTranspose3d whose output is concatenated with the
skip, and a final 1x1x1 conv maps to the classes. Its structure fixes which conv inputs are recomputable from a norm's
kept input (those after norm + activation) and which are not (the network input, after a pool,
after a concatenation).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def _act(kind: str, channels: int) -> nn.Module:
    if kind == "leaky":
        return nn.LeakyReLU(0.1, inplace=True)
    if kind == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"activation must be 'leaky' or 'prelu', got {kind!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {kind!r}")


class TwoConv(nn.Sequential):
    """(conv 3x3x3, norm, activation) twice, as MONAI's TwoConv."""

    def __init__(self, cin: int, cout: int, act: str, stride: int = 1, norm: str = "instance") -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
            _norm(norm, cout),
            _act(act, cout),
            nn.Conv3d(cout, cout, 3, padding=1),
            _norm(norm, cout),
            _act(act, cout),
        )


class UNet3d(nn.Module):
    """Encoder stages `channels`, a decoder back up with skip concatenations, and a 1x1x1 head.

    down='pool': max-pool then TwoConv; down='stride': TwoConv whose first conv has stride 2.
    norm='instance': InstanceNorm3d(affine=True); norm='batch': BatchNorm3d. Each spatial side must
    be a multiple of 2 ** (len(channels) - 1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: tuple[int, ...] = (8, 16, 32),
        act: str = "leaky",
        down: str = "pool",
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if down not in ("pool", "stride"):
            raise ValueError(f"down must be 'pool' or 'stride', got {down!r}")
        self.down = down
        self.stem = TwoConv(in_channels, channels[0], act, norm=norm)
        self.encoders = nn.ModuleList(
            TwoConv(cin, cout, act, stride=2 if down == "stride" else 1, norm=norm)
            for cin, cout in itertools.pairwise(channels)
        )
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(cin, cout, 2, stride=2)
            for cin, cout in zip(channels[:0:-1], channels[-2::-1], strict=True)
        )
        self.decoders = nn.ModuleList(TwoConv(2 * c, c, act, norm=norm) for c in channels[-2::-1])
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for encoder in self.encoders:
            skips.append(x)
            x = encoder(self.pool(x) if self.down == "pool" else x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)
