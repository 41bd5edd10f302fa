"""Model files for the CLI, model-loading and profiling tests: small, fast, written to tmp_path."""

from __future__ import annotations

from pathlib import Path

TINY_NET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.blocks(self.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))
'''

TINY_SHAPE = "3x16x16"

# A 3-D net with a constructor keyword. InstanceNorm3d and Conv3d also take an unbatched 4-D input,
# so a 2-D default shape (1x3x224x224 read as one unbatched C x D x H x W sample) would run silently.
NET3D = """
from torch import nn


class Net3d(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 2):
        super().__init__()
        self.stem = nn.Conv3d(in_channels, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.relu = nn.ReLU()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = self.conv(self.relu(self.norm(self.stem(x))))
        return self.head(x.mean(dim=(-3, -2, -1)))
"""

# Norm-free depthwise convs: the default recipe keeps them exact, `mobilenet` probes them.
DEPTHWISE_NET = """
from torch import nn


def build_model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(source)
    return path


def tiny_net(directory: Path, name: str = "tiny.py", extra: str = "") -> Path:
    """TinyNet (the only nn.Module class that constructs without arguments) plus `extra` source."""
    return write(directory, name, TINY_NET + extra)


def snapshot(path: Path) -> tuple[bytes, int]:
    """A file's bytes and modification time, to show it was left untouched."""
    return path.read_bytes(), path.stat().st_mtime_ns
