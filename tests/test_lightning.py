"""XConvCallback in a real Lightning Trainer on CPU: conversion once, BatchNorm recalibration, checkpoints."""

from __future__ import annotations

import copy
import importlib
import itertools
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xconv_patch import XConv2d, XConvMixin, recalibrate_bn

pl = pytest.importorskip("lightning.pytorch")
from xconv_patch.lightning import XConvCallback  # noqa: E402

BATCH, SIZE = 8, 16


def images(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 3, SIZE, SIZE, generator=generator) * 2 + 1
    return TensorDataset(inputs, torch.randint(0, 10, (count,), generator=generator))


def small_cnn(momentum: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class Classifier(pl.LightningModule):
    """Records its losses and, at the start of each validation, its mode and a copy of its network."""

    def __init__(self, net: nn.Module | None = None, size: int = SIZE) -> None:
        super().__init__()
        self.net = small_cnn() if net is None else net
        self.example_input_array = torch.zeros(BATCH, 3, size, size)
        self.size = size
        self.losses: list[float] = []
        self.validations: list[tuple[bool, nn.Module]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def on_validation_epoch_start(self) -> None:
        self.validations.append((self.training, copy.deepcopy(self.net)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(images(6 * BATCH, seed=1), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(images(BATCH, seed=2), batch_size=BATCH)


class CallsNetDirectly(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])


def trainer(tmp_path: Path, callback: XConvCallback, **options: Any) -> pl.Trainer:
    settings = {
        "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "limit_val_batches": 1, "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=[callback], **(settings | options))


def xconv_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, XConvMixin)}


def norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [layer for layer in module.modules() if isinstance(layer, nn.BatchNorm2d)]


def training_inputs(count: int, scale: float = 1.0) -> list[torch.Tensor]:
    return [scale * inputs for inputs, _ in itertools.islice(Classifier().train_dataloader(), count)]


def assert_recalibrated(net: nn.Module, batches: int, scale: float) -> None:
    """net's running statistics are those recalibrate_bn estimates from the first training inputs, scaled."""
    expected = copy.deepcopy(net)
    recalibrate_bn(expected, training_inputs(batches, scale))
    for norm, reference in zip(norms(net), norms(expected), strict=True):
        torch.testing.assert_close(norm.running_mean, reference.running_mean)
        torch.testing.assert_close(norm.running_var, reference.running_var)


def xconv_messages(log: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in log.records if record.getMessage().startswith("xconv:")]


@pytest.fixture
def lightning_log(caplog: pytest.LogCaptureFixture) -> Any:
    """Lightning's rank-zero messages (its logger propagates to the root logger only if that had handlers)."""
    logger = logging.getLogger("lightning.pytorch")
    if logger.propagate:
        yield caplog
        return
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_fit_converts_once_trains_and_logs_the_report(tmp_path: Path, lightning_log: Any) -> None:
    model = Classifier()
    initial = [p.detach().clone() for p in model.parameters()]
    callback = XConvCallback(probes=4, recompute=False, recalibrate_bn=False)
    csv = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, callback, logger=csv).fit(model)

    layers = xconv_layers(model)
    report = callback.report
    assert set(layers) == {"net.3"} and isinstance(layers["net.3"], XConv2d)  # the first conv stays exact
    assert report is model.xconv_report and callback.module is model
    assert report.count("patched") == 1 and report.input_shape == (BATCH, 3, SIZE, SIZE)  # example_input_array
    assert len(model.losses) == 2 and all(math.isfinite(loss) for loss in model.losses)
    assert all(not torch.equal(before, after) for before, after in zip(initial, model.parameters(), strict=True))
    hparams = (Path(csv.log_dir) / "hparams.yaml").read_text()
    assert "xconv/convs_patched: 1" in hparams and "xconv/inputs_probed: 1" in hparams
    assert xconv_messages(lightning_log) == [f"xconv: converted Classifier: {report.summary()}"]

    second = trainer(tmp_path, callback)  # a fresh Trainer: 2 more steps
    second.fit(model)
    second.validate(model, verbose=False)
    assert len(model.losses) == 4
    assert callback.report is report and xconv_layers(model) == layers  # the same module objects
    assert len(xconv_messages(lightning_log)) == 1

    another = XConvCallback(probes=8)
    trainer(tmp_path, another, max_steps=1).fit(model)
    assert another.report is report and xconv_layers(model) == layers and layers["net.3"].probes == 4
    assert xconv_messages(lightning_log)[1:] == [f"xconv: Classifier is converted already: {report.summary()}"]


@pytest.mark.parametrize("recalibrate", [True, False])
def test_batchnorm_statistics_are_recalibrated_before_validation_and_after_fit(
    tmp_path: Path, recalibrate: bool
) -> None:
    """With momentum 0, training leaves the running statistics at (0, 1): only recalibration moves them."""
    model = Classifier(small_cnn(momentum=0.0))
    callback = XConvCallback(
        probes=4, recompute=False, recalibrate_bn=recalibrate, recalibrate_batches=3,
        batch_to_input=lambda batch: 2 * batch[0],  # an input that differs from the plain batch's
    )
    trainer(tmp_path, callback, max_steps=3, val_check_interval=2, num_sanity_val_steps=1).fit(model)

    (sanity_training, sanity), (training, at_step_2) = model.validations
    assert not sanity_training and not training  # validation runs in eval mode
    for norm in norms(sanity):  # the sanity check comes before training: nothing to recalibrate
        assert not norm.running_mean.any() and bool((norm.running_var == 1).all())
    if recalibrate:
        assert_recalibrated(at_step_2, batches=3, scale=2.0)
        assert_recalibrated(model.net, batches=3, scale=2.0)  # after the last step (3), which no validation followed
        assert not torch.equal(norms(model.net)[0].running_mean, norms(at_step_2)[0].running_mean)
    else:
        for norm in norms(at_step_2) + norms(model.net):
            assert not norm.running_mean.any() and bool((norm.running_var == 1).all())


def test_a_trainer_checkpoint_loads_into_the_unpatched_and_a_patched_resnet(tmp_path: Path) -> None:
    model = Classifier(torchvision.models.resnet18(num_classes=10), size=32)
    model.train_dataloader = lambda: DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8)), 4)
    callback = XConvCallback(probes=4, recompute=False, recalibrate_batches=2)
    fit = trainer(tmp_path, callback, limit_val_batches=0)
    fit.fit(model)
    path = tmp_path / "resnet.ckpt"
    fit.save_checkpoint(path)
    assert xconv_layers(model)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(inputs)

    plain = torchvision.models.resnet18(num_classes=10)
    state = torch.load(path, weights_only=False)["state_dict"]
    plain.load_state_dict({key.removeprefix("net."): value for key, value in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(inputs), expected, rtol=0, atol=0)

    unpatched = Classifier.load_from_checkpoint(path, net=torchvision.models.resnet18(num_classes=10))
    assert not xconv_layers(unpatched)
    patched = Classifier(torchvision.models.resnet18(num_classes=10), size=32)
    trainer(tmp_path, XConvCallback(probes=4, recompute=False)).validate(patched, ckpt_path=path, verbose=False)
    assert xconv_layers(patched).keys() == xconv_layers(model).keys()
    for loaded in (unpatched, patched):
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_a_warning_when_training_step_bypasses_the_converted_forward(tmp_path: Path) -> None:
    model = CallsNetDirectly()
    with pytest.warns(UserWarning, match="training_step did not call the forward of the converted CallsNetDirectly"):
        trainer(tmp_path, XConvCallback(recalibrate_bn=False), max_steps=1).fit(model)
    assert model.xconv_report.recomputes

    model = CallsNetDirectly()
    callback = XConvCallback(submodule="net", input_shape=(BATCH, 3, SIZE, SIZE), recalibrate_bn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callback, max_steps=1).fit(model)
    assert not [w for w in caught if "did not call the forward" in str(w.message)]
    assert callback.module is model.net and callback.report.layer("3").storage == "recomputed"


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.relu(self.stem(x)), self.weight, padding=1)
        return self.head(x.mean(dim=(2, 3)))


def test_rewrite_forward_puts_the_graph_module_in_the_submodules_place(tmp_path: Path) -> None:
    model = Classifier(FunctionalNet())
    keys = model.state_dict().keys()
    callback = XConvCallback(probes=4, submodule="net", rewrite_forward=True, recalibrate_bn=False)
    fit = trainer(tmp_path, callback)
    fit.fit(model)
    assert isinstance(model.net, torch.fx.GraphModule) and callback.module is model.net
    assert callback.report.forward_rewritten and model.state_dict().keys() == keys
    assert len(model.losses) == 2 and all(math.isfinite(loss) for loss in model.losses)
    fit.validate(model, verbose=False)
    assert callback.module is model.net


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name the submodule"):
        XConvCallback(rewrite_forward=True)
    with pytest.raises(ValueError, match="recalibrate_batches"):
        XConvCallback(recalibrate_batches=0)
    with pytest.raises(ValueError, match="submodule='backbone'"):
        trainer(tmp_path, XConvCallback(submodule="backbone")).fit(Classifier())


def test_import_xconv_patch_does_not_import_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Lightning unimportable, xconv_patch imports and xconv_patch.lightning says how to install it."""
    for name in list(sys.modules):
        if name.partition(".")[0] in {"xconv_patch", "lightning"}:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # any import of it fails
    importlib.import_module("xconv_patch")
    with pytest.raises(ImportError) as error:
        importlib.import_module("xconv_patch.lightning")
    assert str(error.value) == 'xconv_patch.lightning needs Lightning: pip install "xconv-patch[lightning]"'
