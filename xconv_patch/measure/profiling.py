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
from .building import RecipeOption, batchnorm_count, build, conversion_summary, notes, patch, plan_for, recipe_options
from .compare import GradientError, fidelity_summary
from .prediction import MemoryPredictor
from .spec import DTYPES, ProfileSpec
from .worker import run_worker

if TYPE_CHECKING:
    from .. import ConversionReport

Progress = Callable[[str], None]
"""A progress callback: called with each stage's description as the stage starts (in order)."""

SUGGEST_BELOW = 0.9
"""A shipped recipe is suggested when its plan keeps at most this fraction of the current plan's saved bytes."""


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
    recipes: dict[str, RecipeOption] | None = None

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
        noise = {
            layer["name"]: layer["grad_sgd_noise"] for layer in self.layers if layer.get("grad_sgd_noise") is not None
        }
        probed = {name: error for name, error in errors.items() if self._storage(name) == "probed"}
        return {"all": fidelity_summary(errors, noise), "probed": fidelity_summary(probed, noise)}

    @property
    def suggested_recipe(self) -> str | None:
        """The shipped recipe whose plan keeps the fewest saved bytes, if that is at most SUGGEST_BELOW
        of what the profiled recipe's plan keeps (from the plans alone, nothing measured). Among recipes
        within 1% of the fewest, the one with the fewest rules that select nothing in this model."""
        current = self.conversion["activation_bytes_after"]
        chosen = self.spec.recipe or "default"
        options = {
            name: option for name, option in (self.recipes or {}).items()
            if option.activation_bytes is not None and name != chosen
        }
        if current is None or not options:
            return None
        fewest = min(option.activation_bytes for option in options.values())
        close = [name for name, option in options.items() if option.activation_bytes <= 1.01 * fewest]
        best = min(close, key=lambda name: (options[name].unmatched_rules, options[name].activation_bytes, name))
        return best if options[best].activation_bytes <= SUGGEST_BELOW * current else None

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
        if self.recipes is not None:
            document["recipes"] = {name: asdict(option) for name, option in self.recipes.items()}
            document["suggested_recipe"] = self.suggested_recipe
        return document


def profile(
    spec: ProfileSpec,
    *,
    predict: bool = False,
    max_memory: int | None = None,
    compare_recipes: bool = False,
    progress: Progress | None = None,
) -> ProfileResult:
    """Measure (or, with predict=True, predict) the exact and the patched model's training step.

    Measured: the exact and patched memory each in a fresh process, then fidelity and timing in
    a third. max_memory (bytes) adds the predicted largest batch that fits, for both models.
    compare_recipes adds every shipped recipe's planned saved bytes (`recipes`, plans on meta
    tensors: cheap) and with it `suggested_recipe`. `progress` is called with each stage as it
    starts, worker processes' stages included (prefixed with the run's name); None: silent.
    """
    spec.validate()
    say = progress or (lambda stage: None)
    say("building the model")
    loaded, shape = build(spec)
    dtype = DTYPES[spec.dtype]
    predictors: dict[str, MemoryPredictor] = {}
    if predict or max_memory is not None:
        say("xconv: converting")
        patched = patch(copy.deepcopy(loaded.model), spec, loaded.family, shape)
        report = patched.xconv_report  # the plan: convert's report is plan()'s, no second analysis
        for name, model in (("exact", loaded.model), ("xconv", patched)):
            say(f"{name}: preparing the prediction (FakeTensorMode)")
            predictors[name] = MemoryPredictor(model, loaded.family, shape, dtype=dtype, amp=spec.amp, seed=spec.seed)
        del patched, model
    else:
        say("planning the patch")
        report = plan_for(loaded.model, spec, loaded.family, shape)
    predicted: dict[str, dict[int, int]] = {name: {} for name in predictors}  # peaks, shared with the search
    if predict:
        figures = {}
        for name, predictor in predictors.items():
            say(f"{name}: predicting batch {spec.batch_size}")
            figures[name] = asdict(predictor(spec.batch_size))
            predicted[name][spec.batch_size] = figures[name]["peak_bytes"]
        compared: dict[str, Any] = {"times": {}, "gradients": {}, "sgd_noise": {}}
    else:
        figures = {}
        for name in ("exact", "xconv"):
            say(f"{name}: starting a fresh process")
            figures[name] = run_worker(name, spec, lambda stage, n=name: say(f"{n}: {stage} (fresh process)"))
        say("exact vs xconv: starting a fresh process (gradient fidelity, timing)")
        compared = run_worker("compare", spec, lambda stage: say(f"exact vs xconv: {stage} (fresh process)"))
    max_batch = _max_batch(predictors, predicted, max_memory, say) if max_memory is not None else None
    recipes = None
    if compare_recipes:
        say("planning with each shipped recipe")
        recipes = recipe_options(loaded.model, spec, loaded.family, shape)
    return ProfileResult(
        spec=spec,
        device=str(spec.torch_device),
        input_shape=shape,
        predicted=predict,
        exact=_variant(figures["exact"], compared["times"].get("exact", [])),
        xconv=_variant(figures["xconv"], compared["times"].get("xconv", [])),
        layers=_layers(report, compared["gradients"], compared["sgd_noise"]),
        batchnorm_layers=batchnorm_count(loaded.model),
        conversion=conversion_summary(report),
        max_batch=max_batch,
        recipes=recipes,
    )


def _max_batch(
    predictors: Mapping[str, MemoryPredictor], predicted: Mapping[str, dict[int, int]], limit: int, say: Progress
) -> MaxBatch:
    """The largest batch under `limit` per model; `predicted` holds peaks already predicted (one
    FakeTensorMode step per batch size: each costs seconds on a large model)."""
    sizes = {}
    for name, predictor in predictors.items():
        def peak(size: int, name: str = name, predictor: MemoryPredictor = predictor) -> int:
            if size not in predicted[name]:
                say(f"{name}: largest batch under {limit / 2**30:.2f} GiB: predicting batch {size}")
                predicted[name][size] = predictor(size).peak_bytes
            return predicted[name][size]

        sizes[name] = largest_batch(peak, limit)
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


def _layers(
    report: ConversionReport, gradients: Mapping[str, Mapping[str, float]], noise: Mapping[str, float]
) -> list[dict[str, Any]]:
    layers = []
    for record in report.to_dicts():
        error = gradients.get(record["name"], {})
        layers.append({
            **record,
            "grad_rel_error": error.get("rel_error"),
            "grad_cosine": error.get("cosine"),
            "grad_sgd_noise": noise.get(record["name"]),
        })
    return layers
