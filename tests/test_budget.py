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


class GeluBlock(nn.Module):
    """A residual block without norms: nothing in it is recomputable, its convs can be probed."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def gelu_net() -> nn.Module:
    torch.manual_seed(0)
    blocks = nn.Sequential(*(GeluBlock() for _ in range(4)))
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), blocks, *head)


GELU_SHAPE = (8, 3, 64, 64)


@pytest.fixture(scope="module")
def gelu_predictions() -> dict[str, int]:
    with pytest.raises(MemoryBudgetError) as failure:
        plan(gelu_net(), input_shape=GELU_SHAPE, memory_budget=1)
    return failure.value.choice.predicted


def _chosen_and_measured(budget: int) -> tuple[nn.Module, int]:
    converted = convert(gelu_net(), input_shape=GELU_SHAPE, memory_budget=budget)
    measured = measure_memory(converted, "classification", GELU_SHAPE[0], GELU_SHAPE[1:], device=CPU).peak_bytes
    assert measured <= budget
    assert measured == pytest.approx(converted.xconv_report.budget.predicted_peak, rel=0.03)
    return converted, measured


def test_room_left_in_a_probing_rung_buys_more_probes(gelu_predictions: dict[str, int]) -> None:
    budget = gelu_predictions["exact"] - 1  # nothing is recomputable: probes fit with room to spare
    converted, _ = _chosen_and_measured(budget)
    report = converted.xconv_report
    predicted = report.budget.predicted
    default = plan(gelu_net(), input_shape=GELU_SHAPE).defaults.probes
    tried = [name for name in predicted if name.startswith("recompute + probes (")]
    assert tried == [f"recompute + probes ({default * f} probes)" for f in (2, 4, 8)][: len(tried)] and tried
    fitting = [name for name in tried if predicted[name] <= budget]
    assert fitting and report.budget.rung == fitting[-1]  # the most probes that fit
    assert len(fitting) == 3 or predicted[tried[len(fitting)]] > budget
    probes = int(report.budget.rung.split("(")[1].split()[0])
    probed = [layer for layer in report.layers if layer.storage == "probed"]
    assert report.defaults.probes == probes > default and probed and all(layer.probes == probes for layer in probed)


def test_checkpointing_covers_the_fewest_blocks_that_fit(gelu_predictions: dict[str, int]) -> None:
    blocks = find_blocks(gelu_net())
    assert blocks == [f"1.{i}" for i in range(4)]  # the stem conv alone is no block
    budget = gelu_predictions["recompute + probes"] - 1
    assert gelu_predictions["checkpoint per block"] <= budget
    converted, _ = _chosen_and_measured(budget)
    report = converted.xconv_report
    count = len(report.checkpointed)
    assert 0 < count < len(blocks) and report.budget.rung == f"checkpoint per block ({count} of 4 blocks)"
    fewer = f"checkpoint per block ({count - 1} of 4 blocks)"
    assert count == 1 or report.budget.predicted[fewer] > budget
    assert sum(type(module).__name__ == "CheckpointedGeluBlock" for module in converted.modules()) == count


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
