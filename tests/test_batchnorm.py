"""recalibrate_bn and set_bn_momentum, through the public API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xconv_patch import XConv2d, recalibrate_bn, set_bn_momentum


def patched_model() -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    return nn.Sequential(XConv2d.from_conv(conv, probes=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))


def labelled_batches(count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 6, 6, generator=generator) * 2 + 1, torch.zeros(size)) for _ in range(count)]


def batch_statistics(model: nn.Sequential, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The average over batches of the BatchNorm input's per-channel mean and unbiased variance."""
    with torch.no_grad():
        features = [model[0](x).transpose(0, 1).flatten(1) for x in inputs]
    means = torch.stack([f.mean(1) for f in features]).mean(0)
    variances = torch.stack([f.var(1) for f in features]).mean(0)
    return means, variances


def test_statistics_are_the_average_over_tuple_batches() -> None:
    model = patched_model()
    batches = labelled_batches(3)
    used = recalibrate_bn(model, batches)
    mean, variance = batch_statistics(model, [x for x, _ in batches])
    norm = model[1]
    assert used == 3
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, variance)


def test_tensor_batches_and_max_batches() -> None:
    model = patched_model()
    inputs = [x for x, _ in labelled_batches(5)]
    assert recalibrate_bn(model, iter(inputs), max_batches=2) == 2
    torch.testing.assert_close(model[1].running_mean, batch_statistics(model, inputs[:2])[0])


def test_modes_momentum_and_parameters_are_left_alone() -> None:
    model = patched_model().eval()
    model[3].train()
    model[1].momentum = 0.3
    parameters = [p.detach().clone() for p in model.parameters()]
    recalibrate_bn(model, labelled_batches(2), device="cpu")
    assert [m.training for m in model.modules()] == [False, False, False, False, True]
    assert model[1].momentum == 0.3
    for before, after in zip(parameters, model.parameters(), strict=True):
        assert torch.equal(before, after)


def test_eval_output_matches_the_statistics_of_the_data() -> None:
    """Stale running statistics give wrong eval outputs; recalibration on the data repairs them."""
    model = patched_model()
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(0.01)
    (inputs, _labels), = labelled_batches(1, size=64)
    recalibrate_bn(model, [inputs])
    model.eval()
    with torch.no_grad():
        normalized = model[1](model[0](inputs))
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (normalized.var(dim=(0, 2, 3)) - 1).abs().max() < 0.05


def test_no_batches_is_an_error_and_changes_nothing() -> None:
    model = patched_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(model, [])
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_bn(model, labelled_batches(1), max_batches=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_failing_forward_restores_statistics_momentum_and_modes() -> None:
    model = patched_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good, bad = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    with pytest.raises(RuntimeError):
        recalibrate_bn(model, [good, bad])
    assert model[1].momentum == 0.1
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_model_without_batchnorm_statistics_runs_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert recalibrate_bn(model, labelled_batches(2)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inputs_move_to_the_model_device() -> None:
    model = patched_model().cuda()
    recalibrate_bn(model, labelled_batches(2))
    assert model[1].running_mean.is_cuda
    assert model[1].num_batches_tracked.item() == 2


def test_set_bn_momentum() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm1d(3))
    assert set_bn_momentum(model, 0.5) == 2
    assert model[0].momentum == model[2].momentum == 0.5
    assert set_bn_momentum(model, None) == 2
    assert model[0].momentum is None
    with pytest.raises(ValueError, match="momentum"):
        set_bn_momentum(model, 1.5)
