"""The training benchmark's seg3d task (benchmarks.train, benchmarks.volumes) and its configurations."""

from __future__ import annotations

import pytest
import torch

from benchmarks.train import Config, Segmentation3d, build
from benchmarks.volumes import dice, synthetic_volumes
from xconv_patch.layers import XConvMixin


def test_synthetic_volumes_are_fixed_by_the_generator() -> None:
    """Same generator seed, same volumes, whatever the global random state; another seed, others."""
    torch.manual_seed(1)
    images, labels = synthetic_volumes(3, 16, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    again = synthetic_volumes(3, 16, torch.Generator().manual_seed(7))
    other = synthetic_volumes(3, 16, torch.Generator().manual_seed(8))
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(labels, other[1])
    assert images.shape == (3, 1, 16, 16, 16) and labels.shape == (3, 16, 16, 16)
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1}
    # Shapes are brighter than the background: the labels mark where the intensity was added.
    assert images[:, 0][labels == 1].mean() > images[:, 0][labels == 0].mean() + 0.4


def test_held_out_set_is_fixed_and_apart_from_training() -> None:
    first, second = Segmentation3d(), Segmentation3d()
    assert torch.equal(first.test_images, second.test_images)
    batch = next(first.epoch(torch.Generator().manual_seed(0)))
    assert not torch.equal(batch[0], first.test_images[: first.batch_size])


def test_dice() -> None:
    labels = torch.tensor([[1, 1, 0, 0]])
    logits = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]])  # predicts foreground at 0 and 2
    assert dice(logits, labels) == pytest.approx(50.0)
    assert dice(torch.stack([1 - labels, labels], 1).float(), labels) == 100.0


def test_seg3d_quick_step_exact_and_patched() -> None:
    """One training step of the quick configuration, exact and XConv: a finite loss, every weight updated."""
    task = Segmentation3d()
    task.shorten()
    for config in (Config(), Config(probes=8)):
        model = build(task, config, seed=0)
        probed = [module for module in model.modules() if isinstance(module, XConvMixin)]
        assert bool(probed) == bool(config.probes)
        optimizer, _ = task.optimizer(model, steps=1)
        before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        loss = task.loss(model, next(task.epoch(torch.Generator().manual_seed(0))))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        for name, parameter in model.named_parameters():
            assert not torch.equal(parameter, before[name]), name
        assert 0 <= task.evaluate(model) <= 100


def test_config_passes_convert_options() -> None:
    """A convert_option field reaches convert (recompute=False probes what recompute=True recomputes)
    and names the configuration; the exact baseline takes none."""
    task = Segmentation3d()
    counts = {}
    for recompute in (True, False):
        config = Config(probes=8, recompute=recompute)
        assert config.name == f"deflated r=8, recompute={recompute}"
        report = build(task, config, seed=0).xconv_report
        counts[recompute] = sum(layer.storage == "probed" for layer in report.layers)
    assert counts[False] > counts[True] > 0
    assert Config(probes=8).convert_options() == {}
    with pytest.raises(ValueError, match="exact"):
        Config(recompute=False)
