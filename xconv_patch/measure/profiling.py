"""`profile`: the exact and the patched model's training step, measured or predicted, side by side.

Measured: the exact and the patched model's memory each in a fresh Python process (so neither can
pollute the other's figures), then gradient fidelity and timing in a third (see worker). Predicted:
the same tracked step under FakeTensorMode (see prediction), allocating nothing; with a memory
limit, the largest batch that fits is searched from such predictions (see batch_search).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .batch_search import largest_batch
from .building import batchnorm_count, build, conversion_summary, notes, patch, plan_for
from .compare import GradientError, fidelity_summary
from .prediction import MemoryPredictor
from .spec import DTYPES, ProfileSpec
from .worker import run_worker

if TYPE_CHECKING:
    from .. import ConversionReport


@dataclass
class Variant:
    """The figures of one model variant (exact or patched); step_seconds is None for predictions."""

    peak_bytes: int
    activation_bytes: int
    retained_bytes: int
    step_seconds: float | None
    breakdown: dict[str, int]
    step_times: list[float] = field(default_factory=list)


@dataclass
class MaxBatch:
    """The largest batch that fits a memory limit, predicted for both variants."""

    limit_bytes: int
    exact: int
    xconv: int

    @property
    def ratio(self) -> float | None:
        return self.xconv / self.exact if self.exact else None


@dataclass
class ProfileResult:
    """Everything `xconv profile` reports."""

    spec: ProfileSpec
    device: str
    input_shape: tuple[int, ...]
    predicted: bool
    exact: Variant
    xconv: Variant
    layers: list[dict[str, Any]]
    batchnorm_layers: int
    conversion: dict[str, Any]
    max_batch: MaxBatch | None = None

    @property
    def threads(self) -> int:
        """The intra-op threads the measuring processes used."""
        return self.spec.threads or torch.get_num_threads()

    @property
    def ratios(self) -> dict[str, float | None]:
        """exact / xconv for peak memory, saved activations and step time (above 1: XConv is better)."""
        pairs = {
            "peak_bytes": (self.exact.peak_bytes, self.xconv.peak_bytes),
            "activation_bytes": (self.exact.activation_bytes, self.xconv.activation_bytes),
            "retained_bytes": (self.exact.retained_bytes, self.xconv.retained_bytes),
            "step_seconds": (self.exact.step_seconds, self.xconv.step_seconds),
        }
        return {key: a / b if a is not None and b else None for key, (a, b) in pairs.items()}

    @property
    def fidelity(self) -> dict[str, dict[str, float | int | None]]:
        """Summaries of the measured weight-gradient errors: over every conv ('all': exact and
        recomputed ones measure about 0 error and cosine 1) and over the probed ones ('probed')."""
        errors = {
            layer["name"]: GradientError(layer["grad_rel_error"], layer["grad_cosine"])
            for layer in self.layers
            if layer.get("grad_rel_error") is not None
        }
        probed = {name: error for name, error in errors.items() if self._storage(name) == "probed"}
        return {"all": fidelity_summary(errors), "probed": fidelity_summary(probed)}

    @property
    def probed_layers(self) -> int:
        return sum(layer["storage"] == "probed" for layer in self.layers)

    def _storage(self, name: str) -> str:
        return next(layer["storage"] for layer in self.layers if layer["name"] == name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `xconv profile --json`."""
        document = {
            "model": self.spec.model,
            "device": self.device,
            "batch_size": self.spec.batch_size,
            "input_shape": list(self.input_shape),
            "probes": self.spec.probes,
            "recipe": self.spec.recipe or "default",
            "dtype": self.spec.dtype,
            "amp": self.spec.amp,
            "recompute": self.spec.recompute,
            "steps": self.spec.steps,
            "threads": self.threads,
            "predicted": self.predicted,
            "exact": asdict(self.exact),
            "xconv": asdict(self.xconv),
            "ratios": self.ratios,
            "gradient_fidelity": self.fidelity,
            "batchnorm_layers": self.batchnorm_layers,
            "notes": notes(self.batchnorm_layers, self.probed_layers),
            "conversion": self.conversion,
            "layers": self.layers,
        }
        if self.max_batch is not None:
            document["max_batch"] = {**asdict(self.max_batch), "ratio": self.max_batch.ratio}
        return document


def profile(
    spec: ProfileSpec,
    *,
    predict: bool = False,
    max_memory: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Measure (or, with predict=True, predict) the exact and the patched model's training step.

    Measured: the exact and patched memory each in a fresh process, then fidelity and timing in
    a third. max_memory (bytes) adds the predicted largest batch that fits, for both models.
    """
    spec.validate()
    say = progress or (lambda stage: None)
    say("building the model and planning the patch")
    loaded, shape = build(spec)
    report = plan_for(loaded.model, spec, loaded.family, shape)
    dtype = DTYPES[spec.dtype]
    predictors: dict[str, MemoryPredictor] = {}
    if predict or max_memory is not None:
        for name in ("exact", "xconv"):
            say(f"{name}: preparing the prediction (FakeTensorMode)")
            model = patch(copy.deepcopy(loaded.model), spec, loaded.family, shape) if name == "xconv" else loaded.model
            predictors[name] = MemoryPredictor(model, loaded.family, shape, dtype=dtype, amp=spec.amp, seed=spec.seed)
    if predict:
        figures = {name: asdict(predictor(spec.batch_size)) for name, predictor in predictors.items()}
        compared: dict[str, Any] = {"times": {}, "gradients": {}}
    else:
        figures = {}
        for name in ("exact", "xconv"):
            say(f"{name}: building in a fresh process")
            figures[name] = run_worker(name, spec, lambda stage, n=name: say(f"{n}: {stage} (fresh process)"))
        say("exact vs xconv: gradient fidelity (fresh process)")
        compared = run_worker("compare", spec, lambda stage: say(f"exact vs xconv: {stage}"))
    return ProfileResult(
        spec=spec,
        device=str(spec.torch_device),
        input_shape=shape,
        predicted=predict,
        exact=_variant(figures["exact"], compared["times"].get("exact", [])),
        xconv=_variant(figures["xconv"], compared["times"].get("xconv", [])),
        layers=_layers(report, compared["gradients"]),
        batchnorm_layers=batchnorm_count(loaded.model),
        conversion=conversion_summary(report),
        max_batch=_max_batch(predictors, max_memory, say) if max_memory is not None else None,
    )


def _max_batch(predictors: Mapping[str, MemoryPredictor], limit: int, say: Callable[[str], None]) -> MaxBatch:
    sizes = {}
    for name, predictor in predictors.items():
        say(f"{name}: searching the largest batch under {limit / 2**30:.2f} GiB (FakeTensorMode)")
        sizes[name] = largest_batch(lambda size, p=predictor: p(size).peak_bytes, limit)
    return MaxBatch(limit, sizes["exact"], sizes["xconv"])


def _variant(figures: Mapping[str, Any], times: list[float]) -> Variant:
    return Variant(
        peak_bytes=figures["peak_bytes"],
        activation_bytes=figures["activation_bytes"],
        retained_bytes=figures["retained_bytes"],
        step_seconds=statistics.median(times) if times else None,
        breakdown=figures["breakdown"],
        step_times=times,
    )


def _layers(report: ConversionReport, gradients: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    layers = []
    for record in report.to_dicts():
        error = gradients.get(record["name"], {})
        layers.append({
            **record,
            "grad_rel_error": error.get("rel_error"),
            "grad_cosine": error.get("cosine"),
        })
    return layers
