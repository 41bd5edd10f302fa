"""The record of one convert() or plan(): what happened to every convolution and activation, and why."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..probes import ProbeSpec
from .budget import BudgetChoice
from .planner import ACTIONS, STORAGES
from .recipe import Recipe, Rule, Storage


@dataclass
class LayerRecord:
    """One convolution: a module (possibly called several times) or a functional call's weight.

    `action` is what convert did ('patched', 'exact', 'skipped'); `storage` how the layer's input
    is kept for backward after it ('probed': a probe projection, 'kept': the input itself,
    'none': nothing, as for a frozen weight). Byte figures are saved-for-backward bytes for the
    analysed input: `activation_bytes_before` is what the layer's input occupies with torch's
    layers, `activation_bytes_after` what remains of it after the conversion (its probe
    projection, any 1-bit mask, and the input itself if something else still keeps it). An input
    read by several convolutions counts at the first.
    """

    name: str
    type: str
    action: str
    storage: str
    reason: str
    probes: int
    probe: str
    per_sample: bool
    deflate: bool
    rule: str
    calls: int
    recompute: bool = True
    norm_storage: str = "exact"
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    activation_bytes_before: int | None = None
    activation_bytes_after: int | None = None

    @property
    def bytes_freed(self) -> int | None:
        if self.activation_bytes_before is None or self.activation_bytes_after is None:
            return None
        return self.activation_bytes_before - self.activation_bytes_after

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_freed": self.bytes_freed}


@dataclass
class ActivationRecord:
    """A ReLU-like activation producing a convolution's input, and whether it now keeps 1-bit masks."""

    name: str
    type: str
    switched_to: str | None
    reason: str
    calls: int
    storage: str = "kept"


@dataclass
class NormRecord:
    """The input one or more norms keep for backward (what recomputed tensors are replayed from), and
    how it is stored: 'kept' as it is, or compressed ('bfloat16', 'int8'); bytes for the analysed input."""

    name: str
    modules: list[str]
    storage: str
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class ConversionReport:
    """Per-layer decisions of one conversion, the path taken and the saved-activation totals.

    path is 'fx' (the traced graph found and decided; `forward_rewritten` tells whether the model
    became a GraphModule for functional calls) or 'module-swap' (fx could not trace the model).
    Totals are None when no input shape was given or the model could not be run for analysis.
    """

    layers: list[LayerRecord]
    activations: list[ActivationRecord]
    path: str
    path_reason: str
    forward_rewritten: bool
    recipe: str
    defaults: ProbeSpec
    probes: int | None
    analysis: str
    input_shape: tuple[int, ...] | None = None
    activation_bytes_before: int | None = None
    activation_bytes_after: int | None = None
    storage_bytes: dict[str, int] | None = None
    recomputes: bool = False
    warnings: list[str] = field(default_factory=list)
    norms: list[NormRecord] = field(default_factory=list)
    norm_storage: str = "exact"
    """How norm inputs that no convolution's rule decides are stored (the recipe's or convert's default)."""
    checkpointed: list[str] = field(default_factory=list)
    budget: BudgetChoice | None = None

    @property
    def bytes_freed(self) -> int | None:
        if self.activation_bytes_before is None or self.activation_bytes_after is None:
            return None
        return self.activation_bytes_before - self.activation_bytes_after

    def count(self, action: str) -> int:
        return sum(layer.action == action for layer in self.layers)

    def layer(self, name: str) -> LayerRecord:
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(name)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per convolution."""
        return [layer.to_dict() for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain data."""
        return {
            "path": self.path,
            "path_reason": self.path_reason,
            "forward_rewritten": self.forward_rewritten,
            "recipe": self.recipe,
            "defaults": asdict(self.defaults),
            "probes": self.probes,
            "analysis": self.analysis,
            "input_shape": self.input_shape,
            "activation_bytes_before": self.activation_bytes_before,
            "activation_bytes_after": self.activation_bytes_after,
            "bytes_freed": self.bytes_freed,
            "counts": {action: self.count(action) for action in ACTIONS},
            "storage": {kind: sum(layer.storage == kind for layer in self.layers) for kind in STORAGES},
            "storage_bytes": self.storage_bytes,
            "recomputes": self.recomputes,
            "layers": self.to_dicts(),
            "activations": [asdict(record) for record in self.activations],
            "norms": [asdict(record) for record in self.norms],
            "norm_storage": self.norm_storage,
            "checkpointed": self.checkpointed,
            "budget": asdict(self.budget) if self.budget is not None else None,
            "warnings": self.warnings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_recipe(self) -> Recipe:
        """A recipe pinning every decision to its layer by name (skipped layers as exact), for convert()."""
        rules = tuple(
            Rule(
                index,
                {"name": layer.name},
                {
                    "probes": layer.probes,
                    "probe": layer.probe,
                    "per_sample": layer.per_sample,
                    "deflate": layer.deflate,
                    "recompute": layer.recompute,
                    "norm_storage": layer.norm_storage,
                },
                f"{layer.action}: {layer.reason}",
            )
            for index, layer in enumerate(self.layers)
        )
        description = f"Per-layer decisions of convert() with {self.recipe}"
        storage = Storage(norm_storage=self.norm_storage)
        return Recipe(self.defaults, rules, description, source="<report>", storage=storage)

    def summary(self) -> str:
        """One line: actions, how conv inputs are stored, 1-bit activations, path and totals."""
        counts = ", ".join(f"{self.count(action)} {action}" for action in ACTIONS)
        storage = ", ".join(
            f"{count} {kind}" for kind in STORAGES if (count := sum(layer.storage == kind for layer in self.layers))
        )
        switched = sum(record.switched_to is not None for record in self.activations)
        text = f"{counts}; conv inputs {storage}; {switched} activations switched to 1-bit masks; {self.path}"
        compressed = Counter(record.storage for record in self.norms if record.storage != "kept")
        if compressed:
            text += "; norm inputs " + ", ".join(f"{count} {kind}" for kind, count in sorted(compressed.items()))
        if self.checkpointed:
            text += f"; {len(self.checkpointed)} blocks checkpointed"
        if self.bytes_freed is not None:
            text += (
                f"; saved activations {_mib(self.activation_bytes_before)} -> {_mib(self.activation_bytes_after)}"
                f" MiB for input {'x'.join(map(str, self.input_shape or ()))}"
            )
        if self.budget is not None:
            text += f"; {self.budget.summary()}"
        return text


def _mib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**20:.2f}"
