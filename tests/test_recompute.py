"""recompute_saved / enable: saved norm-to-conv tensors recomputed in backward, exactly, for less memory."""

from __future__ import annotations

import contextlib
import copy
import io
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b0, resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import SqueezeExcitation

from xconv_patch.memory import retained_bytes
from xconv_patch.recompute import RecomputeTracker, disable, enable, recompute_active, recompute_saved, untracked

# ----------------------------------------------------------------------------------------------
# Helpers.


def conv_bn_act_conv(act: nn.Module, norm: nn.Module | None = None, channels: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        norm if norm is not None else nn.BatchNorm2d(channels),
        act,
        nn.Conv2d(channels, 6, 3, padding=1),
    )


class ConvNeXtStyle(nn.Module):
    """A channels-last LayerNorm between convolutions (LayerNorm2d), then a ConvNeXt block's MLP."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.LayerNorm(channels)
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.block_norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.fc2 = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.block_norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


def mbconv(channels: int = 8, expand: int = 4) -> nn.Sequential:
    hidden = channels * expand
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.Conv2d(channels, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.SiLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
        nn.BatchNorm2d(hidden),
        nn.SiLU(inplace=True),
        SqueezeExcitation(hidden, channels // 2),
        nn.Conv2d(hidden, channels, 1),
        nn.BatchNorm2d(channels),
    )


def plain_and_recomputed(
    model: nn.Module, x: torch.Tensor, tracker: RecomputeTracker | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RecomputeTracker]:
    """One forward + backward of a model and of its copy under the mechanism; everything compared.

    Returns the two results (output, input gradient, parameter gradients, buffers) and the tracker.
    """

    def step(net: nn.Module, recompute: RecomputeTracker | None) -> dict[str, torch.Tensor]:
        inp = x.detach().clone().requires_grad_()
        torch.manual_seed(1)
        if recompute is None:
            out = net(inp)
        else:
            with recompute:
                out = net(inp)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        result = {"output": out.detach(), "input.grad": inp.grad}
        result.update({f"{name}.grad": p.grad for name, p in net.named_parameters()})
        result.update(dict(net.named_buffers()))
        return result

    twin = copy.deepcopy(model)
    tracker = tracker or recompute_saved()
    return step(model, None), step(twin, tracker), tracker


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal to rounding: a batch norm is replayed by its inference kernel from its batch statistics,
    which rounds differently from the training kernel (float64: 1e-10; float32 through a deep net: 1e-4)."""
    tight = {"rtol": 1e-10, "atol": 1e-12} if expected.dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(actual, expected, **tight, msg=name or None)


def assert_identical(plain: dict[str, torch.Tensor], recomputed: dict[str, torch.Tensor]) -> None:
    """Outputs and buffers bit for bit (the forward is the same; statistics are updated once),
    gradients exact to rounding."""
    assert plain.keys() == recomputed.keys()
    for name, expected in plain.items():
        if name.endswith(".grad"):
            assert_exact(recomputed[name], expected, name)
        else:
            assert torch.equal(recomputed[name], expected), name


# ----------------------------------------------------------------------------------------------
# 1, 2. Exact outputs, gradients and running statistics.

BLOCKS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "bn-relu": lambda: (conv_bn_act_conv(nn.ReLU()), torch.randn(2, 3, 8, 8)),
    "bn-relu-inplace": lambda: (conv_bn_act_conv(nn.ReLU(inplace=True)), torch.randn(2, 3, 8, 8)),
    "bn-relu6-inplace": lambda: (conv_bn_act_conv(nn.ReLU6(inplace=True)), torch.randn(2, 3, 8, 8)),
    "bn-hardswish": lambda: (conv_bn_act_conv(nn.Hardswish()), torch.randn(2, 3, 8, 8)),
    "bn-mish-elu": lambda: (conv_bn_act_conv(nn.Sequential(nn.Mish(), nn.ELU())), torch.randn(2, 3, 8, 8)),
    "bn-prelu": lambda: (conv_bn_act_conv(nn.PReLU(8)), torch.randn(2, 3, 8, 8)),
    "mbconv-se": lambda: (mbconv(), torch.randn(2, 3, 8, 8)),
    "groupnorm-gelu": lambda: (conv_bn_act_conv(nn.GELU(), nn.GroupNorm(2, 8)), torch.randn(2, 3, 8, 8)),
    "groupnorm-gelu-tanh": lambda: (
        conv_bn_act_conv(nn.GELU(approximate="tanh"), nn.GroupNorm(4, 8)),
        torch.randn(2, 3, 8, 8),
    ),
    "instancenorm3d-leaky-inplace": lambda: (
        nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1),
            nn.InstanceNorm3d(4, affine=True),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(4, 3, 3, padding=1),
        ),
        torch.randn(2, 2, 4, 4, 4),
    ),
    "instancenorm2d-tracked": lambda: (
        conv_bn_act_conv(nn.ReLU(), nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
        torch.randn(2, 3, 8, 8),
    ),
    "layernorm-channels-last": lambda: (ConvNeXtStyle(), torch.randn(2, 3, 8, 8)),
    "batchnorm1d-conv": lambda: (
        nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.Tanh(), nn.Conv1d(8, 4, 3)),
        torch.randn(2, 3, 16),
    ),
    "batchnorm1d-linear": lambda: (
        nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 4)),
        torch.randn(16, 3),
    ),
    "batchnorm3d": lambda: (
        nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.SiLU(), nn.Conv3d(4, 3, 1)),
        torch.randn(2, 2, 5, 5, 5),
    ),
    "basicblock": lambda: (
        BasicBlock(8, 8),
        torch.randn(2, 8, 8, 8),
    ),
    "bottleneck-downsample": lambda: (
        Bottleneck(8, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))),
        torch.randn(2, 8, 8, 8),
    ),
    "resnet18": lambda: (resnet18(num_classes=10), torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_outputs_and_statistics_bit_identical_gradients_exact(name: str, dtype: torch.dtype) -> None:
    model, x = BLOCKS[name]()
    plain, recomputed, tracker = plain_and_recomputed(model.to(dtype), x.to(dtype))
    assert_identical(plain, recomputed)
    assert tracker.packed > 0
    assert tracker.recomputed > 0


def test_efficientnet_b0_with_stochastic_depth() -> None:
    model = efficientnet_b0(num_classes=10, stochastic_depth_prob=0.5)
    plain, recomputed, tracker = plain_and_recomputed(model, torch.randn(2, 3, 32, 32))
    gradients = [name for name in plain if name.endswith(".grad")]
    assert all(torch.equal(recomputed[name], plain[name]) for name in plain if name not in gradients)
    # Random-init gradients reach 1e9 here, and some are cancellations of such terms: compare all at once.
    difference = torch.cat([(recomputed[name] - plain[name]).flatten() for name in gradients])
    assert difference.norm() < 1e-5 * torch.cat([plain[name].flatten() for name in gradients]).norm()
    assert tracker.packed > 50


NORM_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "native_batch_norm-train": lambda x, w, b, rm, rv: torch.ops.aten.native_batch_norm(
        x, w, b, rm, rv, True, 0.1, 1e-5
    ),
    "native_batch_norm-eval": lambda x, w, b, rm, rv: torch.ops.aten.native_batch_norm(
        x, w, b, rm, rv, False, 0.1, 1e-5
    ),
    "_native_batch_norm_legit-train": lambda x, w, b, rm, rv: torch.ops.aten._native_batch_norm_legit(
        x, w, b, rm, rv, True, 0.1, 1e-5
    ),
    "_native_batch_norm_legit-no_stats": lambda x, w, b, rm, rv: torch.ops.aten._native_batch_norm_legit.no_stats(
        x, w, b, True, 0.1, 1e-5
    ),
    "_native_batch_norm_legit_no_training": lambda x, w, b, rm, rv: torch.ops.aten._native_batch_norm_legit_no_training(
        x, w, b, rm, rv, 0.1, 1e-5
    ),
    "_batch_norm_with_update": lambda x, w, b, rm, rv: torch.ops.aten._batch_norm_with_update(
        x, w, b, rm, rv, 0.1, 1e-5
    ),
    "_batch_norm_no_update": lambda x, w, b, rm, rv: torch.ops.aten._batch_norm_no_update(x, w, b, rm, rv, 0.1, 1e-5),
}


@pytest.mark.parametrize("name", list(NORM_OPS))
def test_every_batch_norm_op_replays_exactly_without_touching_statistics(name: str) -> None:
    """The aten batch-norm variants other front ends (export, CUDA, functionalization) dispatch to."""
    weight, bias = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)

    def run(recompute: bool) -> list[torch.Tensor]:
        stats = [torch.zeros(4), torch.ones(4)]
        tracker = recompute_saved()
        with tracker if recompute else contextlib.nullcontext():
            out = F.silu(NORM_OPS[name](x, weight, bias, *stats)[0])
            if recompute:
                assert tracker.describe(out) == "silu(batch_norm(x))"
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert not recompute or tracker.packed == tracker.recomputed == 1  # the SiLU input
        grads = [t.grad.clone() for t in (x, weight, bias)]
        for t in (x, weight, bias):
            t.grad = None
        return [out.detach(), *grads, *stats]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_are_updated_once_per_step(momentum: float | None) -> None:
    model = conv_bn_act_conv(nn.ReLU(inplace=True))
    model[1].momentum = momentum  # None: a cumulative average, which a second update would shift
    twin = copy.deepcopy(model)
    for step in range(2):
        x = torch.randn(4, 3, 8, 8)
        model(x).sum().backward()
        with recompute_saved() as tracker:
            out = twin(x)
        out.sum().backward()
        assert tracker.recomputed > 0
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, twin.get_buffer(name)), (step, name)
    assert twin[1].num_batches_tracked.item() == 2


def test_recomputed_tensors_are_bit_identical_and_described() -> None:
    model = mbconv()
    seen: dict[str, torch.Tensor] = {}
    for index in (4, 8):
        model[index].register_forward_pre_hook(lambda m, args, index=index: seen.__setitem__(str(index), args[0]))
    with recompute_saved() as tracker:
        model(torch.randn(2, 3, 8, 8))
        assert tracker.describe(seen["4"]) == "silu(batch_norm(x))"
        assert tracker.describe(seen["8"]) == "mul(s, silu(batch_norm(x)))"
        for tensor in seen.values():
            assert_exact(tracker.recompute(tensor), tensor)
        assert tracker.anchor(seen["4"]) is not None
        assert tracker.describe(torch.randn(3)) is None


@pytest.mark.parametrize("inplace", [False, True])
def test_one_backward_replays_each_op_once(inplace: bool) -> None:
    model = conv_bn_act_conv(nn.SiLU(inplace=inplace))
    with recompute_saved() as tracker:
        out = model(torch.randn(2, 3, 8, 8))
    assert tracker.packed == 2  # the SiLU's input (autograd's copy of it if in place) and conv2's input
    out.sum().backward()
    assert tracker.recomputed == 2  # batch_norm and silu, each once; the copy is not replayed


# ----------------------------------------------------------------------------------------------
# 3. Memory.


def test_silu_input_and_next_conv_input_are_not_kept() -> None:
    model = conv_bn_act_conv(nn.SiLU())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    activation = 2 * 8 * 8 * 8 * 4  # one float32 tensor of the block: B x C x H x W
    plain = retained_bytes(lambda: model(x))

    def recomputed() -> torch.Tensor:
        with recompute_saved():
            return model(x)

    kept = retained_bytes(recomputed)
    assert plain - kept == 2 * activation  # the SiLU's input and output (conv2's input)
    assert activation <= kept < activation + 128  # the BatchNorm input, and its statistics


def test_outer_saved_tensor_hooks_see_exactly_what_is_kept() -> None:
    """Hooks around the tracker (a measurement, a user's offloading) get every tensor it keeps as is."""
    model = conv_bn_act_conv(nn.SiLU())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    outer_packed: list[int] = []

    def pack(tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        if not isinstance(tensor, nn.Parameter):
            outer_packed.append(tensor.untyped_storage().nbytes())
        return ("outer", tensor)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved[1]):
        with recompute_saved():
            output = model(x)
    output.square().sum().backward()
    gradients = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    for tensor in (x, *model.parameters()):
        tensor.grad = None
    model(x).square().sum().backward()
    for a, b in zip(gradients, (x, *model.parameters()), strict=True):
        assert_exact(a, b.grad)
    activation = 2 * 8 * 8 * 8 * 4
    statistics = [8 * 4] * 4  # BatchNorm's batch mean and inverse std, and its running mean and variance
    assert sorted(outer_packed) == sorted([2 * 3 * 8 * 8 * 4, activation, *statistics])  # x, the BN input


def test_bottleneck_keeps_its_norm_inputs_but_not_relu_outputs() -> None:
    block = Bottleneck(16, 4)  # width 4, 16 channels in and out
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    plain = retained_bytes(lambda: block(x))

    def recomputed() -> torch.Tensor:
        with recompute_saved():
            return block(x)

    width_tensor = 2 * 4 * 8 * 8 * 4
    assert plain - retained_bytes(recomputed) == 2 * width_tensor  # relu(bn1) and relu(bn2), conv2 and conv3 inputs


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(3, 1, 1, ceil_mode=True),
        nn.MaxPool3d((2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 2, 1), ceil_mode=True),
        nn.AvgPool2d(2),
    ],
    ids=["max2d", "max2d-stride1-ceil", "max3d-dilated-ceil", "avg2d"],
)
def test_a_pool_after_the_activation_is_recomputed_with_its_indices(pool: nn.Module) -> None:
    """The pool's output and indices are replayed, bit for bit; a max pool keeps one byte per output
    (each maximum's offset in its window) instead of its int64 indices."""
    volume = isinstance(pool, nn.MaxPool3d)
    conv, norm = (nn.Conv3d, nn.BatchNorm3d) if volume else (nn.Conv2d, nn.BatchNorm2d)
    model = nn.Sequential(conv(3, 8, 3, padding=1), norm(8), nn.ReLU(inplace=True), pool, conv(8, 6, 3, padding=1))
    x = torch.randn(2, 3, *((7, 8, 9) if volume else (8, 8)), requires_grad=True)

    def recomputed() -> torch.Tensor:
        with recompute_saved():
            return model(x)

    activation = 8 * x[:, 0].numel() * 4  # the BatchNorm input
    offsets = pool(torch.zeros(2, 8, *x.shape[2:])).numel() if not isinstance(pool, nn.AvgPool2d) else 0
    assert retained_bytes(recomputed) == activation + 2 * 8 * 4 + offsets  # + the batch statistics
    expected = model(x).square().sum()
    gradients = torch.autograd.grad(expected, (x, *model.parameters()))
    again = torch.autograd.grad(recomputed().square().sum(), (x, *model.parameters()))
    for a, b in zip(gradients, again, strict=True):
        assert_exact(a, b)


def test_retained_bytes_counts_copies_made_by_ops_that_may_alias() -> None:
    """`to` and `reshape` may return their input or a copy: a copy something keeps is counted."""

    class KeepsACopy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            ctx.copies = x.to(torch.float64), x.t().reshape(-1)
            return x * 2

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return grad * 2

    x = torch.randn(16, 8, requires_grad=True)
    assert retained_bytes(lambda: KeepsACopy.apply(x)) == x.numel() * (8 + 4)


def test_an_add_in_place_of_a_kept_tensor_stops_recomputation() -> None:
    block = BasicBlock(8, 8)  # out = relu(bn2(...) + x): x is the network input
    with recompute_saved() as tracker:
        out = block(torch.randn(2, 8, 8, 8, requires_grad=True))
        assert not tracker.is_recomputable(out)


def test_chains_longer_than_max_depth_are_kept() -> None:
    bn = nn.BatchNorm2d(4)
    with recompute_saved(max_depth=3) as tracker:
        y = bn(torch.randn(2, 4, 4, 4, requires_grad=True)).sigmoid().tanh()
        assert tracker.describe(y) == "tanh(sigmoid(batch_norm(x)))"
        assert not tracker.is_recomputable(y.relu())


def test_ops_run_untracked_record_nothing_and_tracking_resumes() -> None:
    bn = nn.BatchNorm2d(4)
    with recompute_saved() as tracker:
        y = bn(torch.randn(2, 4, 4, 4, requires_grad=True))
        recipes = tracker.recipes
        with untracked():
            hidden = y.relu()
        assert tracker.recipes == recipes and not tracker.is_recomputable(hidden)
        assert tracker.describe(y.relu()) == "relu(batch_norm(x))"


# ----------------------------------------------------------------------------------------------
# 4. Modes and autograd entry points.


def test_eval_mode_batchnorm_with_grad_is_exact() -> None:
    model = mbconv().eval()
    plain, recomputed, tracker = plain_and_recomputed(model, torch.randn(2, 3, 8, 8))
    assert_identical(plain, recomputed)
    assert tracker.packed > 0


def test_frozen_norm_anchors_nothing_without_grad() -> None:
    model = conv_bn_act_conv(nn.ReLU())
    model.requires_grad_(False)
    with recompute_saved() as tracker:
        model(torch.randn(2, 3, 8, 8))
    assert tracker.recipes == 0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_nothing_is_tracked_without_grad(context: Callable) -> None:
    model = conv_bn_act_conv(nn.SiLU())
    x = torch.randn(2, 3, 8, 8)
    with context(), recompute_saved() as outside:
        assert not recompute_active()
        model(x)
    with recompute_saved() as inside, context():
        model(x)
    assert outside.recipes == inside.recipes == inside.packed == inside.recomputed == 0


def test_autograd_grad_and_retain_graph_twice() -> None:
    model = conv_bn_act_conv(nn.SiLU()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    with recompute_saved() as tracker:
        loss = model(x).sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True)
    once = tracker.recomputed
    second = torch.autograd.grad(loss, [x, *model.parameters()])
    assert once > 0 and tracker.recomputed > once
    for a, b, c in zip(expected, first, second, strict=True):
        assert_exact(b, a)
        assert torch.equal(b, c)  # one backward replays as the other


def test_double_backward_is_exact() -> None:
    model = conv_bn_act_conv(nn.SiLU()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def second_order(recompute: bool) -> list[torch.Tensor]:
        if recompute:
            with recompute_saved():
                out = model(x)
        else:
            out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()], create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return list(torch.autograd.grad(penalty, [x, *model.parameters()]))

    for a, b in zip(second_order(False), second_order(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_in_place_change_of_a_norm_input_raises_like_autograd() -> None:
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    with recompute_saved():
        h = conv(torch.randn(2, 3, 4, 4))
        out = F.silu(bn(h))
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_cpu_bfloat16_autocast_matches_plain_autocast() -> None:
    model = mbconv()
    x = torch.randn(2, 3, 8, 8)

    class Autocast(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(inp)

    plain, recomputed, tracker = plain_and_recomputed(Autocast(model), x)
    assert recomputed["output"].dtype == torch.bfloat16
    assert_identical(plain, recomputed)
    assert tracker.packed > 0


# ----------------------------------------------------------------------------------------------
# 6. Module hook: copy, pickle, removal, exceptions.


def active_inside(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a tracker is active while `model[1]` runs."""
    seen: list[bool] = []
    handle = model[1].register_forward_hook(lambda *_: seen.append(recompute_active()))
    model(x)
    handle.remove()
    return seen[0]


def gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    inp = x.clone().requires_grad_()
    model(inp).square().sum().backward()
    return [inp.grad, *(p.grad for p in model.parameters())]


def test_enable_deepcopy_save_load_and_disable() -> None:
    model = conv_bn_act_conv(nn.SiLU())
    x = torch.randn(2, 3, 8, 8)
    hook = enable(model)
    assert enable(model) is hook
    assert active_inside(model, x)
    assert not recompute_active()

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert active_inside(other, x)
        reference = copy.deepcopy(other)
        assert disable(reference) == 1
        assert not active_inside(reference, x)
        for a, b in zip(gradients(reference, x), gradients(other, x), strict=True):
            assert_exact(b, a)

    hook.remove()
    assert not active_inside(model, x)
    assert disable(model) == 0


def test_enabled_model_gradients_are_exact_and_untracked_under_no_grad() -> None:
    model = BLOCKS["bottleneck-downsample"]()[0]
    twin = copy.deepcopy(model)
    enable(twin)
    x = torch.randn(2, 8, 8, 8)
    model(x).sum().backward()
    twin(x).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_exact(q.grad, p.grad)
    with torch.no_grad():
        seen: list[bool] = []
        twin.conv2.register_forward_hook(lambda *_: seen.append(recompute_active()))
        twin(x)
    assert seen == [False]


def test_an_exception_in_forward_ends_tracking() -> None:
    model = conv_bn_act_conv(nn.SiLU())
    enable(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 8, 8))
    assert not recompute_active()


def test_enable_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        enable(lambda x: x)


# ----------------------------------------------------------------------------------------------
# 7. Threads.


def test_two_threads_train_their_own_models() -> None:
    """Both threads are inside a forward at once (a barrier mid-forward), each with its own tracker."""
    models = [BLOCKS["mbconv-se"]()[0], BLOCKS["bottleneck-downsample"]()[0]]
    inputs = [torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)]
    expected = []
    for model, x in zip(models, inputs, strict=True):
        reference = copy.deepcopy(model)
        for _ in range(3):
            reference(x).square().sum().backward()
        expected.append([p.grad for p in reference.parameters()])
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []
    active: list[bool] = []

    def meet(*_: object) -> None:
        barrier.wait()
        active.append(recompute_active())

    def train(model: nn.Module, x: torch.Tensor) -> None:
        try:
            enable(model)
            next(iter(model.children())).register_forward_hook(meet)
            for _ in range(3):
                model(x).square().sum().backward()
                assert not recompute_active()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=train, args=pair) for pair in zip(models, inputs, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert active == [True] * 6
    for model, grads in zip(models, expected, strict=True):
        for p, g in zip(model.parameters(), grads, strict=True):
            assert_exact(g, p.grad)


# ----------------------------------------------------------------------------------------------
# 8. Analysis on meta tensors.


def test_resnet50_on_meta_reports_recomputable_conv_inputs() -> None:
    """Only the stem conv keeps its input.

    conv2 and conv3 inputs are relu(batch_norm); the first block's input is a max-pool of one; a
    block output is relu(bn3 + identity), where the identity is the projection's batch_norm or the
    previous block's output: recomputable in turn.
    """
    with torch.device("meta"):
        model = resnet50()
    described: dict[str, str | None] = {}
    anchors: dict[str, torch.Tensor | None] = {}
    norm_inputs: dict[str, torch.Tensor] = {}
    with recompute_saved() as tracker:

        def record(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                if isinstance(module, nn.BatchNorm2d):
                    norm_inputs[name] = args[0]
                else:
                    described[name] = tracker.describe(args[0])
                    anchors[name] = tracker.anchor(args[0])

            return hook

        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.BatchNorm2d):
                module.register_forward_pre_hook(record(name))
        model(torch.randn(2, 3, 224, 224, device="meta"))
    assert [name for name, text in described.items() if text is None] == ["conv1"]
    assert described.pop("maxpool") == "relu(batch_norm(x))"
    pooled = "max_pool2d(relu(batch_norm(x)))"
    assert described.pop("layer1.0.conv1") == described.pop("layer1.0.downsample.0") == pooled
    for name, text in described.items():
        if name.endswith(("conv2", "conv3")):
            assert text == "relu(batch_norm(x))", name
            assert anchors[name] is norm_inputs[name.replace("conv", "bn")[:-1] + str(int(name[-1]) - 1)], name
        elif text is not None:
            assert name.endswith(("conv1", "downsample.0")), name
            assert text.startswith("relu(add(batch_norm(x), "), name
    assert described["layer1.1.conv1"] == "relu(add(batch_norm(x), batch_norm(x)))"
    assert len(described) == 16 * 3 + 4 - 1


def test_ops_are_recognised_by_name_when_torch_makes_new_op_objects() -> None:
    """torch may build a new OpOverload object for an op it had already handed out (a library
    registering kernels later does: seen after Lightning's tests): the allow-list still knows it."""
    packet = torch.ops.aten.leaky_relu
    original = packet.default
    delattr(packet, "default")
    try:
        assert packet.default is not original
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(), nn.Conv2d(4, 4, 3))
        with recompute_saved() as tracker:
            model(torch.randn(2, 3, 8, 8)).sum()
        assert tracker.packed == 2  # the LeakyReLU's input for its backward, its output for the conv
    finally:
        packet.default = original
