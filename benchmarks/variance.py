"""Weight-gradient error of each probe kind on real photographs, next to minibatch SGD noise.

A torchvision network (weights=None, nothing downloaded) is first trained briefly on a
self-supervised task, telling which of four rotations a random crop of scikit-learn's sample
photographs (china.jpg, flower.jpg) shows, so that its activations and gradients are a trained
network's rather than random ones. Then, in training mode, for every convolution:

- SGD noise: how far the exact gradients of `--pool` batches spread around their mean;
- estimator error: `--trials` estimates of each of `--measured` batches' gradient, per probe kind and
  budget r, computed by an XConv layer from the convolution's actual input and output gradient.

The pretrained weights are cached in benchmarks/results/ so that later runs skip the pretraining.

Relative error = sqrt(E ||estimate - exact||^2 / ||exact||^2), with the batch's exact gradient.
Noise ratio = RMS estimator deviation / RMS deviation of a batch gradient from the mean gradient:
below 1 the estimator adds less noise than sampling the batch already does.

    python -m benchmarks.variance            # resnet18, 128 x 128 crops, batch 32 (about 15 min, 1 core)
    python -m benchmarks.variance --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks._common import (
    ESTIMATORS,
    RESULTS,
    crop_corners,
    crops,
    markdown_table,
    sample_photographs,
    save_figure,
    save_results,
    set_threads,
)
from xconv_patch import XConv2d

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def rotation_batch(
    photographs: list[torch.Tensor], size: int, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of random photographs, each rotated by a random multiple of 90 degrees (the label)."""
    sources = torch.randint(len(photographs), (batch,), generator=generator).tolist()
    rotations = torch.randint(4, (batch,), generator=generator)
    images = [
        crops(photographs[source], crop_corners(photographs[source], size, 1, generator), size)[0]
        for source in sources
    ]
    images = [torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(images, rotations, strict=True)]
    return (torch.stack(images) - IMAGENET_MEAN) / IMAGENET_STD, rotations


def pretrain(model: nn.Module, photographs: list[torch.Tensor], args, generator: torch.Generator) -> float:
    """Train on the rotation task; returns the accuracy on fresh crops afterwards."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.pretrain_steps)
    model.train()
    for step in range(args.pretrain_steps):
        inputs, labels = rotation_batch(photographs, args.crop, args.pretrain_batch, generator)
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        inputs, labels = rotation_batch(photographs, args.crop, 256, generator)
        accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
    model.train()
    return accuracy


def pretrained(photographs: list[torch.Tensor], args, generator: torch.Generator) -> tuple[nn.Module, float]:
    """The network after pretraining (cached in results/) and its rotation accuracy on fresh crops."""
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=4)
    checkpoint = RESULTS / (f"pretrained_{args.arch}_{args.crop}px_{args.pretrain_batch}x{args.pretrain_steps}"
                            f"_seed{args.seed}.pt")
    if checkpoint.exists() and not args.quick:
        saved = torch.load(checkpoint)
        model.load_state_dict(saved["state"])
        generator.set_state(saved["generator"])
        return model, saved["accuracy"]
    accuracy = pretrain(model, photographs, args, generator)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "accuracy": accuracy, "generator": generator.get_state()}, checkpoint)
    return model, accuracy


@contextmanager
def recording(convs: dict[str, nn.Conv2d]):
    """Within the block, yields a dict filled with (input, output gradient) per convolution name."""
    recorded: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        recorded[name] = [args[0].detach()]
        output.register_hook(lambda grad: recorded[name].append(grad.detach()))

    handles = [conv.register_forward_hook(lambda *a, name=name: keep(name, *a)) for name, conv in convs.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def exact_gradients(model: nn.Module, convs: dict[str, nn.Conv2d], photographs, args, generator):
    """Per layer: the SGD noise statistics over the pool and, per measured batch, (input, output grad, gradient)."""
    total = {name: 0.0 for name in convs}
    squared_norms = {name: 0.0 for name in convs}
    measured: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
    for index in range(args.pool):
        inputs, labels = rotation_batch(photographs, args.crop, args.batch, generator)
        model.zero_grad(set_to_none=True)
        with recording(convs) as recorded:
            F.cross_entropy(model(inputs), labels).backward()
        for name, conv in convs.items():
            gradient = conv.weight.grad.double()
            total[name] = total[name] + gradient
            squared_norms[name] += gradient.square().sum().item()
        if index < args.measured:
            measured.append({name: (*recorded[name], convs[name].weight.grad.clone()) for name in convs})
    sgd = {}
    for name in convs:
        mean = total[name] / args.pool
        spread = (squared_norms[name] - args.pool * mean.square().sum().item()) / (args.pool - 1)
        # ||mean||^2 overestimates the true mean's squared norm by spread / pool.
        mean_norm_sq = mean.square().sum().item() - spread / args.pool
        relative = math.sqrt(spread / mean_norm_sq) if mean_norm_sq > 0 else math.inf
        sgd[name] = {"variance": spread, "relative_noise": relative}
    return sgd, measured


def estimator_errors(convs, measured, sgd, args) -> list[dict[str, object]]:
    """One row per (layer, estimator, probes) with relative error and noise ratio."""
    rows = []
    for name, conv in convs.items():
        pixels = math.prod(measured[0][name][0].shape[2:])
        for estimator_name in args.estimators:
            estimator = ESTIMATORS[estimator_name]
            for probes in args.probes:
                if probes >= pixels:
                    continue
                layer = XConv2d.from_conv(conv, probes=probes, **estimator.options())
                squared_errors, relative = [], []
                for batch in measured:
                    inputs, output_grad, exact = batch[name]
                    for _ in range(args.trials):
                        (estimate,) = torch.autograd.grad(layer(inputs), layer.weight, output_grad)
                        error = (estimate - exact).square().sum().item()
                        squared_errors.append(error)
                        relative.append(error / exact.square().sum().item())
                rows.append({
                    "layer": name,
                    "pixels": pixels,
                    "estimator": estimator_name,
                    "probes": probes,
                    "relative_error": math.sqrt(statistics.fmean(relative)),
                    "noise_ratio": math.sqrt(statistics.fmean(squared_errors) / sgd[name]["variance"]),
                })
        print(f"{name}: {pixels} pixels done", flush=True)
    return rows


def summary_tables(rows, sgd, args) -> str:
    """Medians over layers: relative error (variance vs the paper's) and noise ratio, per kind and r."""

    def median(estimator: str, probes: int, key: str) -> float | None:
        values = [row[key] for row in rows if row["estimator"] == estimator and row["probes"] == probes]
        return statistics.median(values) if values else None

    def variance_vs_paper(estimator: str, probes: int) -> float | None:
        paper = {row["layer"]: row["relative_error"] for row in rows if row["estimator"] == "paper"
                 and row["probes"] == probes}
        ratios = [(row["relative_error"] / paper[row["layer"]]) ** 2 for row in rows
                  if row["estimator"] == estimator and row["probes"] == probes and row["layer"] in paper]
        return statistics.median(ratios) if ratios else None

    headers = ["probe kind", *[f"r = {r}" for r in args.probes]]
    error_rows, ratio_rows = [], []
    for name in args.estimators:
        label = ESTIMATORS[name].label
        errors = []
        for probes in args.probes:
            error, variance = median(name, probes, "relative_error"), variance_vs_paper(name, probes)
            cell = "—" if error is None else f"{error:.2f}"
            errors.append(cell if variance is None or error is None else f"{cell} ({variance:.2f}x)")
        error_rows.append([label, *errors])
        ratios = [median(name, probes, "noise_ratio") for probes in args.probes]
        ratio_rows.append([label, *["—" if ratio is None else f"{ratio:.2f}" for ratio in ratios]])
    layers = {row["layer"] for row in rows}
    sgd_relative = statistics.median(sgd[layer]["relative_noise"] for layer in layers)
    sgd_text = f"{sgd_relative:.2f}" if math.isfinite(sgd_relative) else "beyond what the pool resolves"
    return (
        f"Relative error of one batch's weight-gradient estimate, median over the {len(layers)} convolutions "
        f"of {args.arch} whose input has more than {max(args.probes)} pixels, so that every budget applies "
        f"(in brackets: variance relative to the paper's estimator, median over layers):\n\n"
        + markdown_table(headers, error_rows)
        + f"\n\nEstimator noise / minibatch SGD noise (batch {args.batch}), median over layers; "
        f"the SGD noise itself (relative deviation of a batch gradient from the mean gradient) has "
        f"median {sgd_text} over layers:\n\n"
        + markdown_table(headers, ratio_rows)
    )


def layer_table(rows, sgd, estimator: str, probes: int) -> str:
    headers = ["layer", "input pixels", "relative error", "SGD relative noise", "noise ratio"]
    table = [
        [row["layer"], row["pixels"], f"{row['relative_error']:.2f}",
         f"{sgd[row['layer']]['relative_noise']:.2f}",
         f"{row['noise_ratio']:.2f}"]
        for row in rows if row["estimator"] == estimator and row["probes"] == probes
    ]
    return f"Per layer, {ESTIMATORS[estimator].label}, r = {probes}:\n\n" + markdown_table(headers, table)


def plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in args.estimators:
        for axis, key in zip(axes, ("relative_error", "noise_ratio"), strict=True):
            budgets, low, middle, high = [], [], [], []
            for probes in args.probes:
                values = [row[key] for row in rows if row["estimator"] == name and row["probes"] == probes]
                if values:
                    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
                    budgets.append(probes)
                    low.append(quartiles[0])
                    middle.append(statistics.median(values))
                    high.append(quartiles[2])
            (line,) = axis.plot(budgets, middle, marker="o", label=ESTIMATORS[name].label)
            axis.fill_between(budgets, low, high, color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("relative error of the weight gradient")
    axes[1].set_ylabel("estimator noise / minibatch SGD noise")
    axes[1].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("probes r")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{args.arch}, {args.crop}x{args.crop} crops of the sample photographs, batch {args.batch}: median "
                    f"over the convolutions with more than {max(args.probes)} input pixels, band = quartiles",
                    fontsize=10)
    save_figure(figure, f"variance_{args.arch}_b{args.batch}", quick=args.quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="batch of the measured gradients")
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pool", type=int, default=16, help="batches whose gradients give the SGD noise")
    parser.add_argument("--measured", type=int, default=2, help="batches whose gradient is estimated")
    parser.add_argument("--trials", type=int, default=4, help="estimates per measured batch")
    parser.add_argument("--probes", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=list(ESTIMATORS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.crop, args.batch, args.pretrain_batch, args.pretrain_steps = 64, 8, 8, 5
        args.pool, args.measured, args.trials = 3, 1, 2
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    photographs = list(sample_photographs().values())

    started = time.perf_counter()
    model, accuracy = pretrained(photographs, args, generator)
    print(f"rotation accuracy after {args.pretrain_steps} steps: {accuracy:.1%}", flush=True)
    convs = {name: module for name, module in model.named_modules() if type(module) is nn.Conv2d}
    sgd, measured = exact_gradients(model, convs, photographs, args, generator)
    rows = estimator_errors(convs, measured, sgd, args)
    every_budget = [row for row in rows if row["pixels"] > max(args.probes)]
    summary = summary_tables(every_budget, sgd, args)
    details = "\n\n".join(layer_table(rows, sgd, name, 16) for name in args.estimators if 16 in args.probes)
    header = (f"{args.arch}, {args.crop}x{args.crop} crops, batch {args.batch}, rotation task accuracy "
              f"{accuracy:.1%} after {args.pretrain_steps} steps of batch {args.pretrain_batch}; "
              f"{args.measured} batches x {args.trials} estimates, SGD noise over {args.pool} batches; "
              f"{time.perf_counter() - started:.0f} s")
    save_results(
        f"variance_{args.arch}_b{args.batch}",
        {"arguments": vars(args), "rotation_accuracy": accuracy, "sgd": sgd, "rows": rows},
        f"{header}\n\n{summary}\n\n{details}",
        quick=args.quick,
    )
    plot(every_budget, args)


if __name__ == "__main__":
    main()
