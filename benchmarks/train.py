"""Training with XConv against exact training, on data that ships with scikit-learn.

Tasks (each run for every seed with identical hyperparameters, exact and XConv at each budget):

- digits: scikit-learn's digits upscaled to 16x16 (1400 train / 397 test), a BatchNorm residual CNN,
  SGD (momentum 0.9, lr 0.05, weight decay 5e-4), cosine decay over 12 epochs, batch 64.
- digits-adam: the same with Adam at a constant learning rate (0.01): eval-mode accuracy with the
  running BatchNorm statistics, after xconv_patch.recalibrate_bn, and with a larger BatchNorm momentum.
- denoise: removing Gaussian noise (sigma 25/255) from grayscale photographs with a small U-Net with
  transposed convolutions, trained on 32x32 patches of china.jpg, tested on the whole of flower.jpg
  (PSNR); Adam (lr 2e-3), cosine decay over 15 epochs of 100 steps, batch 16.
- seg3d: foreground segmentation of synthetic 32^3 volumes (ellipsoids and cubes of random size,
  position and intensity in Gaussian noise, drawn on the fly from the run's seed: benchmarks.volumes)
  by a MONAI-style 3-D U-Net (benchmarks.unet3d: Conv3d, InstanceNorm3d, LeakyReLU, max-pools,
  transposed convs, skip concatenations), Dice + cross-entropy loss, Dice on 32 held-out volumes;
  Adam (lr 3e-3), cosine decay over 6 epochs of 25 steps, batch 4.

Reported: final metric (mean and spread over seeds), saved activation memory of one training step
(xconv_patch.SavedTensors), the peak memory of one SGD training step at the training shape
(xconv_patch.measure_memory) and step time (medians of interleaved steps, as ratios to exact).
With a memory limit (--memory-limit, seg3d's default 1GiB), also the largest input side (every
spatial side equal, at the task's batch size) whose training step fits, predicted under
FakeTensorMode (xconv_patch.measure: MemoryPredictor, largest_side), and the peak of one real step
at that side.

Configurations: exact (the unconverted model), then xconv_patch.convert at each probe budget with
each estimator or recipe. Config fields made with convert_option are convert's keyword arguments
(recompute, norm_storage): each is a command-line option taking several values, and every combination runs.

    python -m benchmarks.train digits
    python -m benchmarks.train denoise --probes 8 16 32
    python -m benchmarks.train seg3d --memory-limit 2GiB
    python -m benchmarks.train digits --recompute on off
    python -m benchmarks.train digits --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from benchmarks._common import (
    ESTIMATORS,
    crop_corners,
    crops,
    markdown_table,
    mean_spread,
    patch,
    result_file,
    sample_photographs,
    save_figure,
    save_results,
    set_threads,
    shuffled_batches,
)
from benchmarks.unet3d import UNet3d
from benchmarks.volumes import dice, dice_cross_entropy, synthetic_volumes
from xconv_patch import measure_memory, recalibrate_bn, set_bn_momentum
from xconv_patch.measure import MemoryPredictor, largest_side, parse_size
from xconv_patch.memory import saved_activation_bytes

Batch = tuple[torch.Tensor, torch.Tensor]
Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


FAMILY = "benchmark"
"""The measure package's model family for the tasks' synthetic batches: one input, the generic loss."""


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected 'on' or 'off', got {text!r}")
    return text == "on"


def convert_option(help: str, parse: Callable[[str], Any] = str) -> Any:
    """A Config field that is xconv_patch.convert's keyword argument of the same name: passed when
    set (None leaves convert's default), shown in the configuration's name, and offered by main()
    as a command-line option (--the-name) taking several values, parsed by `parse`."""
    return field(default=None, metadata={"convert": help, "parse": parse})


@dataclass(frozen=True)
class Config:
    """Exact (probes = 0: the unconverted model), or XConv at a probe budget: every convolution with
    one estimator, or a shipped recipe, plus convert's keyword arguments in the convert_option fields.
    A new convert setting is one more such field."""

    probes: int = 0
    estimator: str = "deflated"
    recipe: str | None = None
    bn_momentum: float = 0.1
    recompute: bool | None = convert_option("recompute cheap activations in backward (on, off)", on_off)
    norm_storage: str | None = convert_option("how norm inputs are kept (exact, bfloat16, int8)")

    def __post_init__(self) -> None:
        if self.probes == 0 and self.convert_options():
            raise ValueError(f"exact (probes=0) is the unconverted model: convert options {self.convert_options()} "
                             "need a probe budget")

    @staticmethod
    def convert_fields() -> list[Field]:
        return [option for option in fields(Config) if "convert" in option.metadata]

    def convert_options(self) -> dict[str, Any]:
        """convert's keyword arguments this configuration sets."""
        values = {option.name: getattr(self, option.name) for option in self.convert_fields()}
        return {name: value for name, value in values.items() if value is not None}

    @property
    def name(self) -> str:
        if self.probes == 0:
            name = "exact"
        else:
            name = f"{self.recipe} recipe" if self.recipe else self.estimator
            name += f" r={self.probes}"
        name += "".join(f", {key}={value}" for key, value in self.convert_options().items())
        return name if self.bn_momentum == 0.1 else f"{name}, BN momentum {self.bn_momentum}"


class Task(ABC):
    """A dataset, a network, a loss, an optimizer and a test metric."""

    name: str
    metric: str
    epochs: int
    learning_rate: float
    input_shape: tuple[int, ...]
    """One training batch's input shape: convert analyses it to plan what is recomputed."""
    side_multiple = 1
    """What every spatial side of an input must be a multiple of (2 ** the network's downsamplings)."""
    memory_limit: int | None = None
    """The default --memory-limit: bytes under which to search the largest input side."""
    note = ""

    def shorten(self) -> None:
        """Make the task a smoke run's (--quick): fewer epochs."""
        self.epochs = 2

    @abstractmethod
    def network(self) -> nn.Module:
        """A freshly initialised network (under the caller's torch seed)."""

    @abstractmethod
    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches drawn with `generator`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of one batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The test metric, in eval mode."""

    @abstractmethod
    def optimizer(self, model: nn.Module, steps: int) -> Optimization:
        """The optimizer and its learning-rate schedule over `steps` steps."""


class Digits(Task):
    """scikit-learn's 8x8 digits, upscaled to 16x16; a 3-block BatchNorm ResNet."""

    metric = "test accuracy (%)"
    epochs = 12
    batch_size = 64
    input_shape = (64, 1, 16, 16)

    def __init__(self, adam: bool = False) -> None:
        from sklearn.datasets import load_digits

        self.adam = adam
        self.name = "digits-adam" if adam else "digits"
        self.learning_rate = 0.01 if adam else 0.05
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        train, test = order[:1400], order[1400:]
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_images, self.train_labels = images[train], labels[train]
        self.test_images, self.test_labels = images[test], labels[test]

    def network(self) -> nn.Module:
        width = 16

        def block(inputs: int, outputs: int, stride: int) -> BasicBlock:
            downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            return BasicBlock(inputs, outputs, stride, downsample if stride > 1 or inputs != outputs else None)

        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
        )

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        return shuffled_batches(self.train_images, self.train_labels, self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        predictions = model(self.test_images).argmax(1)
        model.train()
        return 100 * (predictions == self.test_labels).float().mean().item()

    def optimizer(self, model: nn.Module, steps: int) -> Optimization:
        if self.adam:
            optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
            return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.learning_rate, momentum=0.9, weight_decay=5e-4)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)


class UNet(nn.Module):
    """A two-level U-Net with transposed-convolution upsampling; it predicts a correction to its input."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()

        def stage(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, stride, 1), nn.ReLU(inplace=True),
                nn.Conv2d(outputs, outputs, 3, 1, 1), nn.ReLU(inplace=True),
            )

        self.encode1 = stage(channels, width)
        self.encode2 = stage(width, 2 * width, stride=2)
        self.bottom = stage(2 * width, 4 * width, stride=2)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.decode2 = stage(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.decode1 = stage(2 * width, width)
        self.output = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        encoded1 = self.encode1(image)
        encoded2 = self.encode2(encoded1)
        decoded2 = self.decode2(torch.cat([self.up2(self.bottom(encoded2)), encoded2], 1))
        decoded1 = self.decode1(torch.cat([self.up1(decoded2), encoded1], 1))
        return image + self.output(decoded1)


class Denoising(Task):
    """Gaussian noise (sigma 25/255) removed from grayscale photographs by a U-Net: trained on china.jpg
    patches, tested on flower.jpg. (In colour, the PSNR on flower.jpg varied by 2 dB between seeds.)"""

    name = "denoise"
    metric = "flower PSNR (dB)"
    epochs = 15
    steps_per_epoch = 100
    batch_size = 16
    patch = 32
    input_shape = (16, 1, 32, 32)
    side_multiple = 4
    noise = 25 / 255
    learning_rate = 2e-3

    def __init__(self) -> None:
        photographs = {name: self.grayscale(image) for name, image in sample_photographs().items()}
        self.train_images = photographs["china"]
        self.test_image = photographs["flower"]
        self.noisy_test_image = self.test_image + self.noise * torch.randn(
            self.test_image.shape, generator=torch.Generator().manual_seed(0)
        )
        self.note = f"; the noisy flower.jpg itself has {self.psnr(self.noisy_test_image, self.test_image):.2f} dB"

    @staticmethod
    def grayscale(image: torch.Tensor) -> torch.Tensor:
        """ITU-R BT.601 luma, cropped to multiples of 4 (the U-Net halves the resolution twice)."""
        luma = torch.einsum("chw,c->hw", image, torch.tensor([0.299, 0.587, 0.114])).unsqueeze(0)
        return luma[:, : luma.shape[1] // 4 * 4, : luma.shape[2] // 4 * 4]

    def network(self) -> nn.Module:
        return UNet(channels=1)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch):
            corners = crop_corners(self.train_images, self.patch, self.batch_size, generator)
            clean = crops(self.train_images, corners, self.patch)
            yield clean + self.noise * torch.randn(clean.shape, generator=generator), clean

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        noisy, clean = batch
        return F.mse_loss(model(noisy), clean)

    @staticmethod
    def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
        return -10 * math.log10(F.mse_loss(prediction.clamp(0, 1), target).item())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        prediction = model(self.noisy_test_image.unsqueeze(0))[0]
        model.train()
        return self.psnr(prediction, self.test_image)

    def optimizer(self, model: nn.Module, steps: int) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)


class Segmentation3d(Task):
    """Foreground segmentation of synthetic volumes (benchmarks.volumes) by a 3-D U-Net, trained on
    volumes drawn on the fly from the run's seed, tested on a fixed held-out set (Dice over all its voxels)."""

    name = "seg3d"
    metric = "test Dice (%)"
    epochs = 6
    steps_per_epoch = 25
    batch_size = 4
    side = 32
    input_shape = (batch_size, 1, side, side, side)
    side_multiple = 4
    memory_limit = 2**30
    learning_rate = 3e-3
    test_volumes = 32
    test_seed = 10_000
    """The held-out set's generator seed (the training runs' seeds are 0, 1, 2 ...)."""

    def __init__(self) -> None:
        self.test_images, self.test_labels = self.held_out()
        self.note = f"; held-out foreground fraction {self.test_labels.float().mean().item():.3f}"

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        return synthetic_volumes(self.test_volumes, self.side, torch.Generator().manual_seed(self.test_seed))

    def shorten(self) -> None:
        self.epochs, self.steps_per_epoch, self.test_volumes = 2, 3, 8
        self.memory_limit = 64 * 2**20
        self.test_images, self.test_labels = self.held_out()

    def network(self) -> nn.Module:
        return UNet3d(in_channels=1, out_channels=2, channels=(8, 16, 32), act="leaky", norm="instance")

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch):
            yield synthetic_volumes(self.batch_size, self.side, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, labels = batch
        return dice_cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        logits = torch.cat([model(images) for images in self.test_images.split(self.batch_size)])
        model.train()
        return dice(logits, self.test_labels)

    def optimizer(self, model: nn.Module, steps: int) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)


TASKS: dict[str, Callable[[], Task]] = {
    "digits": Digits,
    "digits-adam": lambda: Digits(adam=True),
    "denoise": Denoising,
    "seg3d": Segmentation3d,
}


def build(task: Task, config: Config, seed: int) -> nn.Module:
    """The task's network, seeded, patched as the configuration says."""
    torch.manual_seed(seed)
    model = task.network()
    if config.probes:
        model = patch(
            model, config.probes, ESTIMATORS[config.estimator], config.recipe, task.input_shape,
            **config.convert_options(),
        )
    set_bn_momentum(model, config.bn_momentum)
    return model.train()


def train(task: Task, config: Config, seed: int) -> dict[str, list[float]]:
    """One run; after each epoch the mean training loss, the test metric and, for a model with
    BatchNorm, the test metric after recalibrate_bn (on a copy: training goes on unaffected)."""
    model = build(task, config, seed)
    has_batchnorm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    steps_per_epoch = sum(1 for _ in task.epoch(torch.Generator().manual_seed(0)))
    optimizer, schedule = task.optimizer(model, task.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"metric": [], "loss": [], "recalibrated": []}
    for _ in range(task.epochs):
        losses = []
        for batch in task.epoch(generator):
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        curves["loss"].append(statistics.fmean(losses))
        curves["metric"].append(task.evaluate(model))
        if has_batchnorm:
            copied = copy.deepcopy(model)
            recalibrate_bn(copied, task.epoch(torch.Generator().manual_seed(0)))
            curves["recalibrated"].append(task.evaluate(copied))
    return curves


def sample_shape(task: Task, side: int | None = None) -> tuple[int, ...]:
    """One input sample's shape: the task's, or with every spatial side `side`."""
    channels, *spatial = task.input_shape[1:]
    return (channels, *(spatial if side is None else [side] * len(spatial)))


def step_costs(task: Task, configs: list[Config], rounds: int) -> dict[str, dict[str, float]]:
    """Saved activation bytes of one training step, and its median time over interleaved rounds; the
    peak of one SGD step at the training shape (measure_memory, on a fresh copy of the model)."""
    batch = next(task.epoch(torch.Generator().manual_seed(0)))
    models = {config.name: build(task, config, 0) for config in configs}
    optimizers = {name: task.optimizer(model, 1)[0] for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds + 2):
        for name, model in models.items():
            started = time.perf_counter()
            loss = task.loss(model, batch)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if round_index >= 2:
                times[name].append(time.perf_counter() - started)
    batch_size, cpu = task.input_shape[0], torch.device("cpu")
    return {
        config.name: {
            "activation_bytes": saved_activation_bytes(model, lambda model=model: task.loss(model, batch)),
            "peak_bytes": measure_memory(build(task, config, 0), FAMILY, batch_size, sample_shape(task),
                                         device=cpu).peak_bytes,
            "step_seconds": statistics.median(times[config.name]),
        }
        for config, model in zip(configs, models.values(), strict=True)
    }


def largest_sides(task: Task, configs: list[Config], limit: int) -> dict[str, dict[str, int]]:
    """Per configuration, the largest input side (a multiple of task.side_multiple, at the task's
    batch size) whose SGD training step is predicted to fit `limit` bytes (MemoryPredictor under
    FakeTensorMode, largest_side), the predicted peak there, and the peak one real step measures there."""
    batch_size, cpu = task.input_shape[0], torch.device("cpu")
    spatial_dims = len(task.input_shape) - 2
    sides = {}
    for config in configs:
        predictor = MemoryPredictor(build(task, config, 0), FAMILY, sample_shape(task))
        peaks: dict[int, int] = {}

        def peak(side: int, predictor: MemoryPredictor = predictor, peaks: dict[int, int] = peaks) -> int:
            peaks[side] = predictor(batch_size, sample_shape(task, side)).peak_bytes
            return peaks[side]

        side = largest_side(peak, limit, dims=spatial_dims, multiple=task.side_multiple)
        measured = 0
        if side:
            measured = measure_memory(build(task, config, 0), FAMILY, batch_size, sample_shape(task, side),
                                      device=cpu).peak_bytes
        sides[config.name] = {"side": side, "predicted_peak_bytes": peaks.get(side, 0), "measured_peak_bytes": measured}
        print(f"{config.name}: largest side {side} under {limit / 2**20:.0f} MiB (predicted peak "
              f"{peaks.get(side, 0) / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB)", flush=True)
    return sides


def results_table(task: Task, configs: list[Config], runs, costs) -> str:
    exact = configs[0].name
    final = {config.name: [curves["metric"][-1] for curves in runs[config.name]] for config in configs}
    rows = []
    for config in configs:
        name = config.name
        difference = statistics.fmean(final[name]) - statistics.fmean(final[exact])
        memory, peak, seconds = (costs[name][key] for key in ("activation_bytes", "peak_bytes", "step_seconds"))
        rows.append([
            name, mean_spread(final[name]), f"{difference:+.2f}",
            f"{memory / 2**20:.2f} ({memory / costs[exact]['activation_bytes']:.2f}x)",
            f"{peak / 2**20:.2f} ({peak / costs[exact]['peak_bytes']:.2f}x)",
            f"{1000 * seconds:.1f} ({seconds / costs[exact]['step_seconds']:.2f}x)",
        ])
    headers = ["configuration", f"{task.metric}, mean ± sd", "vs exact", "activation MiB (vs exact)",
               "peak MiB (vs exact)", "step ms (vs exact)"]
    return markdown_table(headers, rows)


def sides_table(task: Task, configs: list[Config], sides, limit: int) -> str:
    """The largest input side under the memory limit per configuration: predicted, then measured."""
    exact, dims = sides[configs[0].name]["side"], len(task.input_shape) - 2
    unit = "voxels" if dims == 3 else "pixels"
    rows = []
    for config in configs:
        side = sides[config.name]
        ratio = (side["side"] / exact) ** dims if exact else float("nan")
        rows.append([
            config.name, f"{side['side']} ({ratio:.2f}x exact's {unit})", f"{side['predicted_peak_bytes'] / 2**20:.1f}",
            f"{side['measured_peak_bytes'] / 2**20:.1f}", "yes" if 0 < side["measured_peak_bytes"] <= limit else "no",
        ])
    headers = [f"configuration (batch {task.input_shape[0]})", f"largest side under {limit / 2**20:.0f} MiB",
               "predicted peak MiB", "measured peak MiB", "fits"]
    return markdown_table(headers, rows)


def bn_table(configs: list[Config], runs) -> str:
    """Eval-mode accuracy over training with the running BatchNorm statistics and with recalibrated ones."""

    def summary(key: str, config: Config) -> list[str]:
        curves = [run[key] for run in runs[config.name]]
        return [mean_spread([curve[-1] for curve in curves]), mean_spread([statistics.fmean(c) for c in curves]),
                mean_spread([min(curve) for curve in curves])]

    rows = [[config.name, *summary("metric", config), *summary("recalibrated", config)] for config in configs]
    headers = ["configuration", *(f"{what}, {source}" for source in ("running stats", "recalibrate_bn")
                                  for what in ("final", "mean over epochs", "worst epoch"))]
    return markdown_table(headers, rows)


def plot(task: Task, configs: list[Config], runs, stem: str, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"metric": task.metric, "recalibrated": f"{task.metric} after recalibrate_bn", "loss": "training loss"}
    keys = ["metric", "recalibrated", "loss"] if runs[configs[0].name][0]["recalibrated"] else ["metric", "loss"]
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for config in configs:
            curves = torch.tensor([run[key] for run in runs[config.name]])
            epochs = range(1, curves.shape[1] + 1)
            (line,) = axis.plot(epochs, curves.mean(0), label=config.name)
            axis.fill_between(epochs, curves.min(0).values, curves.max(0).values, color=line.get_color(), alpha=0.15)
        axis.set_xlabel("epoch")
        axis.set_ylabel(labels[key])
        axis.set_yscale("log" if key == "loss" else "linear")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if task.name.startswith("digits"):
        for axis in axes[0][:-1]:
            axis.set_ylim(90 if task.name == "digits" else 0, 100)
    figure.suptitle(f"{task.name}: mean over seeds, band = min to max", fontsize=10)
    figure.tight_layout()
    save_figure(figure, stem, quick=quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--estimators", nargs="*", choices=list(ESTIMATORS), default=["deflated"],
                        help="estimators applied to every convolution")
    parser.add_argument("--recipes", nargs="*", default=[], help="shipped recipes to compare as well")
    parser.add_argument("--bn-momentum", type=float, nargs="+", default=[0.1],
                        help="BatchNorm momenta to compare (digits-adam)")
    for option in Config.convert_fields():
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=option.metadata["parse"], nargs="+",
                            default=[None], help=f"convert's {option.name}: {option.metadata['convert']}")
    parser.add_argument("--memory-limit", type=parse_size,
                        help="search the largest input side whose step fits, e.g. 2GiB (seg3d's default: 1GiB)")
    parser.add_argument("--lr", type=float, help="replaces the task's learning rate")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tag", help="suffix for the output files, to keep runs apart")
    parser.add_argument("--timing-rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs (seg3d: of 3 steps, 64 MiB limit), 1 seed, to check that everything runs")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG from the saved results of a run with the same arguments")
    args = parser.parse_args()
    set_threads(args.threads)
    task = TASKS[args.task]()
    if args.quick:
        task.shorten()
        args.seeds, args.timing_rounds = 1, 2
    if args.lr:
        task.learning_rate = args.lr
    memory_limit = args.memory_limit or task.memory_limit
    names = [option.name for option in Config.convert_fields()]
    option_grid = [dict(zip(names, values, strict=True))
                   for values in itertools.product(*(getattr(args, name) for name in names))]
    configs = [Config(bn_momentum=momentum) for momentum in args.bn_momentum]
    configs += [
        Config(probes, estimator, recipe, momentum, **options)
        for momentum in args.bn_momentum
        for probes in args.probes
        for estimator, recipe in [*((name, None) for name in args.estimators), *(("deflated", r) for r in args.recipes)]
        for options in option_grid
    ]
    stem = f"train_{task.name.replace('-', '_')}" + (f"_{args.tag}" if args.tag else "")
    if args.replot:
        plot(task, configs, json.loads(result_file(stem, "json", args.quick).read_text())["runs"], stem, args.quick)
        return
    started = time.perf_counter()
    costs = step_costs(task, configs, args.timing_rounds)
    sides = largest_sides(task, configs, memory_limit) if memory_limit else None
    runs = {}
    for config in configs:
        runs[config.name] = [train(task, config, seed) for seed in range(args.seeds)]
        finals = [run["metric"][-1] for run in runs[config.name]]
        print(f"{config.name}: {finals} ({time.perf_counter() - started:.0f} s)", flush=True)
    table = results_table(task, configs, runs, costs)
    if runs[configs[0].name][0]["recalibrated"]:
        table += "\n\n" + bn_table(configs, runs)
    if sides is not None:
        table += "\n\n" + sides_table(task, configs, sides, memory_limit)
    header = (f"{task.name}: learning rate {task.learning_rate}, {args.seeds} seeds, {task.epochs} epochs, "
              f"{torch.get_num_threads()} thread(s), {time.perf_counter() - started:.0f} s{task.note}")
    results = {"arguments": vars(args), "costs": costs, "runs": runs, "largest_sides": sides}
    save_results(stem, results, f"{header}\n\n{table}", quick=args.quick)
    plot(task, configs, runs, stem, args.quick)


if __name__ == "__main__":
    main()
