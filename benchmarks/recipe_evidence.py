"""The measurements behind the shipped recipes' comments (recipes/*.toml).

    python -m benchmarks.recipe_evidence memory resnet50 vgg16 densenet121 mobilenet_v2
    python -m benchmarks.recipe_evidence error resnet18 --probes 8 16 32
    python -m benchmarks.recipe_evidence unet
    python -m benchmarks.recipe_evidence depthwise-time

memory: saved activations (MiB) of a training-mode forward under candidate recipes, from plan() on
meta tensors; batch 8 at 224x224 (the U-Net: batch 4 at 256x256). Deterministic.
error: relative error ||dW_est - dW|| / ||dW|| of each conv's weight gradient in one step, mean
over probe draws, for each probe budget; random-init models on standardized crops of
scikit-learn's sample photos, cross-entropy on random labels (per pixel for dense outputs); with
medians per layer group (kernel and input size, or a name prefix).
unet: both of the above for the 4-level U-Net the unet recipe is written for.
depthwise-time: training-step time with depthwise convs exact (default recipe) against patched
(mobilenet recipe), measured interleaved in one process; medians after warm-up.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torchvision.models import get_model
from torchvision.ops import StochasticDepth

from benchmarks._common import crop_corners, crops, sample_photographs, set_threads
from benchmarks.layer_benchmark import CLOCKS, timed
from xconv_patch import Recipe, convert, load_recipe, plan
from xconv_patch.conversion import LayerRecord
from xconv_patch.conversion.recipe import Rule
from xconv_patch.measure import gradient_errors

MIB = 2**20
FAMILY_RECIPES = {
    "resnet": "resnet",
    "resnext": "resnet",
    "wide_resnet": "resnet",
    "vgg": "vgg",
    "densenet": "densenet",
    "mobilenet": "mobilenet",
    "efficientnet": "mobilenet",
    "unet": "unet",
}


def double_conv(inputs: int, outputs: int) -> nn.Sequential:
    """Two 3x3 conv - BatchNorm - ReLU layers."""
    layers: list[nn.Module] = []
    for channels in (inputs, outputs):
        conv = nn.Conv2d(channels, outputs, 3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """The unet recipe's model: `levels` max-pool steps down, transposed convs up, skips concatenated."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 32, levels: int = 4) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(levels + 1)]
        narrow_to_wide = list(zip(widths[-2::-1], widths[:0:-1], strict=True))
        self.down = nn.ModuleList(double_conv(i, o) for i, o in zip([in_channels, *widths], widths, strict=False))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(wide, narrow, 2, stride=2) for narrow, wide in narrow_to_wide)
        self.decode = nn.ModuleList(double_conv(2 * narrow, narrow) for narrow, _ in narrow_to_wide)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encode in enumerate(self.down):
            x = encode(self.pool(x) if level else x)
            skips.append(x)
        x = skips.pop()
        for up, decode in zip(self.up, self.decode, strict=True):
            x = decode(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


def build(name: str) -> nn.Module:
    """A random-init torchvision model by name, or 'unet'."""
    return UNet() if name == "unet" else get_model(name, weights=None)


def family_recipe(model_name: str) -> str | None:
    """The shipped recipe written for the model's family, if any."""
    return next((recipe for prefix, recipe in FAMILY_RECIPES.items() if model_name.startswith(prefix)), None)


def budget(probes: int, first_exact: bool = False) -> Recipe:
    """Every conv at `probes` probes, optionally with the first conv exact."""
    rules = [{"match": {"first": True}, "probes": 0}] if first_exact else []
    return Recipe.from_dict({"defaults": {"probes": probes}, "rules": rules}, source=f"r={probes}")


def with_exact(recipe: Recipe, glob: str) -> Recipe:
    """The recipe with one more rule keeping the convs whose name matches `glob` exact."""
    return replace(recipe, rules=(*recipe.rules, Rule(len(recipe.rules), {"glob": glob}, {"probes": 0})))


def memory_candidates(model_name: str) -> dict[str, Recipe]:
    candidates = {
        "every conv, r=8": budget(8),
        "every conv, r=16": budget(16),
        "first conv exact, r=16": budget(16, first_exact=True),
        "recipe default": load_recipe("default"),
    }
    family = family_recipe(model_name)
    if family:
        candidates[f"recipe {family}"] = load_recipe(family)
    if model_name == "unet":
        candidates["recipe unet, transposed convs exact"] = with_exact(load_recipe("unet"), "up.*")
    return candidates


def memory_input_shape(model_name: str) -> tuple[int, int, int, int]:
    return (4, 3, 256, 256) if model_name == "unet" else (8, 3, 224, 224)


def report_memory(model_names: Sequence[str]) -> None:
    for name in model_names:
        with torch.device("meta"):
            model = build(name)
        shape = memory_input_shape(name)
        print(f"# {name}, input {'x'.join(map(str, shape))}: saved activations, plan() on meta tensors")
        for label, recipe in memory_candidates(name).items():
            report = plan(model, recipe=recipe, input_shape=shape)
            before, after = report.activation_bytes_before, report.activation_bytes_after
            print(
                f"{label:38s} {before / MIB:7.1f} -> {after / MIB:7.1f} MiB ({before / after:.2f}x)"
                f"  {report.count('patched')} of {len(report.layers)} convs patched"
            )
        first = report.layers[0]
        print(f"first conv {first.name}: input saved {first.activation_bytes_before / MIB:.1f} MiB\n")


def photo_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """`batch` random size x size crops shared out between the sample photos, standardized per channel."""
    generator = torch.Generator().manual_seed(seed)
    photos = list(sample_photographs().values())
    share, extra = divmod(batch, len(photos))
    counts = [share + (index < extra) for index in range(len(photos))]
    images = torch.cat([crops(photo, crop_corners(photo, size, count, generator), size)
                        for photo, count in zip(photos, counts, strict=True)])
    return (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)


def conv_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The conv weight gradients of one cross-entropy step; `seed` selects the probe draw."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return {
        name: module.weight.grad.clone() for name, module in model.named_modules() if isinstance(module, _ConvNd)
    }


def layer_group(layer: LayerRecord, conv: _ConvNd, first: bool, prefix_parts: int) -> str:
    """A name prefix, or the conv's kind, kernel and input size: the layers a recipe rule would select."""
    if prefix_parts:
        return ".".join(layer.name.split(".")[:prefix_parts])
    if first:
        return "first conv"
    if conv.groups == conv.in_channels > 1:
        return "depthwise"
    spatial = layer.input_shape[2:]
    if math.prod(spatial) == 1:
        return "1x1 input (squeeze-excitation)"
    kind = "transposed " * conv.transposed + "x".join(map(str, conv.kernel_size))
    return f"{kind} on {'x'.join(map(str, spatial))}"


def report_errors(model_name: str, probes: Sequence[int], batch: int, size: int, draws: int, prefix_parts: int) -> None:
    torch.manual_seed(0)
    model = build(model_name)
    for module in model.modules():  # the same forward in every run
        if isinstance(module, nn.Dropout | StochasticDepth):
            module.eval()
    images = photo_batch(batch, size)
    logits = model(images)
    label_shape = logits.shape[:1] + logits.shape[2:]  # one label per pixel for dense outputs
    labels = torch.randint(logits.shape[1], label_shape, generator=torch.Generator().manual_seed(0))
    exact = conv_gradients(model, images, labels, seed=0)
    errors: dict[str, list[float]] = defaultdict(list)  # per layer, one mean per budget
    for budget_probes in probes:
        patched = convert(model, recipe=budget(budget_probes))
        seeds = range(1, draws + 1)
        per_draw = [gradient_errors(exact, conv_gradients(patched, images, labels, seed)) for seed in seeds]
        for name in exact:
            errors[name].append(statistics.fmean(draw[name].rel_error for draw in per_draw))

    layers = plan(model, input_shape=images.shape).layers  # every conv, in forward order, with its input shape
    convs = dict(model.named_modules())
    columns = " ".join(f"{f'r={p}':>7s}" for p in probes)
    print(f"# {model_name}, input {batch}x3x{size}x{size}: relative weight-gradient error, mean of {draws} draws")
    print(f"{'layer':42s} {'group':32s} {columns}")
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for index, layer in enumerate(layers):
        group = layer_group(layer, convs[layer.name], index == 0, prefix_parts)
        groups[group].append(errors[layer.name])
        print(f"{layer.name:42s} {group:32s} " + " ".join(f"{error:7.3f}" for error in errors[layer.name]))
    print(f"## median per group\n{'group':42s} {'':32s} {columns}")
    groups["all but the first conv"] = [errors[layer.name] for layer in layers[1:]]
    for group, rows in groups.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(f"{group:42s} {f'n={len(rows)}':32s} " + " ".join(f"{median:7.3f}" for median in medians))
    print()


def report_depthwise_time(model_name: str, batch: int, size: int, warmup: int, repeats: int, clock: str) -> None:
    torch.manual_seed(0)
    model = build(model_name)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(1000, (batch,))
    exact_label, patched_label = "depthwise exact (recipe default)", "depthwise patched (recipe mobilenet)"
    variants = {
        exact_label: convert(model, recipe="default", input_shape=images.shape),
        patched_label: convert(model, recipe="mobilenet", input_shape=images.shape),
        "unpatched": model,
    }

    def training_step(variant: nn.Module) -> None:
        variant.zero_grad(set_to_none=True)
        F.cross_entropy(variant(images), labels).backward()

    times: dict[str, list[float]] = defaultdict(list)
    for round_index in range(warmup + repeats):
        for label, variant in variants.items():
            seconds = timed(partial(training_step, variant), torch.device("cpu"), CLOCKS[clock])
            if round_index >= warmup:
                times[label].append(seconds)
    print(f"# {model_name}, batch {batch}, {size}x{size}, {torch.get_num_threads()} CPU thread(s), {clock} clock: "
          f"training-step time, median of {repeats} interleaved rounds after {warmup} warm-up")
    for label, seconds in times.items():
        print(f"{label:38s} {statistics.median(seconds):.3f} s")
    ratios = [patched / exact for patched, exact in zip(times[patched_label], times[exact_label], strict=True)]
    print(f"patched / exact depthwise, median of per-round ratios: {statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="saved activation MiB under candidate recipes")
    memory.add_argument("models", nargs="+", help="torchvision model names, or unet")
    error = commands.add_parser("error", help="per-layer weight-gradient error at given probe budgets")
    error.add_argument("model", help="a torchvision model name, or unet")
    error.add_argument("--probes", nargs="+", type=int, default=[8, 16, 32])
    error.add_argument("--batch", type=int, default=8)
    error.add_argument("--size", type=int, default=112, help="crop side in pixels")
    error.add_argument("--draws", type=int, default=3, help="probe draws averaged per layer")
    error.add_argument("--prefix", type=int, default=0, metavar="N",
                       help="group layers by the first N parts of their name instead of kernel and input size")
    commands.add_parser("unet", help="memory and error (batch 4, 128x128, r = 8, 16, 32) of the unet recipe's U-Net")
    timing = commands.add_parser("depthwise-time", help="step time with depthwise convs exact against patched")
    timing.add_argument("--model", default="mobilenet_v2")
    timing.add_argument("--batch", type=int, default=8)
    timing.add_argument("--size", type=int, default=112)
    timing.add_argument("--warmup", type=int, default=2)
    timing.add_argument("--repeats", type=int, default=11)
    timing.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="cpu: process CPU time, which leaves out waiting for a core on a shared machine")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.command == "memory":
        report_memory(args.models)
    elif args.command == "error":
        report_errors(args.model, args.probes, args.batch, args.size, args.draws, args.prefix)
    elif args.command == "unet":
        report_memory(["unet"])
        report_errors("unet", [8, 16, 32], batch=4, size=128, draws=3, prefix_parts=0)
    else:
        report_depthwise_time(args.model, args.batch, args.size, args.warmup, args.repeats, args.clock)


if __name__ == "__main__":
    main()
