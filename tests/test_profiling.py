"""The measurement library behind `xconv profile` (xconv_patch.measure), called directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from model_files import TINY_SHAPE, tiny_net
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
    fidelity_summary,
    gradient_errors,
    largest_batch,
    layer_weights,
    measure_memory,
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


def test_prediction_equals_measurement(tmp_path) -> None:
    model = tiny_model(tmp_path)
    predicted = predict_memory(model, "custom", 4, SHAPE)
    measured = measure_memory(model, "custom", 4, SHAPE, device=CPU)
    assert predicted.predicted
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.activation_bytes == measured.activation_bytes


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
    }


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
    assert stages[0].startswith("building")


def test_worker_reports_out_of_memory(tmp_path) -> None:
    spec = ProfileSpec(str(tiny_net(tmp_path)), batch_size=2**40, input_shape=SHAPE)
    with pytest.raises(OutOfMemoryError, match=r"the exact run failed: out of memory at batch size 1099511627776"):
        run_worker("exact", spec)


@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")
def test_cpu_peak_agrees_with_the_profilers_memory_timeline(tmp_path) -> None:
    """MemTracker's peak against an independent count: torch.profiler's allocator events (DESIGN.md 3)."""
    model = torchvision.models.resnet18(num_classes=10)
    figures = measure_memory(model, "classification", 2, (3, 64, 64), device=CPU)
    step, batch = TrainingStep(model), Batch("classification", 2, (3, 64, 64), CPU)
    step(batch)  # warm-up: the optimizer state exists, as in measure_memory's tracked step
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as run:
        step(batch)
    timeline = tmp_path / "timeline.json"
    run.export_memory_timeline(str(timeline), device="cpu")
    _, sizes = json.loads(timeline.read_text())
    profiled_peak = max(sum(categories) for categories in sizes)
    assert figures.peak_bytes == pytest.approx(profiled_peak, rel=0.025)
    assert figures.breakdown["optimizer_state"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_worker_uses_the_installed_package_not_the_working_directory(tmp_path, monkeypatch) -> None:
    """Run from a source checkout, its xconv_patch/ folder (no recipes/) must not shadow the install."""
    shadow = tmp_path / "checkout" / "xconv_patch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the working directory shadowed xconv_patch')\n")
    spec = ProfileSpec(str(tiny_net(tmp_path)), batch_size=2, input_shape=SHAPE, probes=4)
    monkeypatch.chdir(shadow.parent)
    figures = run_worker("xconv", spec)
    assert figures["activation_bytes"] > 0 and figures["peak_bytes"] > 0


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
