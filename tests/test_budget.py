"""A memory budget picks the settings (convert(..., memory_budget=...)), and per-block checkpointing,
its rung with no gradient error, through the public API on torchvision models (mobilenet_v3_small at
8x3x128x128: activations are most of its step's peak)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

from xconv_patch import (
    MemoryBudget,
    MemoryBudgetError,
    checkpoint_blocks,
    convert,
    find_blocks,
    measure_memory,
    plan,
    revert,
    uncheckpoint_blocks,
)
from xconv_patch.conversion import LADDER

SHAPE = (8, 3, 128, 128)
CPU = torch.device("cpu")


def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def predictions() -> dict[str, int]:
    """Every rung's predicted step peak (a budget of one byte fits none)."""
    with pytest.raises(MemoryBudgetError) as failure:
        plan(mobilenet(), input_shape=SHAPE, memory_budget=1)
    predicted = failure.value.choice.predicted
    assert list(predicted) == [rung.name for rung in LADDER]
    assert "nothing fits" in str(failure.value) and "int8" in str(failure.value)
    return predicted


def test_ladder_frees_memory_rung_by_rung(predictions: dict[str, int]) -> None:
    exact, recompute, *_, int8 = predictions.values()
    assert exact > 1.5 * recompute and recompute > 1.15 * int8
    assert predictions["recompute + probes + bfloat16 norm inputs"] > int8
    assert predictions["checkpoint per block"] < exact


@pytest.mark.parametrize("rung", ["exact", "recompute", "recompute + probes + int8 norm inputs"])
def test_budget_picks_the_first_rung_that_fits_and_the_step_stays_under_it(
    predictions: dict[str, int], rung: str
) -> None:
    budget = predictions[rung] + 1024
    converted = convert(mobilenet(), input_shape=SHAPE, memory_budget=budget)
    choice = converted.xconv_report.budget
    fits = [name for name, peak in predictions.items() if peak <= budget]
    assert choice.rung == fits[0] == rung
    assert choice.predicted_peak == predictions[rung]
    measured = measure_memory(converted, "classification", SHAPE[0], SHAPE[1:], device=CPU)
    assert measured.peak_bytes <= budget
    assert measured.peak_bytes == pytest.approx(choice.predicted_peak, rel=0.03)


def test_budget_sizes_and_errors_name_the_argument() -> None:
    assert MemoryBudget("900MiB").bytes == 900 * 2**20 and MemoryBudget("6GiB").bytes == 6 * 2**30
    with pytest.raises(ValueError, match="memory_budget: 'lots' is not a size"):
        convert(mobilenet(), input_shape=SHAPE, memory_budget="lots")
    with pytest.raises(ValueError, match="memory_budget needs input_shape"):
        convert(mobilenet(), memory_budget="1GiB")
    with pytest.raises(ValueError, match="memory_budget must be a byte count"):
        convert(mobilenet(), input_shape=SHAPE, memory_budget=-5)


def test_checkpointed_blocks_give_torch_s_gradients_and_running_statistics() -> None:
    """Recomputing a block in backward must not update BatchNorm statistics a second time."""
    model = resnet18()
    reference = copy.deepcopy(model)
    assert checkpoint_blocks(model) == find_blocks(reference) == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(SHAPE)
    for _ in range(2):
        for net in (model, reference):
            net(x).logsumexp(dim=1).sum().backward()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected.grad, msg=name)
    for (name, buffer), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(buffer, expected), name
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.layer1[0]).__name__ == "CheckpointedBasicBlock"
    assert uncheckpoint_blocks(model) == 8 and type(model.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_revert_restores_checkpointed_blocks() -> None:
    model = resnet18()
    converted = convert(model, input_shape=(2, 3, 64, 64))
    checkpoint_blocks(converted)
    assert type(model.layer1[0]).__name__ == "BasicBlock"  # the user's model is untouched
    restored = revert(converted)
    assert all(type(block).__name__ == "BasicBlock" for block in (*restored.layer1, *restored.layer4))
