"""`xconv patch`: plan a user's model, then write a recipe TOML and optionally the patched model.

Library functions the command calls (tests call them directly); nothing here prints.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xconv_patch import ConversionReport, checkpoint_blocks, convert
from xconv_patch.conversion import Recipe
from xconv_patch.measure.building import analysis_inputs, batchnorm_count, build, conversion_summary, notes, plan_for
from xconv_patch.measure.spec import ProfileSpec
from xconv_patch.models import LoadedModel


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not allowed."""


@dataclass
class PatchPlan:
    """The conversion plan of one model for one input, and what `xconv patch` writes from it."""

    loaded: LoadedModel
    model_kwargs: dict[str, Any]
    report: ConversionReport
    analysis: dict[str, Any]
    batch_size: int
    sample_shape: tuple[int, ...]
    probes: int | None
    recipe: str | None
    batchnorm_layers: int

    def recipe_toml(self) -> str:
        """A recipe pinning every layer's decision by name: editable, and loadable by convert()."""
        return self.report.to_recipe().to_toml()

    def usage(self, recipe_path: Path | str) -> str:
        """The lines a training script needs to apply the written recipe."""
        analysis = ", ".join(f"{key}={_python(value)}" for key, value in self.analysis.items())
        return (
            "from xconv_patch import convert\n"
            f"model = convert(model, recipe={str(recipe_path)!r}{', ' + analysis if analysis else ''})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `xconv patch --json` (without the outputs written)."""
        summary = conversion_summary(self.report)
        return {
            "model": self.loaded.name,
            "model_kwargs": self.model_kwargs,
            "batch_size": self.batch_size,
            "input_shape": list(self.sample_shape),
            "probes": self.probes,
            "recipe": self.recipe or "default",
            "batchnorm_layers": self.batchnorm_layers,
            "notes": notes(self.batchnorm_layers, self.report.count("patched")),
            "totals": {key: summary.pop(key) for key in ("activation_bytes_before", "activation_bytes_after",
                                                         "bytes_freed", "counts")},
            "conversion": summary,
            "layers": self.report.to_dicts(),
        }


def _python(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def plan_patch(
    model: str,
    *,
    attr: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    probes: int | None = None,
    recipe: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    image_size: int | None = None,
    batch_size: int = 1,
    norm_storage: str | None = None,
    memory_budget: str | None = None,
) -> PatchPlan:
    """Load the model (see xconv_patch.models for the file rules) and plan its conversion; with a
    memory budget, for a training step at `batch_size`."""
    spec = ProfileSpec(
        model, attr=attr, model_kwargs=dict(model_kwargs or {}), batch_size=batch_size, input_shape=input_shape,
        image_size=image_size, probes=probes, recipe=recipe, device="cpu", norm_storage=norm_storage,
        memory_budget=memory_budget,
    )
    spec.validate()
    loaded, shape = build(spec)
    report = plan_for(loaded.model, spec, loaded.family, shape)
    analysis = analysis_inputs(loaded.family, batch_size, shape)
    analysis = {"input_shape": analysis["input_shape"]} if "input_shape" in analysis else {}
    return PatchPlan(
        loaded, dict(model_kwargs or {}), report, analysis, batch_size, shape, probes, recipe,
        batchnorm_count(loaded.model),
    )


def default_recipe_path(model: str) -> Path:
    """`./<name>.xconv.toml`: the file's stem, the torchvision or timm model name, or module:attr's attr."""
    if Path(model).exists():
        return Path(f"{Path(model).stem}.xconv.toml")
    head, _, attr = model.partition(":")
    if head.endswith(".py") or "/" in head:
        name = Path(head).stem
    else:
        name = attr or head
    return Path(f"{name}.xconv.toml")


def write_patch(
    plan: PatchPlan, recipe_path: Path, model_path: Path | None = None, force: bool = False
) -> dict[Path, bool]:
    """Write the recipe TOML and, if model_path is given, the patched model (torch.save of the module).

    The saved model is the loaded model converted with the written recipe; load it with
    torch.load(path, weights_only=False) where xconv_patch and the model's own module import.
    An existing output identical to what would be written is left as it is (a rerun is not a
    conflict); a different one is an OutputExistsError unless force, and then nothing is written.
    Returns each output path with whether it was written (False: identical, left untouched).
    """
    text = plan.recipe_toml()
    outputs = {recipe_path: text.encode("utf-8")}
    if model_path is not None:
        recipe = Recipe.from_toml(text, source=str(recipe_path))
        buffer = io.BytesIO()
        patched = convert(plan.loaded.model, recipe=recipe, inplace=True, **plan.analysis)
        checkpoint_blocks(patched, plan.report.checkpointed)  # a budget's choice no recipe holds
        torch.save(patched, buffer)
        outputs[model_path] = buffer.getvalue()
    # torch.save is deterministic for the same module (its archive's serialization id hashes the
    # records), so a rerun in a fresh process produces the same bytes.
    unchanged = {path for path, content in outputs.items() if path.is_file() and path.read_bytes() == content}
    for path in outputs:
        if path.exists() and path not in unchanged and not force:
            raise OutputExistsError(f"{path}: exists with different contents; pass --force to overwrite it")
    for path, content in outputs.items():
        if path not in unchanged:
            path.write_bytes(content)
    return {path: path not in unchanged for path in outputs}

