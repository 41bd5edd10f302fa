"""The XConv layers through the public API: exactness, unbiasedness, memory, randomness, modes."""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from xconv_patch import PROBE_KINDS, BitReLU, XConv2d, XConvMixin, restart_probe_stream
from xconv_patch import estimator as estimator_module
from xconv_patch.layers import XCONV_CLASSES as XCONV_OF
from xconv_patch.memory import saved_activation_bytes

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


@dataclass(frozen=True)
class Case:
    """A torch layer (class, positional and keyword arguments) and an input for it."""

    torch_class: type[nn.Module]
    args: tuple[int, int, int | tuple[int, ...]]
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    memory_format: torch.memory_format = torch.contiguous_format
    output_size: tuple[int, ...] | None = None

    def layers(self, dtype: torch.dtype = torch.float64, **estimator) -> tuple[nn.Module, XConvMixin]:
        """torch's layer and an XConv layer with equal, separate parameters."""
        reference = self.torch_class(*self.args, **self.kwargs).to(dtype)
        layer = XCONV_OF[self.torch_class](*self.args, **self.kwargs, **estimator).to(dtype)
        layer.load_state_dict(reference.state_dict())
        return reference, layer

    def input(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.randn(self.input_shape, dtype=dtype).contiguous(memory_format=self.memory_format)

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x) if self.output_size is None else layer(x, self.output_size)

    def probed_pixels(self) -> int:
        """Pixels of the input as the convolution sees it: explicit padding modes and the odd
        remainder of 'same' padding are applied before the convolution, widening it."""
        layer = self.torch_class(*self.args, **self.kwargs)
        sizes = list(self.input_shape[2:])
        for i, (k, d) in enumerate(zip(layer.kernel_size, layer.dilation, strict=True)):
            if layer.padding_mode != "zeros":
                sizes[i] += d * (k - 1) if layer.padding == "same" else 2 * layer.padding[i]
            elif layer.padding == "same":
                sizes[i] += d * (k - 1) % 2
        return math.prod(sizes)


CL, CL3 = torch.channels_last, torch.channels_last_3d
CASES = [
    pytest.param(Case(nn.Conv1d, (3, 4, 3), dict(stride=2, padding=1), (2, 3, 11)), id="1d-stride-pad"),
    pytest.param(Case(nn.Conv1d, (3, 4, 4), dict(padding="same", dilation=2), (2, 3, 10)), id="1d-same-even-dilated"),
    pytest.param(Case(nn.Conv1d, (3, 4, 3), dict(padding=2, padding_mode="circular"), (2, 3, 9)), id="1d-circular"),
    pytest.param(Case(nn.Conv1d, (3, 4, 2), dict(padding="valid", bias=False), (2, 3, 9)), id="1d-valid-nobias"),
    pytest.param(Case(nn.Conv2d, (3, 4, 3), dict(padding=1), (2, 3, 6, 5)), id="2d-pad"),
    pytest.param(
        Case(nn.Conv2d, (3, 4, (3, 2)), dict(stride=(2, 1), padding=(1, 0)), (2, 3, 7, 6)), id="2d-nonsquare-tuple"
    ),
    pytest.param(Case(nn.Conv2d, (3, 4, (4, 3)), dict(padding="same"), (2, 3, 6, 5)), id="2d-same-even"),
    pytest.param(
        Case(nn.Conv2d, (3, 4, 2), dict(padding="valid", dilation=(1, 2)), (2, 3, 6, 7)), id="2d-valid-dilated-even"
    ),
    pytest.param(Case(nn.Conv2d, (3, 4, 3), dict(padding=1, padding_mode="reflect"), (2, 3, 6, 5)), id="2d-reflect"),
    pytest.param(
        Case(nn.Conv2d, (3, 4, 3), dict(padding=(2, 1), padding_mode="replicate"), (2, 3, 5, 6)), id="2d-replicate"
    ),
    pytest.param(
        Case(nn.Conv2d, (3, 4, 3), dict(stride=2, padding=1, padding_mode="circular"), (2, 3, 6, 7)), id="2d-circular"
    ),
    pytest.param(Case(nn.Conv2d, (4, 6, 3), dict(padding=1, groups=2), (2, 4, 5, 5)), id="2d-groups"),
    pytest.param(
        Case(nn.Conv2d, (4, 8, 3), dict(padding=1, groups=4, bias=False), (2, 4, 5, 6)), id="2d-depthwise-multiplier"
    ),
    pytest.param(Case(nn.Conv2d, (3, 4, 1), dict(stride=2), (2, 3, 7, 7)), id="2d-1x1-stride"),
    pytest.param(Case(nn.Conv2d, (3, 4, 3), dict(stride=2, padding=1), (2, 3, 7, 6), CL), id="2d-channels-last"),
    pytest.param(
        Case(nn.Conv2d, (4, 4, 3), dict(padding=1, groups=4), (2, 4, 5, 5), CL), id="2d-depthwise-channels-last"
    ),
    pytest.param(
        Case(nn.Conv3d, (4, 4, (2, 3, 3)), dict(stride=(1, 2, 2), padding=(0, 1, 1), groups=2), (2, 4, 4, 6, 5)),
        id="3d-stride-groups",
    ),
    pytest.param(
        Case(nn.Conv3d, (2, 3, (3, 2, 3)), dict(padding="same", padding_mode="reflect"), (1, 2, 4, 5, 4)),
        id="3d-same-reflect",
    ),
    pytest.param(
        Case(nn.Conv3d, (2, 3, 3), dict(padding=2, dilation=2, padding_mode="replicate"), (1, 2, 5, 5, 4)),
        id="3d-replicate-dilated",
    ),
    pytest.param(Case(nn.Conv3d, (2, 3, 3), dict(padding=1), (2, 2, 3, 4, 4), CL3), id="3d-channels-last"),
    pytest.param(
        Case(nn.ConvTranspose1d, (3, 4, 3), dict(stride=2, padding=1, output_padding=1), (2, 3, 6)),
        id="t1d-stride-output-padding",
    ),
    pytest.param(
        Case(nn.ConvTranspose1d, (4, 6, 3), dict(dilation=2, groups=2, bias=False), (2, 4, 5)),
        id="t1d-dilated-groups-nobias",
    ),
    pytest.param(
        Case(nn.ConvTranspose1d, (3, 4, 3), dict(dilation=3, output_padding=2), (2, 3, 5)),
        id="t1d-output-padding-past-stride",
    ),
    pytest.param(
        Case(
            nn.ConvTranspose2d, (3, 4, (3, 2)), dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2)), (2, 3, 4, 3)
        ),
        id="t2d-nonsquare-output-padding",
    ),
    pytest.param(Case(nn.ConvTranspose2d, (4, 4, 3), dict(stride=2, groups=4), (2, 4, 4, 4)), id="t2d-depthwise"),
    pytest.param(
        Case(nn.ConvTranspose2d, (3, 4, 3), dict(stride=2, padding=1), (2, 3, 4, 4), output_size=(8, 8)),
        id="t2d-output-size",
    ),
    pytest.param(
        Case(nn.ConvTranspose2d, (3, 4, 4), dict(stride=2, padding=1), (2, 3, 4, 5), CL), id="t2d-channels-last"
    ),
    pytest.param(
        Case(
            nn.ConvTranspose3d,
            (4, 2, (2, 3, 2)),
            dict(stride=2, padding=(0, 1, 0), output_padding=(1, 1, 0), groups=2),
            (1, 4, 3, 3, 2),
        ),
        id="t3d-groups-output-padding",
    ),
]

SIMPLE = Case(nn.Conv2d, (3, 4, 3), dict(stride=2, padding=1), (4, 3, 8, 8))
TRANSPOSED = Case(nn.ConvTranspose2d, (3, 4, 3), dict(stride=2, padding=1, output_padding=1), (4, 3, 8, 8))
REFLECT = Case(nn.Conv2d, (3, 4, 3), dict(padding=1, padding_mode="reflect"), (4, 3, 8, 8))


@pytest.fixture
def probe_at_full_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe even when probes reach the pixel count (layers keep the input there instead), so
    full-rank orthogonal probes test the estimator's geometry: it must then be exact."""
    monkeypatch.setattr(estimator_module, "keeps_input", lambda spec, spatial: False)


def gradients(case: Case, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None):
    """Output, and the gradients of input, weight and bias after backward of <output, grad>."""
    x = x.detach().requires_grad_()
    output = case.run(layer, x)
    output.backward(torch.ones_like(output) if grad is None else grad)
    bias_grad = None if layer.bias is None else layer.bias.grad
    return output, x.grad, layer.weight.grad, bias_grad


def weight_grad(case: Case, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(case.run(layer, x), layer.weight, grad)[0]


@pytest.mark.parametrize("case", CASES)
def test_forward_is_identical_and_input_bias_gradients_exact(case: Case) -> None:
    reference, layer = case.layers()
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    expected, expected_dx, expected_dw, expected_db = gradients(case, reference, x, grad)
    output, dx, dw, db = gradients(case, layer, x, grad)

    assert torch.equal(output, expected)
    assert output.stride() == expected.stride()
    torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
    assert dx.stride() == expected_dx.stride()
    if expected_db is None:
        assert db is None
    else:
        torch.testing.assert_close(db, expected_db, rtol=1e-12, atol=1e-12)
    assert dw.shape == expected_dw.shape and dw.dtype == expected_dw.dtype
    assert dw.isfinite().all()


@pytest.mark.usefixtures("probe_at_full_rank")
@pytest.mark.parametrize("case", CASES)
def test_orthogonal_probes_at_full_rank_give_the_exact_weight_gradient(case: Case) -> None:
    reference, layer = case.layers(probes=case.probed_pixels(), probe="orthogonal")
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    expected = weight_grad(case, reference, x, grad)
    torch.testing.assert_close(weight_grad(case, layer, x, grad), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.usefixtures("probe_at_full_rank")
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("deflate", [True, False])
def test_exact_limit_holds_for_every_variant(per_sample: bool, deflate: bool) -> None:
    pixels = SIMPLE.probed_pixels()
    reference, layer = SIMPLE.layers(probes=pixels, probe="orthogonal", per_sample=per_sample, deflate=deflate)
    x = SIMPLE.input()
    grad = torch.randn_like(reference(x))
    torch.testing.assert_close(weight_grad(SIMPLE, layer, x, grad), weight_grad(SIMPLE, reference, x, grad))


@pytest.mark.parametrize(
    ("case", "estimator"),
    [
        pytest.param(SIMPLE, dict(probe="rademacher"), id="rademacher-per-sample-deflated"),
        pytest.param(SIMPLE, dict(probe="gaussian", per_sample=False, deflate=False), id="gaussian-shared"),
        pytest.param(SIMPLE, dict(probe="orthogonal", per_sample=False), id="orthogonal-shared-deflated"),
        pytest.param(TRANSPOSED, dict(probe="rademacher", deflate=False), id="transposed-rademacher-per-sample"),
    ],
)
def test_mean_of_estimates_converges_like_inverse_sqrt(case: Case, estimator: dict) -> None:
    """Unbiased: the squared error of a mean of T estimates falls like 1/T, 4x from T to 4T.

    A biased estimator would stall at its bias instead. The seeds are fixed, so the measured
    ratio is deterministic; the band is wide enough for any reasonable stream of seeds.
    """
    reference, layer = case.layers(probes=4, **estimator)
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    exact = weight_grad(case, reference, x, grad)
    estimates = 192
    errors = torch.stack([weight_grad(case, layer, x, grad) - exact for _ in range(estimates)]).flatten(1)

    def mean_squared_error(count: int) -> float:
        """Over estimates // count disjoint groups: the squared error of each group's mean."""
        return errors.view(estimates // count, count, -1).mean(dim=1).square().sum(dim=1).mean().item()

    for count in (1, 3):
        assert 3.0 < mean_squared_error(count) / mean_squared_error(4 * count) < 5.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [SIMPLE, REFLECT, TRANSPOSED], ids=["conv", "reflect", "transposed"])
def test_backward_keeps_only_the_projection_and_seed(case: Case, dtype: torch.dtype) -> None:
    """B x C x r values and an 8-byte seed, whatever the padding (torch's reflect pad keeps its input)."""
    reference, layer = case.layers(dtype, probes=8)
    x = case.input(dtype).requires_grad_()
    batch, channels = x.shape[:2]
    assert saved_activation_bytes(layer, lambda: layer(x)) == batch * channels * 8 * dtype.itemsize + 8
    assert saved_activation_bytes(reference, lambda: reference(x)) >= x.numel() * dtype.itemsize


@pytest.mark.usefixtures("probe_at_full_rank")
@pytest.mark.parametrize("case", [SIMPLE, TRANSPOSED], ids=["conv", "transposed"])
def test_activation_checkpointing_keeps_projection_and_seed_together(case: Case) -> None:
    """Recomputation draws a new seed; the estimate must use it with the recomputed projection."""
    reference, layer = case.layers(probes=case.probed_pixels(), probe="orthogonal")
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    expected = weight_grad(case, reference, x, grad)
    output = checkpoint(layer, x.requires_grad_(), use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(output, layer.weight, grad)[0], expected)


def test_a_step_under_fake_tensors_leaves_real_steps_working() -> None:
    """Memory prediction runs XConv under FakeTensorMode: nothing made there may be reused later."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = XConv2d(4, 4, 3, padding=1, probes=4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        layer(torch.randn(2, 4, 8, 8)).sum().backward()
    layer.zero_grad(set_to_none=True)
    layer(torch.randn(2, 4, 8, 8)).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_frozen_weight_keeps_nothing_derived_from_the_input() -> None:
    reference, layer = SIMPLE.layers()
    for module in (reference, layer):
        module.weight.requires_grad_(False)
    x = SIMPLE.input().requires_grad_()
    assert saved_activation_bytes(layer, lambda: layer(x)) == 0
    assert saved_activation_bytes(reference, lambda: reference(x)) > 0
    _, expected_dx, _, expected_db = gradients(SIMPLE, reference, x)
    _, dx, dw, db = gradients(SIMPLE, layer, x)
    assert dw is None
    torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, expected_db, rtol=1e-12, atol=1e-12)


def test_zero_probes_is_the_torch_layer() -> None:
    reference, layer = SIMPLE.layers(probes=0)
    x = SIMPLE.input().requires_grad_()
    assert saved_activation_bytes(layer, lambda: layer(x)) == saved_activation_bytes(reference, lambda: reference(x))
    for got, expected in zip(gradients(SIMPLE, layer, x), gradients(SIMPLE, reference, x), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_probing_work_without_autograd(mode) -> None:
    reference, layer = SIMPLE.layers()
    x = SIMPLE.input()
    grad = torch.randn_like(reference(x))
    restart_probe_stream()
    untouched = weight_grad(SIMPLE, layer, x, grad)

    restart_probe_stream()
    with mode():
        assert saved_activation_bytes(layer, lambda: layer(x)) == 0
        assert torch.equal(layer(x), reference(x))
    assert torch.equal(weight_grad(SIMPLE, layer, x, grad), untouched), "an inference call drew probes"


def test_global_rng_state_is_untouched() -> None:
    _, layer = SIMPLE.layers(torch.float32)
    x = SIMPLE.input(torch.float32)
    state = torch.get_rng_state()
    gradients(SIMPLE, layer, x)
    assert torch.equal(torch.get_rng_state(), state)


def _dropout_run(conv_class: type[nn.Module], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Outputs and dropout masks of three forward/backward steps, then a data-order draw."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_class(3, 6, 3, padding=1), nn.Dropout(0.5), nn.ReLU(), conv_class(6, 4, 3))
    masks: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda module, args, out: masks.append((out == 0) & (args[0] != 0)))
    torch.manual_seed(seed)
    outputs = []
    for _ in range(3):
        output = model(torch.randn(4, 3, 8, 8))
        output.square().sum().backward()
        outputs.append(output.detach())
    return outputs, masks, torch.randperm(100)


def test_seeded_run_is_the_same_with_and_without_xconv() -> None:
    outputs, masks, order = _dropout_run(XConv2d, seed=7)
    expected_outputs, expected_masks, expected_order = _dropout_run(nn.Conv2d, seed=7)
    assert all(map(torch.equal, outputs, expected_outputs))
    assert all(map(torch.equal, masks, expected_masks))
    assert torch.equal(order, expected_order)


def test_reproducible_under_manual_seed() -> None:
    """The probe stream restarts when torch's seed changes, so alternating seeds replay."""
    _, layer = SIMPLE.layers()
    x = SIMPLE.input()
    grad = torch.randn_like(layer(x))

    def estimate(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return weight_grad(SIMPLE, layer, x, grad)

    first_a, first_b = estimate(1), estimate(2)
    assert not torch.equal(first_a, first_b)
    assert torch.equal(estimate(1), first_a)
    assert torch.equal(estimate(2), first_b)


def test_probes_change_per_call_and_restart_replays_them() -> None:
    _, layer = SIMPLE.layers()
    x = SIMPLE.input()
    grad = torch.randn_like(layer(x))
    restart_probe_stream()
    first, second = weight_grad(SIMPLE, layer, x, grad), weight_grad(SIMPLE, layer, x, grad)
    assert not torch.equal(first, second)
    restart_probe_stream()
    assert torch.equal(weight_grad(SIMPLE, layer, x, grad), first)


@pytest.mark.parametrize("probe", PROBE_KINDS)
@pytest.mark.parametrize(
    ("case", "probes"),
    [
        pytest.param(Case(nn.Conv2d, (3, 4, 1), {}, (2, 3, 1, 1)), 2, id="1x1-input"),
        pytest.param(Case(nn.Conv2d, (3, 4, 1), {}, (2, 3, 4, 4)), 16, id="as-many-probes-as-pixels"),
        pytest.param(
            Case(nn.Conv2d, (3, 4, 3), dict(padding=1, padding_mode="reflect"), (2, 3, 2, 2)), 16, id="reflect"
        ),
        pytest.param(Case(nn.ConvTranspose1d, (3, 4, 3), dict(stride=2), (2, 3, 3)), 4, id="transposed"),
    ],
)
def test_no_more_pixels_than_probes_keeps_the_padded_input_for_the_exact_gradient(
    case: Case, probes: int, probe: str
) -> None:
    """The projection would be no smaller than the input: keep the input, exact, for every kind."""
    assert case.probed_pixels() <= probes
    reference, layer = case.layers(probes=probes, probe=probe, deflate=probes > 1)
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    torch.testing.assert_close(weight_grad(case, layer, x, grad), weight_grad(case, reference, x, grad))
    padded = x.shape[0] * x.shape[1] * case.probed_pixels() * x.element_size()
    assert saved_activation_bytes(layer, lambda: layer(x.requires_grad_())) == padded


def test_orthogonal_probes_on_a_model_with_squeeze_excitation() -> None:
    """mobilenet_v3_small's squeeze-excitation convs see 1x1 inputs: fewer pixels than probes."""
    torchvision = pytest.importorskip("torchvision")
    from xconv_patch import Recipe, convert

    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    recipe = Recipe.from_dict({"defaults": {"probes": 8, "probe": "orthogonal"}})
    model = convert(model, recipe=recipe)
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.usefixtures("probe_at_full_rank")
def test_threads_training_their_own_layers_draw_their_own_probes() -> None:
    """Every step's gradient is exact with full-rank orthogonal probes, unless another thread
    reseeded the shared generator between this step's seeding and drawing."""
    steps, errors = 150, []

    def train(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        layer = XConv2d(2, 3, 3, padding=1, probes=16, probe="orthogonal").double()
        reference = nn.Conv2d(2, 3, 3, padding=1).double()
        reference.load_state_dict(layer.state_dict())
        for _ in range(steps):
            x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=generator)
            grad = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator)
            estimate = torch.autograd.grad(layer(x), layer.weight, grad)[0]
            exact = torch.autograd.grad(reference(x), reference.weight, grad)[0]
            if not torch.allclose(estimate, exact):
                errors.append(seed)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=train, args=(seed,)) for seed in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert not errors, f"{len(errors)} of {3 * steps} gradients were wrong"


@pytest.mark.parametrize("torch_class", list(XCONV_OF))
@pytest.mark.parametrize("probes", [4, 1000], ids=["probed", "exact"])
def test_unbatched_input_is_a_batch_of_one(torch_class: type[nn.Module], probes: int) -> None:
    spatial = (5,) * _rank(torch_class)
    case = Case(torch_class, (3, 4, 3), dict(padding=1), (1, 3, *spatial))
    reference, layer = case.layers(probes=probes)
    x = case.input()[0]
    grad = torch.randn_like(reference(x))
    expected, expected_dx, expected_dw, expected_db = gradients(case, reference, x, grad)
    restart_probe_stream()
    output, dx, dw, db = gradients(case, layer, x, grad)
    assert torch.equal(output, expected) and output.shape == expected.shape
    torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, expected_db, rtol=1e-12, atol=1e-12)
    restart_probe_stream()
    _, batched = case.layers(probes=probes)
    batched.load_state_dict(layer.state_dict())
    assert torch.equal(dw, weight_grad(case, batched, x.unsqueeze(0), grad.unsqueeze(0)))
    if probes > math.prod(spatial):
        torch.testing.assert_close(dw, expected_dw)


def _rank(torch_class: type[nn.Module]) -> int:
    return len(torch_class(1, 1, 1).kernel_size)


def _constructor_args(torch_class: type[nn.Module]) -> tuple[int, int, int]:
    return (4, 6, 3) if torch_class in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else (4, 6, 2)


@pytest.mark.parametrize("torch_class", list(XCONV_OF))
def test_is_the_torch_class_with_the_same_state_dict(torch_class: type[nn.Module]) -> None:
    xconv_class = XCONV_OF[torch_class]
    layer = xconv_class(*_constructor_args(torch_class), groups=2, probes=4)
    reference = torch_class(*_constructor_args(torch_class), groups=2)
    assert isinstance(layer, torch_class) and isinstance(layer, XConvMixin)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    assert [name for name, _ in layer.named_parameters()] == [name for name, _ in reference.named_parameters()]

    layer.load_state_dict(reference.state_dict())
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in reference.state_dict().items())
    other = xconv_class(*_constructor_args(torch_class), groups=2)
    reference.load_state_dict(other.state_dict())
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("torch_class", list(XCONV_OF))
def test_from_conv_shares_parameters_with_an_existing_optimizer(torch_class: type[nn.Module]) -> None:
    conv = torch_class(*_constructor_args(torch_class))
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    before = [p.detach().clone() for p in conv.parameters()]
    layer = XCONV_OF[torch_class].from_conv(conv, probes=2)

    assert type(layer) is XCONV_OF[torch_class] and layer.probes == 2
    assert layer.weight is conv.weight and layer.bias is conv.bias
    spatial = (5,) * (conv.weight.dim() - 2)
    layer(torch.randn(2, 4, *spatial)).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))


def test_from_conv_keeps_a_user_subclass_and_rejects_other_modules() -> None:
    class Custom(nn.Conv2d):
        pass

    layer = XConv2d.from_conv(Custom(3, 4, 3))
    assert isinstance(layer, Custom) and isinstance(layer, XConvMixin)
    assert layer(torch.randn(1, 3, 5, 5, requires_grad=True)).shape == (1, 4, 3, 3)
    with pytest.raises(TypeError, match="Conv2d"):
        XConv2d.from_conv(nn.Conv1d(3, 4, 3))


class PicklableConv(nn.Conv2d):
    """A user's conv subclass at module level, as torch.save needs it."""


def test_patched_user_subclass_survives_torch_save(tmp_path) -> None:
    layer = XConv2d.from_conv(PicklableConv(3, 4, 3), probes=4)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert type(loaded) is type(layer) and isinstance(loaded, PicklableConv) and loaded.probes == 4
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(loaded(x), layer(x))


@pytest.mark.parametrize("probes", [-1, 2.5, True, "8", None])
def test_bad_probe_counts_are_rejected(probes) -> None:
    with pytest.raises(ValueError, match=r"probes must be a non-negative integer"):
        XConv2d(3, 4, 3, probes=probes)


def test_bad_estimator_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"probe must be one of " + ", ".join(PROBE_KINDS)):
        XConv2d(3, 4, 3, probe="sobol")
    with pytest.raises(ValueError, match=r"per_sample must be True or False"):
        XConv2d(3, 4, 3, per_sample="yes")
    layer = XConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"probes must be a non-negative integer"):
        layer.probes = -2


def test_estimator_settings_can_be_changed_on_a_layer() -> None:
    reference, layer = SIMPLE.layers()
    layer.probes, layer.probe = 0, "gaussian"
    assert (layer.probes, layer.probe) == (0, "gaussian")
    assert "probes=0" in repr(layer)
    x = SIMPLE.input()
    grad = torch.randn_like(reference(x))
    assert torch.equal(weight_grad(SIMPLE, layer, x, grad), weight_grad(SIMPLE, reference, x, grad))


def test_double_backward_is_a_clear_error() -> None:
    _, layer = SIMPLE.layers()
    x = SIMPLE.input().requires_grad_()
    with pytest.raises(RuntimeError, match="XConv layers have no double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    reference, layer = SIMPLE.layers(dtype)
    x = SIMPLE.input(dtype)
    expected, expected_dx, _, expected_db = gradients(SIMPLE, reference, x)
    output, dx, dw, db = gradients(SIMPLE, layer, x)
    assert torch.equal(output, expected)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    torch.testing.assert_close(dx, expected_dx)
    torch.testing.assert_close(db, expected_db)
    assert dw.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [SIMPLE, TRANSPOSED], ids=["conv", "transposed"])
def test_cpu_autocast(case: Case, dtype: torch.dtype) -> None:
    reference, layer = case.layers(torch.float32)
    x = case.input(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        expected, expected_dx, _, expected_db = gradients(case, reference, x)
        output, dx, dw, db = gradients(case, layer, x)
    assert output.dtype == dtype and torch.equal(output, expected)
    assert dx.dtype == dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(dx, expected_dx)
    torch.testing.assert_close(db, expected_db)
    assert dw.isfinite().all()


def test_autocast_leaves_float64_alone() -> None:
    reference, layer = SIMPLE.layers(torch.float64)
    x = SIMPLE.input(torch.float64).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, expected = layer(x), reference(x)
    assert output.dtype == torch.float64 and torch.equal(output, expected)


def _compile_check(backend: str) -> None:
    def model(conv_class: type[nn.Module], relu_class: type[nn.Module]) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            conv_class(3, 8, 3, padding=1),
            relu_class(),
            conv_class(8, 8, 3, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        )

    reference, xconv = model(nn.Conv2d, nn.ReLU), model(XConv2d, BitReLU)
    compiled = torch.compile(xconv, backend=backend)
    x = torch.randn(4, 3, 12, 12)
    for _ in range(2):
        output, expected = compiled(x), reference(x)
        torch.testing.assert_close(output, expected)
        output.square().sum().backward()
        expected.square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in xconv.parameters())
    torch.testing.assert_close(xconv[0].bias.grad, reference[0].bias.grad)


def test_torch_compile_aot_eager() -> None:
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    _compile_check("inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [SIMPLE, TRANSPOSED, REFLECT], ids=["conv", "transposed", "reflect"])
def test_cuda(case: Case) -> None:
    reference, layer = case.layers(torch.float64)
    reference, layer = reference.cuda(), layer.cuda()
    x = case.input(torch.float64).cuda()
    grad = torch.randn_like(case.run(reference, x))
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    expected, expected_dx, _, _ = gradients(case, reference, x, grad)
    output, dx, dw, _ = gradients(case, layer, x, grad)
    assert torch.equal(output, expected)
    torch.testing.assert_close(dx, expected_dx)
    assert dw.is_cuda and dw.isfinite().all()
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)

    exact_reference, exact = case.layers(torch.float64, probes=case.probed_pixels(), probe="orthogonal")
    exact_reference, exact = exact_reference.cuda(), exact.cuda()
    torch.testing.assert_close(weight_grad(case, exact, x, grad), weight_grad(case, exact_reference, x, grad))
    with torch.autocast("cuda", dtype=torch.float16):
        half = case.layers(torch.float32)
        outputs = [case.run(module.cuda(), x.float()) for module in half]
    assert outputs[0].dtype == torch.float16 and torch.equal(outputs[0], outputs[1])


def test_torch_func_transforms_name_the_way_out() -> None:
    """The estimate draws a seed per call, which torch.func cannot batch: the error says what to do."""
    model = nn.Sequential(XConv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, (x.unsqueeze(0),)).sum()

    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"probes=0 on the layer, or use xconv_patch.revert\(model\)"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    model[0].probes = 0
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert per_sample["0.weight"].shape == (2, 4, 3, 3, 3)


TINY = Case(nn.Conv2d, (2, 3, 3), dict(padding=1), (2, 2, 4, 4))
TINY_TRANSPOSED = Case(nn.ConvTranspose2d, (2, 3, 3), dict(stride=2, padding=1), (2, 2, 4, 4))


@pytest.mark.parametrize("deflate", [True, False], ids=["deflated", "plain"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "shared"])
@pytest.mark.parametrize(
    ("case", "probe"),
    [
        *(pytest.param(TINY, probe, id=probe) for probe in PROBE_KINDS),
        pytest.param(TINY_TRANSPOSED, "rademacher", id="transposed-rademacher"),
    ],
)
def test_mean_estimate_has_the_exact_gradient_s_scale(case: Case, probe: str, per_sample: bool, deflate: bool) -> None:
    """Unbiased to a few standard errors: the least-squares scale s = <mean, exact> / <exact, exact>
    of the mean of many float64 estimates is 1. It is the mean of each estimate's scale, so its
    standard error comes from their spread; a probe scale off by 0.8 (s = 0.64) fails by many."""
    reference, layer = case.layers(probes=4, probe=probe, per_sample=per_sample, deflate=deflate)
    x = case.input()
    grad = torch.randn_like(case.run(reference, x))
    exact = weight_grad(case, reference, x, grad).flatten()
    estimates = torch.stack([weight_grad(case, layer, x, grad).flatten() for _ in range(500)])
    scales = estimates @ exact / exact.dot(exact)
    scale, standard_error = scales.mean().item(), scales.std().item() / math.sqrt(len(scales))
    assert standard_error < 0.04, "too noisy to tell a 0.8 probe scale (s = 0.64) from 1"
    assert abs(scale - 1) < 4 * standard_error, f"s = {scale:.3f} +- {standard_error:.3f}"


@pytest.mark.usefixtures("probe_at_full_rank")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [SIMPLE, TRANSPOSED], ids=["conv", "transposed"])
def test_low_precision_weight_gradient_is_the_exact_one_to_rounding(case: Case, dtype: torch.dtype) -> None:
    """Full-rank orthogonal probes in bf16/fp16 against the float64 gradient of the same values."""
    reference, layer = case.layers(dtype, probes=case.probed_pixels(), probe="orthogonal")
    x = case.input(dtype)
    grad = torch.randn_like(case.run(reference, x))
    exact = weight_grad(case, reference.double(), x.double(), grad.double())
    estimate = weight_grad(case, layer, x, grad)
    assert estimate.dtype == dtype
    assert (estimate.double() - exact).norm() < 0.03 * exact.norm()
