"""The storage plan on real model shapes: which conv inputs are recomputed, probed or kept, and that
the converted model then behaves as the plan says (DESIGN.md section 2).

Each model kind checks, through convert() only: the planned storage of its key convolutions;
outputs bit-identical to the unconverted model; every gradient but the probed convs' weight
gradients equal to the unconverted model's; the saved-activation bytes of real forwards equal to
the report's before/after figures; and the ratio they imply. BatchNorm running statistics, eval
mode and no_grad, and a conv whose probes would free nothing are tested on their own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import torch
from gradients import assert_gradients_match
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.ops import SqueezeExcitation

from benchmarks.unet3d import UNet3d
from xconv_patch import convert
from xconv_patch.conversion import ConversionReport
from xconv_patch.memory import saved_activation_bytes

# ----------------------------------------------------------------------------------------------
# Models.


def gn_gelu(approximate: str) -> nn.Sequential:
    """Conv, GroupNorm, GELU twice, then a 1x1 conv: both later convs read a recomputable input."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.GELU(approximate=approximate),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.GELU(approximate=approximate),
        nn.Conv2d(16, 8, 1),
    )


def convnext_style() -> nn.Sequential:
    """torchvision's ConvNeXt pieces: patchify stem + LayerNorm2d, a block, a LayerNorm2d + strided
    downsample, a block. The first block's depthwise conv and the downsample read a norm's output;
    the second block's depthwise conv reads the downsample's output, which no norm produced."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4),
        LayerNorm2d(16),
        CNBlock(16, layer_scale=1e-6, stochastic_depth_prob=0.0),
        LayerNorm2d(16),
        nn.Conv2d(16, 32, 2, stride=2),
        CNBlock(32, layer_scale=1e-6, stochastic_depth_prob=0.0),
    )


def bn1d() -> nn.Sequential:
    """Conv1d, BatchNorm1d, ReLU / SiLU: the two later convs read recomputable inputs."""
    return nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Conv1d(16, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.SiLU(inplace=True),
        nn.Conv1d(16, 8, 1),
    )


class MBConv(nn.Module):
    """An inverted-residual block as torchvision's efficientnet / mobilenet_v3 build it: expand conv,
    BN, act; depthwise conv, BN, act; squeeze-excitation (x * gate); project conv, BN; residual."""

    def __init__(self, channels: int, scale: type[nn.Module]) -> None:
        super().__init__()
        hidden = 4 * channels
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()
        )
        self.se = SqueezeExcitation(hidden, channels // 2, activation=nn.SiLU, scale_activation=scale)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


def se_net(scale: type[nn.Module]) -> nn.Sequential:
    """Stem conv + BN + SiLU, then two MBConv blocks."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        MBConv(16, scale),
        MBConv(16, scale),
    )


# ----------------------------------------------------------------------------------------------
# Checks.


def convert_copy(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module, ConversionReport]:
    """(reference, converted, report): the converted model shares no tensor with the reference."""
    reference = copy.deepcopy(model)
    converted = convert(model, input_shape=shape)
    return reference, converted, converted.xconv_report


def storages(report: ConversionReport) -> dict[str, str]:
    return {layer.name: layer.storage for layer in report.layers}


def gradients(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter gradient of a weighted-sum loss, from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weight).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_behaves_as_planned(
    model: nn.Module, shape: tuple[int, ...], expected: Mapping[str, str], min_ratio: float
) -> ConversionReport:
    """The planned storage of the named convs is `expected`; outputs bit-identical; gradients exact
    but probed convs' weights; measured saved bytes equal the report's; before/after > min_ratio."""
    reference, converted, report = convert_copy(model, shape)
    planned = storages(report)
    assert {name: planned[name] for name in expected} == dict(expected), report.summary()
    x = torch.randn(shape)
    out_ref, grads_ref = gradients(reference, x, weight := torch.randn_like(reference(x)))
    out, grads = gradients(converted, x, weight)
    assert torch.equal(out, out_ref)
    probed = {name for name, storage in planned.items() if storage == "probed"}
    assert set(grads) == set(grads_ref)
    compared = set(grads_ref) - {f"{layer}.weight" for layer in probed}
    assert_gradients_match({name: grads[name] for name in compared}, {name: grads_ref[name] for name in compared})
    assert saved_activation_bytes(reference, lambda: reference(x)) == report.activation_bytes_before
    assert saved_activation_bytes(converted, lambda: converted(x)) == report.activation_bytes_after
    ratio = report.activation_bytes_before / report.activation_bytes_after
    assert ratio > min_ratio, report.summary()
    return report


# ----------------------------------------------------------------------------------------------
# The 3-D U-Net.

UNET_SHAPE = (2, 1, 16, 16, 16)


@pytest.mark.parametrize(
    ("act", "down", "min_ratio"), [("leaky", "pool", 2.4), ("prelu", "pool", 3.3), ("leaky", "stride", 2.3)]
)
def test_unet3d(act: str, down: str, min_ratio: float) -> None:
    """After norm + activation: recomputed (also the transposed convs, the strided down convs, the
    head, and after a max-pool of such a tensor: the pool is replayed too); after the skip
    concatenation: probed; the network input: kept (the default recipe's first-conv rule)."""
    expected = {"stem.0": "kept", "stem.3": "recomputed", "head": "recomputed"}
    for i in range(2):
        expected |= {f"encoders.{i}.3": "recomputed", f"ups.{i}": "recomputed"}
        expected |= {f"decoders.{i}.0": "probed", f"decoders.{i}.3": "recomputed"}
        expected[f"encoders.{i}.0"] = "recomputed"
    model = UNet3d(act=act, down=down)
    assert_behaves_as_planned(model, UNET_SHAPE, expected, min_ratio)


def test_conv_after_transposed_conv_is_probed() -> None:
    """A transposed conv's output, with no norm after it, is not recomputable: the conv reading it probes."""
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1),
        nn.InstanceNorm3d(8, affine=True),
        nn.LeakyReLU(inplace=True),
        nn.ConvTranspose3d(8, 8, 2, stride=2),
        nn.Conv3d(8, 4, 3, padding=1),
    )
    expected = {"0": "kept", "3": "recomputed", "4": "probed"}
    assert_behaves_as_planned(model, (2, 1, 8, 8, 8), expected, 1.0)


# ----------------------------------------------------------------------------------------------
# 2-D and 1-D blocks.


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_groupnorm_gelu(approximate: str) -> None:
    expected = {"0": "kept", "3": "recomputed", "6": "recomputed"}
    assert_behaves_as_planned(gn_gelu(approximate), (4, 3, 16, 16), expected, 2.5)


def test_convnext_block() -> None:
    """The depthwise conv and the downsample after a LayerNorm2d are recomputed; the second block's
    depthwise conv stays kept (the default recipe does not probe depthwise convs). The MLP's hidden
    tensors (GELU input and output, 4x the channels) have no norm before them and stay kept, hence
    the small ratio."""
    expected = {"0": "kept", "2.block.0": "recomputed", "4": "recomputed", "5.block.0": "kept"}
    report = assert_behaves_as_planned(convnext_style(), (4, 3, 32, 32), expected, 1.15)
    assert report.layer("5.block.0").reason.startswith("depthwise")


def test_batchnorm1d_conv1d() -> None:
    expected = {"0": "kept", "3": "recomputed", "6": "recomputed"}
    assert_behaves_as_planned(bn1d(), (4, 4, 64), expected, 2.0)


@pytest.mark.parametrize("scale", [nn.Sigmoid, nn.Hardsigmoid])
def test_squeeze_excitation(scale: type[nn.Module]) -> None:
    """The project conv reads x * gate (x after BN + SiLU, a small gate): recomputed. The second
    block's expand conv reads the residual sum of two recomputable tensors: recomputed too. The
    squeeze convs read one pixel: kept."""
    expected = {"0": "kept"}
    for block in ("3", "4"):
        expected |= {f"{block}.{conv}": "recomputed" for conv in ("expand.0", "depthwise.0", "project.0")}
        expected |= {f"{block}.se.fc1": "kept", f"{block}.se.fc2": "kept"}
    assert_behaves_as_planned(se_net(scale), (4, 3, 32, 32), expected, 2.8)


# ----------------------------------------------------------------------------------------------
# Hazards: running statistics, eval mode, no_grad; and probes that would free nothing.


def test_batchnorm_statistics_after_a_training_step() -> None:
    """A training step (forward, backward, SGD) of the converted model leaves the same running
    statistics as the original's (the backward's batch-norm replays do not update them) and the
    same weights to rounding."""
    model = bn1d()
    reference, converted, report = convert_copy(model, (4, 4, 64))
    assert report.recomputes and report.count("patched") == 0
    x = torch.randn(4, 4, 64)
    for net in (reference, converted):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x).square().mean().backward()
        optimizer.step()
    buffers = dict(reference.named_buffers())
    for (name, ours), theirs in zip(converted.state_dict().items(), reference.state_dict().values(), strict=True):
        if name in buffers:
            assert torch.equal(ours, theirs), name
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
    assert int(converted.state_dict()["1.num_batches_tracked"]) == 1
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", [bn1d, UNet3d], ids=["bn1d", "unet3d"])
def test_eval_and_no_grad_outputs(model: type[nn.Module]) -> None:
    """Eval mode and no_grad (train mode) give the original's outputs, and the running statistics
    a no_grad forward updates are the original's."""
    net = model()
    shape = (2, 4, 32) if model is bn1d else (2, 1, 8, 8, 8)
    reference, converted, _ = convert_copy(net, shape)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))
    for ours, theirs in zip(converted.buffers(), reference.buffers(), strict=True):
        assert torch.equal(ours, theirs)
    converted.eval(), reference.eval()
    assert torch.equal(converted(x), reference(x))
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))


class PooledBranch(nn.Module):
    """A conv output with no norm after it feeds both a conv and a max-pool, which keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.pool(self.conv(h)) + self.pool(h)


def test_probing_that_frees_nothing_stays_exact() -> None:
    """The conv would be probed (its input is not recomputable), but the max-pool keeps that input
    anyway: it stays an exact torch conv, and the saved bytes do not change."""
    model = PooledBranch()
    report = assert_behaves_as_planned(model, (2, 3, 16, 16), {"stem": "kept", "conv": "kept"}, 0.99)
    layer = report.layer("conv")
    assert layer.action == "exact"
    assert layer.reason.startswith("probing would free nothing: its input is still kept by"), layer.reason
    assert "pool" in layer.reason
    assert report.activation_bytes_after == report.activation_bytes_before
