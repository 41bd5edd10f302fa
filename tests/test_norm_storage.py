"""Compressed norm inputs (convert(..., norm_storage=...), recipe key `norm_storage`): the bytes the
plan predicts are what autograd keeps, the forward is unchanged, gradients stay close to exact and
the norms' parameter gradients unbiased, and what would move a replay's selection stays exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks.unet3d import UNet3d
from xconv_patch import BitLeakyReLU, BitReLU, Recipe, RecipeError, convert, plan
from xconv_patch.memory import SavedTensors
from xconv_patch.recompute import NORM_STORAGES
from xconv_patch.recompute.compressed import GROUP, Compressed, stored_bytes

SHAPE = (4, 3, 64, 64)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tail", "chunks"])
def test_compressed_copy_keeps_layout_and_rounds_between_neighbouring_levels(kind: str, layout: str) -> None:
    torch.manual_seed(0)
    shape = {"tail": (2, 8, 9, 7), "chunks": (3, 8, 113, 117)}.get(layout, (2, 8, 16, 16))  # chunks: > 1 CPU chunk
    x = torch.randn(shape) * 3 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    copy_ = Compressed(x, kind)
    y = copy_.decompress()
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    assert copy_.nbytes == stored_bytes(x.numel(), 4, kind) < x.numel() * 4
    if kind == "bfloat16":
        assert ((y - x).abs() <= x.abs() * 2**-7).all()
    else:
        flat = x.permute(0, 2, 3, 1).reshape(-1) if layout == "channels_last" else x.reshape(-1)
        groups = [flat[i : i + GROUP] for i in range(0, flat.numel(), GROUP)]
        steps = torch.cat([(g.max() - g.min()).div(255).expand(g.numel()) for g in groups])
        error = (y.permute(0, 2, 3, 1).reshape(-1) if layout == "channels_last" else y.reshape(-1)) - flat
        assert (error.abs() <= steps * 1.0001).all()


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_empty_tensor_round_trips(kind: str) -> None:
    x = torch.empty(0, 8, 4, 4)
    copy_ = Compressed(x, kind)
    assert copy_.decompress().shape == x.shape and copy_.nbytes == 0


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_stochastic_rounding_is_unbiased(kind: str) -> None:
    """The mean of many compressed copies converges to the input (round-to-nearest would not)."""
    torch.manual_seed(1)
    x = torch.randn(GROUP) * 2
    draws = 4000
    copies = torch.stack([Compressed(x, kind).decompress() for _ in range(draws)]).double()
    standard_error = copies.std(dim=0) / math.sqrt(draws)
    bias = copies.mean(dim=0) - x.double()
    assert (bias.abs() <= 5 * standard_error + 1e-6 * x.abs()).all()  # + float32 rounding at a group's ends
    assert (copies.std(dim=0) > 0).float().mean() > 0.9  # the rounding is random, not to the nearest level


def test_norm_storage_is_validated() -> None:
    with pytest.raises(ValueError, match="norm_storage must be one of"):
        convert(resnet18(), input_shape=SHAPE, norm_storage="int4")
    with pytest.raises(RecipeError, match=r"rule 1: norm_storage must be one of"):
        Recipe.from_toml('[[rules]]\nmatch = { name = "fc" }\nnorm_storage = "fp8"\n')
    with pytest.warns(UserWarning, match="norm_storage needs an analysed input"):
        report = plan(resnet18(), norm_storage="int8")
    assert not report.norms
    assert NORM_STORAGES == ("exact", "bfloat16", "int8")


@pytest.fixture(scope="module")
def int8_resnet() -> tuple[nn.Module, nn.Module]:
    model = resnet18()
    return model, convert(model, input_shape=SHAPE, norm_storage="int8")


def test_int8_plan_is_what_autograd_keeps(int8_resnet: tuple[nn.Module, nn.Module]) -> None:
    model, converted = int8_resnet
    report = converted.xconv_report
    by_module = {name: record for record in report.norms for name in record.modules}
    assert by_module["bn1"].storage == by_module["layer1.0.bn1"].storage == "int8"
    assert sum(record.storage == "int8" for record in report.norms) == 20
    relus = [module for name, module in converted.named_modules() if name.endswith("relu")]
    assert len(relus) == 9 and all(isinstance(module, BitReLU) for module in relus)  # the stem's too
    exact = convert(model, input_shape=SHAPE).xconv_report
    assert report.activation_bytes_after < exact.activation_bytes_after / 2.8
    assert report.storage_bytes["compressed"] > 0
    with SavedTensors(exclude=converted) as saved:
        converted(torch.randn(SHAPE)).sum()
    assert saved.bytes == report.activation_bytes_after


def test_int8_forward_is_unchanged_and_gradients_close(int8_resnet: tuple[nn.Module, nn.Module]) -> None:
    model, _ = int8_resnet
    reference, model = copy.deepcopy(model), copy.deepcopy(model)
    converted = convert(model, input_shape=SHAPE, norm_storage="int8", inplace=True)
    torch.manual_seed(2)
    inputs, labels = torch.randn(SHAPE), torch.randint(0, 10, (SHAPE[0],))
    grads = []
    for net in (reference, converted):
        x = inputs.clone().requires_grad_()
        out = net(x)
        F.cross_entropy(out, labels).backward()
        grads.append((out.detach(), x.grad, dict(net.named_parameters())))
    (out_ref, x_ref, params_ref), (out, x_grad, params) = grads
    assert torch.equal(out, out_ref)  # compression happens on the side: the forward is untouched
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(converted.named_buffers())[name], buffer), name
    assert cosine(x_grad, x_ref) >= 0.999
    assert not torch.equal(x_grad, x_ref)  # it did compress
    for name, parameter in params_ref.items():
        assert cosine(params[name].grad, parameter.grad) >= 0.99, name


def test_max_pool_after_a_compressed_norm_input_routes_gradients_through_its_forward_maxima() -> None:
    """The stem's norm input is int8, yet the max pool's backward sends each gradient to the element
    the forward picked (replayed from the compressed input, the pool would pick others near ties)."""
    model = resnet18()
    converted = convert(copy.deepcopy(model), input_shape=SHAPE, norm_storage="int8")
    assert converted.xconv_report.norms[0].modules == ["bn1"] and converted.xconv_report.norms[0].storage == "int8"
    torch.manual_seed(4)
    inputs, labels = torch.randn(SHAPE), torch.randint(0, 10, (SHAPE[0],))
    pool_input_grads: list[torch.Tensor] = []

    def record_gradient(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        args[0].register_hook(pool_input_grads.append)

    for net in (model, converted):
        net.maxpool.register_forward_pre_hook(record_gradient)
        F.cross_entropy(net(inputs), labels).backward()
    exact, compressed = pool_input_grads
    assert torch.equal(compressed != 0, exact != 0) and exact.count_nonzero() > 0
    assert cosine(compressed, exact) >= 0.999


def leaky_branches(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per LeakyReLU (out of place), where its input gradient is its output gradient: the unscaled
    branch, as backward took it (elements whose output gradient is zero left out)."""
    into: list[torch.Tensor] = []
    out_of: list[torch.Tensor] = []

    def record_input_gradient(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        args[0].register_hook(into.append)

    def record_output_gradient(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.register_hook(out_of.append)

    activations = [module for module in model.modules() if isinstance(module, nn.LeakyReLU)]
    handles = [module.register_forward_pre_hook(record_input_gradient) for module in activations]
    handles += [module.register_forward_hook(record_output_gradient) for module in activations]
    model(x).square().mean().backward()
    for handle in handles:
        handle.remove()
    assert len(into) == len(out_of) == len(activations)
    return [torch.where(upstream != 0, grad == upstream, False) for grad, upstream in zip(into, out_of, strict=True)]


@pytest.mark.parametrize("inplace", [True, False])
def test_leaky_relus_replayed_from_int8_norm_inputs_take_the_forwards_branches(inplace: bool) -> None:
    """A LeakyReLU replayed from a compressed norm input would pick its branch from the replayed value;
    its 1-bit twin keeps the forward's (MONAI's U-Nets use LeakyReLU). An in-place module's input
    gradient is no tensor hooks can see: the branches are compared out of place."""
    torch.manual_seed(0)
    model = UNet3d(act="leaky")
    for module in model.modules():
        if isinstance(module, nn.LeakyReLU):
            module.inplace = inplace
    shape = (2, 1, 16, 16, 16)
    converted = convert(copy.deepcopy(model), input_shape=shape, norm_storage="int8", probes=0)
    activations = [module for module in converted.modules() if isinstance(module, nn.LeakyReLU)]
    assert len(activations) == 10 and all(type(module) is BitLeakyReLU for module in activations)
    assert any(record.storage == "int8" for record in converted.xconv_report.norms)
    x = torch.randn(shape)
    with SavedTensors(exclude=converted) as saved:
        converted(x).sum()
    assert saved.bytes == converted.xconv_report.activation_bytes_after
    if not inplace:
        for exact, replayed in zip(leaky_branches(model, x), leaky_branches(converted, x), strict=True):
            assert replayed.any() and torch.equal(replayed, exact)


def test_norm_weight_gradient_is_unbiased() -> None:
    """A BatchNorm's weight gradient is linear in its input: averaged over compressed copies, it
    converges to the exact one (and a single copy differs from it)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(4, 3, 16, 16)
    target = torch.randn(4, 4, 16, 16)

    def weight_gradient(module: nn.Module) -> torch.Tensor:
        module.zero_grad()
        F.mse_loss(module(x), target).backward()
        return module[1].weight.grad.clone()

    exact = weight_gradient(net)
    converted = convert(copy.deepcopy(net), input_shape=x.shape, norm_storage="int8")
    assert converted.xconv_report.norms[0].storage == "int8"
    draws = torch.stack([weight_gradient(converted) for _ in range(400)])
    standard_error = draws.std(dim=0) / math.sqrt(len(draws))
    assert (draws.std(dim=0) > 0).all()
    assert ((draws.mean(dim=0) - exact).abs() <= 5 * standard_error).all()


def test_recipe_rule_keeps_one_norm_input_exact() -> None:
    """A rule on a conv sets how the norm input it is recomputed from is stored; the report pins it."""
    recipe = Recipe.from_toml(
        '[defaults]\nprobes = 0\nnorm_storage = "bfloat16"\n\n'
        '[[rules]]\nmatch = { name = "layer1.0.conv2" }\nnorm_storage = "exact"\n'
    )
    report = plan(resnet18(), recipe=recipe, input_shape=SHAPE)
    by_module = {name: record for record in report.norms for name in record.modules}
    assert by_module["layer1.0.bn1"].storage == "kept"  # layer1.0.conv2 reads relu(bn1(x))
    assert by_module["layer1.1.bn1"].storage == "bfloat16"
    assert by_module["layer1.1.bn1"].bytes_after == by_module["layer1.1.bn1"].bytes_before // 2
    pinned = plan(resnet18(), recipe=report.to_recipe(), input_shape=SHAPE)
    assert [(r.modules, r.storage) for r in pinned.norms] == [(r.modules, r.storage) for r in report.norms]


def test_offloading_hooks_store_the_compressed_payload() -> None:
    """The compressed input goes through the saved-tensor hooks around the model (save_on_cpu, a
    measurement) like any kept tensor: what they see is the payload, and training works through them."""
    model = resnet18()
    converted = convert(model, input_shape=SHAPE, norm_storage="int8")
    x = torch.randn(SHAPE)
    seen: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor.dtype)
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = converted(x).sum()
    loss.backward()
    assert seen.count(torch.uint8) >= 19
    assert all(p.grad is not None for p in converted.parameters())
