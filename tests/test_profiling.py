"""The measurement library behind `xconv profile` (xconv_patch.measure), called directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torchvision
from model_files import DEPTHWISE_NET, TINY_SHAPE, tiny_net
from torch import nn

import xconv_patch
from xconv_patch import convert, plan
from xconv_patch.measure import (
    Batch,
    GradientError,
    MemoryPredictor,
    OutOfMemoryError,
    ProfileSpec,
    SpecError,
    TrainingStep,
    allocator_peak,
    fidelity_summary,
    gradient_errors,
    largest_batch,
    largest_side,
    layer_weights,
    measure_memory,
    minibatch_noise,
    parse_size,
    predict_memory,
    profile,
    run_worker,
    time_steps,
)
from xconv_patch.memory import saved_activation_bytes
from xconv_patch.models import parse_input_shape, resolve_model

CPU = torch.device("cpu")
SHAPE = parse_input_shape(TINY_SHAPE)


def tiny_model(tmp_path) -> nn.Module:
    torch.manual_seed(0)
    return resolve_model(str(tiny_net(tmp_path))).model


def test_classification_loss_is_cross_entropy_on_fixed_labels() -> None:
    batch = Batch("classification", 4, (3, 8, 8), CPU)
    logits = torch.randn(4, 10, requires_grad=True)
    loss = batch.loss(logits)
    (labels,) = batch.tensors()[1:]
    assert labels.shape == (4,) and labels.dtype == torch.int64
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, labels))
    assert batch.loss(logits) == loss


def test_loss_is_generic_over_output_structures() -> None:
    batch = Batch("segmentation", 2, (3, 8, 8), CPU)
    dense = torch.randn(2, 5, 8, 8, requires_grad=True)
    single = torch.randn(2, 1, 8, 8, requires_grad=True)
    own_loss = torch.tensor(1.5, requires_grad=True)
    loss = batch.loss({"out": dense, "mask": single, "loss": own_loss, "ignored": torch.ones(2)})
    labels, target = batch.tensors()[1:]
    expected = (
        nn.functional.cross_entropy(dense, labels) + nn.functional.mse_loss(single, target) + own_loss
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(Exception, match="nothing to train"):
        batch.loss(torch.ones(2, 3))


def test_detection_and_optical_flow_batches() -> None:
    detection = Batch("detection", 3, (3, 32, 48), CPU)
    assert len(detection.detection_targets) == 3
    for target in detection.detection_targets:
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all()
        assert target["masks"].shape == (2, 32, 48) and target["keypoints"].shape == (2, 17, 3)
    assert len(Batch("optical_flow", 2, (3, 8, 8), CPU).inputs) == 2


def test_measured_peak_breakdown_and_saved_activations(tmp_path) -> None:
    model = tiny_model(tmp_path)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    figures = measure_memory(model, "custom", 4, SHAPE, device=CPU)
    assert figures.breakdown["optimizer_state"] == parameter_bytes
    assert figures.breakdown["inputs"] >= 4 * math.prod(SHAPE) * 4
    batch = Batch("custom", 4, SHAPE, CPU)
    assert figures.activation_bytes == saved_activation_bytes(model, lambda: batch.loss(batch.forward(model)))
    assert not figures.predicted


def test_step_peak_tracker_keeps_memtrackers_peak() -> None:
    """StepPeakTracker skips MemTracker's per-module peaks, not the step's: same peak, same breakdown."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from xconv_patch.measure.step_memory import StepPeakTracker

    model = torchvision.models.resnet18(num_classes=10)
    step, batch = TrainingStep(model), Batch("classification", 2, (3, 32, 32), CPU)
    step(batch)
    peaks = []
    for tracker in (MemTracker(), StepPeakTracker()):
        tracker.track_external(model, step.optimizer, *batch.tensors())
        with tracker:
            step(batch)
        peaks.append(tracker.get_tracker_snapshot("peak")[CPU])
    assert peaks[0] == peaks[1] and peaks[0]["Total"] > 0


def test_prediction_equals_measurement(tmp_path) -> None:
    model = tiny_model(tmp_path)
    predicted = predict_memory(model, "custom", 4, SHAPE)
    measured = measure_memory(model, "custom", 4, SHAPE, device=CPU)
    assert predicted.predicted
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.activation_bytes == measured.activation_bytes


class ForwardPeak(nn.Module):
    """A segmentation net whose step peaks in the forward (a 4 MiB temporary), before the loss makes its labels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.zeros(2**20, device=x.device).sum()


def test_prediction_counts_the_labels_at_a_forward_peak() -> None:
    """Segmentation labels (int64, one per voxel) exist before a measured step, made by its warm-up."""
    predicted = predict_memory(ForwardPeak(), "segmentation", 4, (1, 16, 16, 16))
    measured = measure_memory(ForwardPeak(), "segmentation", 4, (1, 16, 16, 16), device=CPU)
    assert measured.breakdown["inputs"] >= 4 * 16**3 * 8
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.breakdown == measured.breakdown


def test_patched_model_keeps_fewer_activations(tmp_path) -> None:
    model = tiny_model(tmp_path)
    patched = convert(model, probes=4, input_shape=(4, *SHAPE))
    exact, xconv = (predict_memory(m, "custom", 4, SHAPE) for m in (model, patched))
    assert xconv.activation_bytes < exact.activation_bytes
    assert xconv.peak_bytes < exact.peak_bytes


def test_prediction_allocates_no_batch() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    huge = predict_memory(model, "custom", 2**20, (3, 8, 8))  # 768 MiB of input alone, never allocated
    assert huge.breakdown["inputs"] >= 2**20 * 3 * 8 * 8 * 4


def test_largest_batch_matches_a_linear_scan() -> None:
    def peak(size: int) -> int:
        return 1000 + 70 * size + size * size // 9

    limit = 200_000
    expected = max(size for size in range(1, 5000) if peak(size) <= limit)
    calls: list[int] = []
    assert largest_batch(lambda size: calls.append(size) or peak(size), limit) == expected
    assert len(calls) < 25
    assert largest_batch(peak, 10) == 0
    assert largest_batch(peak, peak(1)) == 1
    assert largest_batch(peak, 10**12, cap=64) == 64


def test_largest_batch_takes_few_predictions() -> None:
    """Each prediction of a large model is a FakeTensorMode step of seconds. Affine: two points give the
    line, its crossing fits and the next batch does not. Small batches peaking elsewhere cost one more;
    the quadratics fitted to resnet50's predicted peaks (MiB at batch 2 to 64, exact and patched:
    mildly convex, so the line from small batches overshoots) two and three more."""
    mib = 2**20
    for peak, expected, most in (
        (lambda size: 270 * mib + 80 * mib * size, 99, 4),
        (lambda size: 270 * mib + 80 * mib * size + (200 * mib if size < 6 else 0), 99, 5),
        (lambda size: int((258.525 + 79.810 * size + 0.0316 * size * size) * mib), 95, 5),
        (lambda size: int((275.753 + 46.258 * size + 0.0232 * size * size) * mib), 158, 6),
    ):
        calls: list[int] = []
        assert largest_batch(lambda size, p=peak, c=calls: c.append(size) or p(size), 8 * 2**30) == expected
        assert len(calls) <= most, calls


def cubic_peak(side: int) -> int:
    return 5000 + 40 * side**3 + side**4 // 50


@pytest.mark.parametrize(
    ("peak", "dims", "multiple", "limit"),
    [(cubic_peak, 3, 4, 3 * 10**7), (cubic_peak, 3, 1, 10**6), (lambda side: 100 + 9 * side * side, 2, 8, 10**6)],
)
def test_largest_side_matches_a_linear_scan(peak, dims: int, multiple: int, limit: int) -> None:
    expected = max(side for side in range(multiple, 10**4, multiple) if peak(side) <= limit)
    calls: list[int] = []
    assert largest_side(lambda side: calls.append(side) or peak(side), limit, dims=dims, multiple=multiple) == expected
    assert all(side % multiple == 0 for side in calls) and len(calls) < 20


def test_largest_side_edges() -> None:
    assert largest_side(cubic_peak, 10, dims=3, multiple=4) == 0
    assert largest_side(cubic_peak, cubic_peak(4), dims=3, multiple=4) == 4
    assert largest_side(cubic_peak, 10**15, dims=3, multiple=4, cap=64) == 64
    with pytest.raises(ValueError, match="multiple"):
        largest_side(cubic_peak, 10**6, dims=3, multiple=0)


def test_prediction_at_another_input_size() -> None:
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    predictor = MemoryPredictor(model, "segmentation", (1, 8, 8, 8))
    small, large = predictor(2), predictor(2, (1, 16, 16, 16))
    assert small.peak_bytes == predict_memory(model, "segmentation", 2, (1, 8, 8, 8)).peak_bytes
    assert large.peak_bytes == predict_memory(model, "segmentation", 2, (1, 16, 16, 16)).peak_bytes
    assert large.activation_bytes == pytest.approx(8 * small.activation_bytes, rel=1e-3)


def test_largest_batch_from_predictions(tmp_path) -> None:
    predictor = MemoryPredictor(tiny_model(tmp_path), "custom", SHAPE)
    limit = predictor(40).peak_bytes
    best = largest_batch(lambda size: predictor(size).peak_bytes, limit)
    assert best >= 40 and predictor(best + 1).peak_bytes > limit


def test_gradient_errors_and_summary() -> None:
    reference = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]), "zero": torch.zeros(2)}
    estimate = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 2.0]), "zero": torch.ones(2)}
    errors = gradient_errors(reference, estimate)
    assert errors["a"] == GradientError(0.0, 1.0)
    assert errors["b"].rel_error == pytest.approx(1.0)
    assert errors["b"].cosine == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(errors["zero"].rel_error)
    summary = fidelity_summary(errors)
    assert summary == {
        "layers": 3, "rel_error_median": 0.5, "rel_error_max": pytest.approx(1.0),
        "cosine_median": pytest.approx((1 + 1 / math.sqrt(2)) / 2), "cosine_min": pytest.approx(1 / math.sqrt(2)),
        "sgd_noise_median": None, "noise_ratio_median": None, "noise_ratio_max": None,
    }
    with_noise = fidelity_summary(errors, {"a": 0.5, "b": 2.0, "zero": math.nan})
    assert with_noise["sgd_noise_median"] == pytest.approx(1.25)
    assert with_noise["noise_ratio_median"] == pytest.approx(0.25)  # a: 0 / 0.5, b: 1 / 2
    assert with_noise["noise_ratio_max"] == pytest.approx(0.5)


def test_minibatch_noise_is_the_deviation_of_one_batch_from_the_expected_gradient() -> None:
    """Batch gradients g = G + noise of per-coordinate deviation s: ||g2 - g1|| / sqrt(2) estimates
    ||g - G||, so the figure is s * sqrt(n) / ||g1||."""
    generator = torch.Generator().manual_seed(0)
    expected, deviation, size = torch.ones(40_000), 0.5, 40_000
    first, second = (expected + deviation * torch.randn(size, generator=generator) for _ in range(2))
    noise = minibatch_noise({"w": first, "same": first, "only_first": first}, {"w": second, "same": first})
    assert noise["w"] == pytest.approx(deviation * math.sqrt(size) / first.norm().item(), rel=0.02)
    assert noise["same"] == 0 and "only_first" not in noise
    assert math.isnan(minibatch_noise({"w": torch.zeros(3)}, {"w": torch.ones(3)})["w"])


def test_layer_weights_of_module_and_functional_convs() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.kernel = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(torch.relu(self.conv(x)), self.kernel)

    model = Functional()
    names = [layer.name for layer in plan(model, probes=4).layers]
    weights = layer_weights(model, names)
    assert {name: id(weight) for name, weight in weights.items()} == {"conv": id(model.conv.weight),
                                                                       "kernel": id(model.kernel)}


def test_timed_steps_are_interleaved() -> None:
    order: list[str] = []
    times = time_steps({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 3
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}


def test_training_step_updates_with_momentum(tmp_path) -> None:
    model = tiny_model(tmp_path)
    step = TrainingStep(model)
    before = model.stem.weight.detach().clone()
    step(Batch("custom", 2, SHAPE, CPU))
    assert not torch.equal(before, model.stem.weight)
    assert all("momentum_buffer" in state for state in step.optimizer.state.values())


def test_sizes() -> None:
    assert parse_size("8GiB") == parse_size("8G") == 8 * 2**30
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size("4096") == 4096
    for text in ("-1G", "lots", "0"):
        with pytest.raises(ValueError, match=repr(text)):
            parse_size(text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ProfileSpec("m", probes=-1), "--probes"),
        (ProfileSpec("m", batch_size=0), "--batch-size"),
        (ProfileSpec("m", steps=0), "--steps"),
        (ProfileSpec("m", threads=0), "--threads"),
        (ProfileSpec("m", dtype="int8"), "--dtype"),
        (ProfileSpec("m", device="tpu"), "--device"),
        (ProfileSpec("m", input_shape=(3, 8, 8), image_size=8), "--image-size and --input-shape"),
    ],
)
def test_spec_validation_names_the_option(spec, message) -> None:
    with pytest.raises(SpecError, match=message):
        spec.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda() -> None:
    with pytest.raises(SpecError, match="--device cuda: CUDA is not available"):
        ProfileSpec("m", device="cuda").validate()


def test_predicted_profile_document(tmp_path) -> None:
    spec = ProfileSpec(str(tiny_net(tmp_path)), batch_size=4, input_shape=SHAPE, probes=4)
    stages: list[str] = []
    result = profile(spec, predict=True, max_memory=2**24, progress=stages.append)
    document = json.loads(json.dumps(result.to_dict()))
    assert document["predicted"] and document["exact"]["step_seconds"] is None
    assert document["ratios"]["activation_bytes"] > 1
    assert [layer["storage"] for layer in document["layers"]] == ["kept", "probed", "recomputed"]
    assert [layer["probes"] for layer in document["layers"]] == [0, 4, 0]
    assert document["max_batch"]["xconv"] >= document["max_batch"]["exact"] > 0
    assert document["batchnorm_layers"] == 2 and "recalibrate_bn" in document["notes"][0]
    search = [stage for stage in stages if "largest batch" in stage]
    assert stages[:6] == [
        "building the model",
        "xconv: converting",
        "exact: preparing the prediction (FakeTensorMode)",
        "xconv: preparing the prediction (FakeTensorMode)",
        "exact: predicting batch 4",
        "xconv: predicting batch 4",
    ] and stages[6:] == search
    assert search[0] == "exact: largest batch under 0.02 GiB: predicting batch 2"
    assert [stage.split(":")[0] for stage in search] == sorted(stage.split(":")[0] for stage in search)
    assert "recipe_activation_bytes" not in document




def test_a_shipped_recipe_that_keeps_clearly_less_is_suggested(tmp_path) -> None:
    """Norm-free depthwise convs: the default recipe keeps them exact, `mobilenet` probes them and
    switches their ReLUs to 1-bit masks; the comparison comes from the plans alone."""
    model = str((tmp_path / "depthwise.py").resolve())
    (tmp_path / "depthwise.py").write_text(DEPTHWISE_NET)
    spec = ProfileSpec(model, batch_size=2, input_shape=(3, 32, 32))
    stages: list[str] = []
    result = profile(spec, predict=True, compare_recipes=True, progress=stages.append)
    assert stages[-1] == "planning with each shipped recipe"
    options = result.recipes
    assert set(options) == set(xconv_patch.shipped_recipes())
    current = result.conversion["activation_bytes_after"]
    assert options["default"].activation_bytes == current
    assert options["mobilenet"].activation_bytes <= 0.9 * current
    # resnet, vgg, densenet keep as little (no depthwise rule either) but their rules select nothing here
    assert options["mobilenet"].unmatched_rules == 0 < options["resnet"].unmatched_rules
    assert options["resnet"].activation_bytes == options["mobilenet"].activation_bytes
    assert result.suggested_recipe == "mobilenet"
    document = result.to_dict()
    assert document["suggested_recipe"] == "mobilenet"
    assert document["recipes"]["mobilenet"] == {"activation_bytes": options["mobilenet"].activation_bytes,
                                                "unmatched_rules": 0}
    again = profile(replace(spec, recipe="mobilenet"), predict=True, compare_recipes=True)
    assert again.suggested_recipe is None  # nothing keeps clearly less than the best
    assert again.conversion["activation_bytes_after"] == options["mobilenet"].activation_bytes


def test_worker_reports_out_of_memory(tmp_path) -> None:
    spec = ProfileSpec(str(tiny_net(tmp_path)), batch_size=2**40, input_shape=SHAPE)
    with pytest.raises(OutOfMemoryError, match=r"the exact run failed: out of memory at batch size 1099511627776"):
        run_worker("exact", spec)


@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")
def test_cpu_peak_agrees_with_the_profilers_memory_timeline() -> None:
    """MemTracker's peak against an independent count: torch.profiler's allocator events (DESIGN.md 3).

    With torch's own conv kernels: oneDNN's scratchpads and weight reorders go through the same
    allocator without being tensors, and how large they are depends on the CPU: 58 MiB more at this
    step's peak on the AVX2 machine of 2026-12-07, within the 2.5% below on the CPU of earlier runs.
    """
    with torch.backends.mkldnn.flags(enabled=False):
        model = torchvision.models.resnet18(num_classes=10)
        figures = measure_memory(model, "classification", 2, (3, 64, 64), device=CPU)
        step, batch = TrainingStep(model), Batch("classification", 2, (3, 64, 64), CPU)
        step(batch)  # warm-up: the optimizer state exists, as in measure_memory's tracked step
        assert figures.peak_bytes == pytest.approx(allocator_peak(step, batch), rel=0.025)
    assert figures.breakdown["optimizer_state"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_worker_uses_the_installed_package_not_the_working_directory(tmp_path, monkeypatch) -> None:
    """Run from a source checkout, its xconv_patch/ folder (no recipes/) must not shadow the install."""
    shadow = tmp_path / "checkout" / "xconv_patch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the working directory shadowed xconv_patch')\n")
    spec = ProfileSpec(str(tiny_net(tmp_path)), batch_size=2, input_shape=SHAPE, probes=4)
    monkeypatch.chdir(shadow.parent)
    stages: list[str] = []
    figures = run_worker("xconv", spec, stages.append)
    assert figures["activation_bytes"] > 0 and figures["peak_bytes"] > 0
    assert stages == ["building the model", "converting", "warm-up step", "measured step"]


def test_unknown_worker_task() -> None:
    with pytest.raises(ValueError, match="unknown worker task 'nope'"):
        run_worker("nope", ProfileSpec("m"))


def test_import_leaves_the_measuring_package_unloaded() -> None:
    """`import xconv_patch` for training pays for neither MemTracker nor the measuring code."""
    script = (
        "import sys, xconv_patch\n"
        "heavy = ('xconv_patch.measure', 'torch.distributed._tools.mem_tracker')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
        "from xconv_patch import ProfileSpec, profile\n"
        "import xconv_patch.measure as measure\n"
        "assert profile is measure.profile and ProfileSpec is measure.ProfileSpec\n"
        "assert all(getattr(measure, name) is not None for name in measure.__all__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        xconv_patch.not_there  # noqa: B018


def test_saved_tensor_hooks_see_what_the_forward_leaves_allocated() -> None:
    """What the hooks count beyond what the forward allocates (the network input, which exists before
    it) is the same with and without recomputation: the converted model hides nothing from them."""
    figures = []
    for converted in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        if converted:
            model = convert(model, input_shape=(4, 3, 64, 64))
        figures.append(measure_memory(model, "classification", 4, (3, 64, 64), device=torch.device("cpu")))
    exact, patched = figures
    assert patched.retained_bytes < 0.6 * exact.retained_bytes
    assert exact.activation_bytes - exact.retained_bytes == patched.activation_bytes - patched.retained_bytes
