"""What to profile (ProfileSpec), the options' accepted values, and memory sizes given as text."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..models import LoadedModel, input_shape_problem, missing_shape_reason, with_image_size
from ..recompute.compressed import NORM_STORAGES

DEFAULT_BATCH_SIZE = 8
DEFAULT_STEPS = 3
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")


class SpecError(ValueError):
    """An option has a value profiling cannot use; the message names the option."""


@dataclass
class ProfileSpec:
    """What to profile: the model, the batch, the patch and the run. JSON-serialisable.

    model_kwargs are the keywords the model's builder is called with (JSON values: they travel to
    the worker processes with the spec).
    """

    model: str
    attr: str | None = None
    model_kwargs: dict[str, Any] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    input_shape: tuple[int, ...] | None = None
    image_size: int | None = None
    probes: int | None = None
    recipe: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    amp: bool = False
    recompute: bool = True
    norm_storage: str | None = None
    memory_budget: str | None = None
    steps: int = DEFAULT_STEPS
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise SpecError naming the first option with an unusable value."""
        if self.batch_size < 1:
            raise SpecError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.probes is not None and self.probes < 0:
            raise SpecError(f"--probes must be 0 (exact) or more, got {self.probes}")
        if self.steps < 1:
            raise SpecError(f"--steps must be at least 1, got {self.steps}")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"--threads must be at least 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise SpecError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SpecError("--device cuda: CUDA is not available on this machine")
        if self.norm_storage is not None and self.norm_storage not in NORM_STORAGES:
            raise SpecError(f"--norm-storage must be one of {', '.join(NORM_STORAGES)}, got {self.norm_storage!r}")
        if self.memory_budget is not None:
            try:
                parse_size(self.memory_budget)
            except ValueError as error:
                raise SpecError(f"--memory-budget: {error}") from None
        if self.image_size is not None and self.input_shape is not None:
            raise SpecError("--image-size and --input-shape both set the input size: give one")
        if self.model_kwargs is not None:
            try:
                json.dumps(dict(self.model_kwargs), allow_nan=False)
            except (TypeError, ValueError) as error:
                message = f"--model-kwargs must hold JSON values (they go to the worker processes): {error}"
                raise SpecError(message) from None

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def sample_shape(self, loaded: LoadedModel) -> tuple[int, ...]:
        """The shape of one input sample: --input-shape, else the model's default with --image-size.

        SpecError naming the option when the model has no default shape, or when the shape cannot
        feed the model's first conv (its rank or channels).
        """
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            option = f"--input-shape {_text(shape)}"
        elif loaded.input_shape is None:
            given = f"--image-size {self.image_size} needs a default shape, and " if self.image_size else ""
            raise SpecError(f"{given}--input-shape is needed: {missing_shape_reason(loaded.model)}")
        elif self.image_size is not None:
            shape = with_image_size(loaded.input_shape, self.image_size)
            option = f"--image-size {self.image_size} (input {_text(shape)})"
        else:
            shape = loaded.input_shape
            option = f"--input-shape (default {_text(shape)})"
        problem = input_shape_problem(loaded.model, shape)
        if problem is not None:
            raise SpecError(f"{option}: {problem}")
        return shape

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileSpec:
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(values["input_shape"])
        return cls(**values)


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '8G' (binary), '8GB' (decimal) or a plain byte count, as bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size like 8GiB, 512MiB or 8000000000")
    number, unit, binary, byte = match.groups()
    base = 1000 if byte and unit and not binary else 1024
    size = int(float(number) * base ** "_kmgt".index(unit.lower() or "_"))
    if size < 1:
        raise ValueError(f"{text!r}: the size must be at least one byte")
    return size
