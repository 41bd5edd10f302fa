"""Bit-mask activations: identical to torch's forward and gradient, 1 bit kept per element."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xconv_patch import BitHardtanh, BitLeakyReLU, BitReLU, BitReLU6
from xconv_patch.activations import bit_activation
from xconv_patch.bits import pack_mask, unpack_mask
from xconv_patch.chunks import chunk_elements
from xconv_patch.memory import saved_activation_bytes

PAIRS = [
    pytest.param(lambda: nn.ReLU(), lambda: BitReLU(), id="relu"),
    pytest.param(lambda: nn.ReLU(inplace=True), lambda: BitReLU(inplace=True), id="relu-inplace"),
    pytest.param(lambda: nn.ReLU6(), lambda: BitReLU6(), id="relu6"),
    pytest.param(lambda: nn.ReLU6(inplace=True), lambda: BitReLU6(inplace=True), id="relu6-inplace"),
    pytest.param(lambda: nn.Hardtanh(-0.5, 2.0), lambda: BitHardtanh(-0.5, 2.0), id="hardtanh"),
    pytest.param(lambda: nn.Hardtanh(inplace=True), lambda: BitHardtanh(inplace=True), id="hardtanh-inplace"),
    pytest.param(lambda: nn.LeakyReLU(), lambda: BitLeakyReLU(), id="leaky"),
    pytest.param(lambda: nn.LeakyReLU(0.2, inplace=True), lambda: BitLeakyReLU(0.2, inplace=True), id="leaky-inplace"),
    pytest.param(lambda: nn.LeakyReLU(-0.3), lambda: BitLeakyReLU(-0.3), id="leaky-negative-slope"),
    pytest.param(lambda: nn.LeakyReLU(0.0, inplace=True), lambda: BitLeakyReLU(0.0, inplace=True), id="leaky-zero"),
]


def edge_input(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5, 7)) -> torch.Tensor:
    """Random values with every threshold in use (-1, -0.5, 0, 1, 2, 6), NaN and infinities."""
    x = torch.randn(shape, dtype=torch.float64) * 4
    specials = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0, 6.0, float("nan"), float("inf"), -float("inf"), -0.0])
    x.view(-1)[: specials.numel()] = specials.to(x.dtype)
    return x.to(dtype)


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient; the input goes through a copy so in-place modules may modify it."""
    leaf = x.detach().clone().requires_grad_()
    output = module(leaf.clone())
    output.backward(grad)
    return output.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("make_torch", "make_bit"), PAIRS)
def test_forward_and_gradient_match_torch(make_torch, make_bit, dtype: torch.dtype) -> None:
    """Bit for bit, thresholds, infinities and infinite upstream gradients included.

    At a NaN input the clamps pass the gradient, as torch's ReLU does everywhere. torch's
    hardtanh backward disagrees with itself there (its vectorised CPU loop blocks, its scalar
    loop and CUDA kernel pass), so NaN inputs of clamps are compared with ReLU's rule; LeakyReLU's
    (the slope, as torch's) with torch's.
    """
    x = edge_input(dtype)
    grad = torch.randn_like(x)
    grad.view(-1)[-3:] = float("inf")
    expected_output, expected_grad = forward_backward(make_torch(), x, grad)
    output, input_grad = forward_backward(make_bit(), x, grad)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0, equal_nan=True)
    nan = x.isnan() if not isinstance(make_torch(), nn.LeakyReLU) else torch.zeros_like(x, dtype=torch.bool)
    torch.testing.assert_close(input_grad[~nan], expected_grad[~nan], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(input_grad[nan], grad[nan])


@pytest.mark.parametrize(("make_torch", "make_bit"), PAIRS)
def test_channels_last_gradient_keeps_the_layout(make_torch, make_bit) -> None:
    x = edge_input(torch.float32, (2, 3, 4, 5)).nan_to_num().contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    _, expected_grad = forward_backward(make_torch(), x, grad)
    _, input_grad = forward_backward(make_bit(), x, grad)
    torch.testing.assert_close(input_grad, expected_grad, rtol=0, atol=0)
    assert input_grad.stride() == expected_grad.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "gradient in another layout"])
@pytest.mark.parametrize(("make_torch", "make_bit"), PAIRS)
def test_tensors_of_several_chunks_match_torch(make_torch, make_bit, layout: str) -> None:
    """Masks are packed and applied a cache-sized chunk at a time: several chunks and a tail that fills
    no whole byte, whatever the layouts of the input and of the upstream gradient."""
    x = edge_input(torch.float32, (3, 15, 129, 131)).nan_to_num()
    assert x.numel() > 2 * chunk_elements(x.device) and x.numel() % 8
    grad = torch.randn_like(x)
    if layout == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    elif layout == "gradient in another layout":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    expected_output, expected_grad = forward_backward(make_torch(), x, grad)
    output, input_grad = forward_backward(make_bit(), x, grad)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(input_grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("numel", [1, 8, 105, 4096])
@pytest.mark.parametrize("bit_class", [BitReLU, BitReLU6, BitHardtanh, BitLeakyReLU])
def test_keeps_one_bit_per_element(bit_class: type[nn.Module], numel: int) -> None:
    module = bit_class()
    x = torch.randn(numel, requires_grad=True)
    assert saved_activation_bytes(module, lambda: module(x * 1)) == math.ceil(numel / 8)


def test_no_grad_runs_torch_op_and_keeps_nothing() -> None:
    x = edge_input(torch.float32)
    with torch.no_grad():
        assert saved_activation_bytes(BitReLU(), lambda: BitReLU()(x)) == 0
        torch.testing.assert_close(BitReLU6()(x), nn.ReLU6()(x), rtol=0, atol=0, equal_nan=True)


def test_double_backward_matches_torch() -> None:
    x = edge_input(torch.float64).nan_to_num()
    upstream = torch.randn_like(x)
    results = []
    for module in (nn.ReLU6(), BitReLU6()):
        leaf = x.clone().requires_grad_()
        grad = upstream.clone().requires_grad_()
        (input_grad,) = torch.autograd.grad(module(leaf), leaf, grad, create_graph=True)
        results.append(torch.autograd.grad(input_grad.square().sum(), grad)[0])
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_bit_activation_twins_share_attributes() -> None:
    for module, bit_class in [
        (nn.ReLU(inplace=True), BitReLU),
        (nn.ReLU6(), BitReLU6),
        (nn.Hardtanh(-2.0, 3.0), BitHardtanh),
        (nn.LeakyReLU(0.2, inplace=True), BitLeakyReLU),
    ]:
        twin = bit_activation(module)
        assert type(twin) is bit_class and isinstance(twin, type(module))
        assert vars(twin).keys() == vars(module).keys()
        assert repr(twin).split("(", 1)[1] == repr(module).split("(", 1)[1]
    assert isinstance(BitReLU6(), nn.ReLU6) and BitReLU6().max_val == 6.0


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 8), (3, 5, 7)])
def test_pack_round_trip(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize(("make_torch", "make_bit"), PAIRS)
def test_per_sample_gradients_under_torch_func_match_torch(make_torch, make_bit) -> None:
    """torch.func.vmap(torch.func.grad(...)) through the bit activation, as through torch's."""
    x, target = edge_input(torch.float64, (4, 5)).nan_to_num(), torch.randn(4, 2, dtype=torch.float64)
    per_sample = []
    for activation in (make_torch(), make_bit()):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), activation, nn.Linear(7, 2)).double()
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, model=model) -> torch.Tensor:
            return (torch.func.functional_call(model, params, (x.unsqueeze(0),)) - target).square().sum()

        per_sample.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target))
    expected, got = per_sample
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
