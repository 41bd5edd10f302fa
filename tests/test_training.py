"""A patched model learns like the exact one on real data (scikit-learn's digits).

Seeded and deterministic. Mean training loss, first 5 -> last 20 of 200 SGD steps: exact
2.34 -> 0.09; converted (default recipe at 8 probes: first conv exact, the other two patched)
-> 0.19, 96% of the exact loss reduction. The test asks for 80%. With the patched layers' weight
gradient replaced by zeros the reduction is 63%, negated it is none: a regression that breaks
learning fails. (A wrong gradient scale is the unbiasedness tests' job.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xconv_patch import XConvMixin, convert

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS = 200


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small trains fastest on one thread, and is not slowed by busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = sklearn_datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return (images - images.mean()) / images.std(), torch.tensor(data.target)


def network() -> nn.Sequential:
    def stage(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *stage(1, 8, 1), *stage(8, 16, 2), *stage(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def losses(patch: bool) -> list[float]:
    images, labels = digits()
    torch.manual_seed(0)
    model = network()
    if patch:
        model = convert(model, probes=8)
        assert sum(isinstance(module, XConvMixin) for module in model.modules()) == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    history = []
    for _ in range(STEPS):
        batch = torch.randint(0, 1400, (64,), generator=order)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def test_patched_model_loss_goes_down_like_the_exact_models() -> None:
    exact, xconv = losses(patch=False), losses(patch=True)
    start = sum(exact[:5]) / 5
    exact_end, xconv_end = sum(exact[-20:]) / 20, sum(xconv[-20:]) / 20
    assert exact_end < 0.2 * start
    assert start - xconv_end > 0.8 * (start - exact_end), (start, exact_end, xconv_end)
