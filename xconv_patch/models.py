"""Finding the model a user names: a torchvision model, a Python file, or `module:attr`.

Rules for a model file (`xconv patch model.py`, `xconv profile model.py`):

1. `--attr NAME` (or `model.py:NAME`): a module-level nn.Module, or a zero-argument callable
   (a class or a function) that returns one.
2. Otherwise a module-level `model` (an nn.Module or a zero-argument callable).
3. Otherwise the first zero-argument factory found among `build_model`, `create_model`, `get_model`.
4. Otherwise the single nn.Module subclass defined in the file whose constructor needs no arguments.

`model_kwargs` (`--model-kwargs '{"in_channels": 1}'`) are passed to whatever builds the model: the
torchvision builder, `timm.create_model`, the class or factory `module:attr` or `--attr` names, or
the one a file's rules find (rule 4 then looks for the class constructible with those keywords).

One sample's default input shape is the model family's for torchvision and timm models; for other
models it is inferred only where it is unambiguous: a 2-D first conv gives (its in_channels, 224,
224). A given shape is checked against the first conv (its rank and channels), so a wrong one is
an error naming the option rather than torch's message from deep inside the forward.

The file is executed as a module named after its stem (so what it defines pickles under that
name), with its directory on sys.path while it runs; no bytecode is written next to it. torchvision
models are built with random weights: nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

FACTORY_NAMES = ("build_model", "create_model", "get_model")

_FAMILY_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "classification": (3, 224, 224),
    "segmentation": (3, 224, 224),
    "video": (3, 16, 112, 112),
    "detection": (3, 224, 224),
    "optical_flow": (3, 128, 128),
}
# Keywords that would load pretrained weights (a download): models are built with random weights.
_WEIGHT_KEYWORDS = {"torchvision": ("weights", "weights_backbone"), "timm": ("pretrained",)}
_LAYOUTS = {1: "C x L", 2: "C x H x W", 3: "C x D x H x W"}
_DEFAULT_IMAGE_SIZE = 224

# torchvision models whose architecture fixes a larger input than their family's default.
_MODEL_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "inception_v3": (3, 299, 299),
    "quantized_inception_v3": (3, 299, 299),
    "s3d": (3, 16, 224, 224),
    "mvit_v1_b": (3, 16, 224, 224),
    "mvit_v2_s": (3, 16, 224, 224),
}


class ModelError(Exception):
    """The model could not be found or built; the message names the file, argument or attribute."""


class ModelNotFoundError(ModelError):
    """The name or path given on the command line does not lead to a model (a usage error)."""


class ModelLoadError(ModelError):
    """The user's code failed: syntax or import error, nothing usable defined, constructor raised."""


class ModelKwargsError(ModelError, ValueError):
    """--model-kwargs is not a JSON object, or names a keyword the model's builder does not take."""


@dataclass
class LoadedModel:
    """A built model and what is known about how to feed it.

    input_shape is one sample's default shape, None where no default is unambiguous (a 3-D or 1-D
    first conv, no conv at all): then the caller must give one (see `missing_shape_reason`).
    """

    model: nn.Module
    name: str
    source: str
    family: str
    input_shape: tuple[int, ...] | None


def resolve_model(spec: str, attr: str | None = None, *, model_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """Build the model `spec` names: a torchvision model, `timm:NAME`, `file.py[:attr]` or `module:attr`.

    model_kwargs go to the builder: the torchvision builder, timm.create_model, or the class or factory found.
    """
    kwargs = dict(model_kwargs or {})
    path_part, _, spec_attr = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if path_part == "timm" and spec_attr and not attr:
        return timm_model(spec_attr, model_kwargs=kwargs)
    if spec_attr and attr and spec_attr != attr:
        raise ModelNotFoundError(f"{spec}: names attribute {spec_attr!r} but --attr says {attr!r}")
    attr = attr or spec_attr or None
    if path_part.endswith(".py") or Path(path_part).exists() or "/" in path_part:
        return load_model_file(path_part, attr, model_kwargs=kwargs)
    if spec_attr:
        return load_module_attr(path_part, spec_attr, model_kwargs=kwargs)
    if attr:
        raise ModelNotFoundError(f"--attr needs a model file or module, not the torchvision name {spec!r}")
    return torchvision_model(spec, model_kwargs=kwargs)


def parse_model_kwargs(text: str) -> dict[str, Any]:
    """The JSON object of --model-kwargs, e.g. '{"spatial_dims": 3, "in_channels": 1}', as a dict."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelKwargsError(
            f"--model-kwargs {text!r}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(value, dict):
        raise ModelKwargsError(
            f"--model-kwargs {text!r}: expected a JSON object of keywords such as "
            f"'{{\"num_classes\": 10}}', got {_json_kind(value)}"
        )
    return value


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def torchvision_model(name: str, *, model_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """A torchvision model with random weights (weights=None, weights_backbone=None where accepted)."""
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelNotFoundError(f"unknown model {name!r}: not a file and not a torchvision model{hint}")
    builder = torchvision.models.get_model_builder(name)
    kwargs = _without_weights(model_kwargs, "torchvision")
    kwargs["weights"] = None
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    family = _torchvision_family(builder.__module__)
    model = _call(builder, name, kwargs)
    input_shape = _MODEL_INPUT_SHAPES.get(name, _FAMILY_INPUT_SHAPES[family])
    return LoadedModel(model, name, f"torchvision.models.{name}", family, _with_model_channels(input_shape, model))


def timm_model(name: str, *, model_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """A timm model with random weights (pretrained=False): timm is an optional extra."""
    try:
        import timm
    except ImportError:
        raise ModelNotFoundError(
            f"timm:{name} needs timm, which is not installed: pip install 'xconv-patch[timm]'"
        ) from None
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelNotFoundError(f"unknown model timm:{name}{hint}")
    kwargs = _without_weights(model_kwargs, "timm")
    model = _call(timm.create_model, f"timm:{name}", {"model_name": name, **kwargs, "pretrained": False})
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size", _FAMILY_INPUT_SHAPES["classification"])
    input_shape = _with_model_channels(tuple(input_size), model)
    return LoadedModel(model, f"timm:{name}", f"timm.create_model({name!r})", "classification", input_shape)


def _without_weights(model_kwargs: Mapping[str, Any] | None, library: str) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    for key in _WEIGHT_KEYWORDS[library]:
        if key in kwargs:
            raise ModelKwargsError(f"--model-kwargs: {key!r} is not accepted: models are built with random weights")
    return kwargs


def _with_model_channels(shape: tuple[int, ...], model: nn.Module) -> tuple[int, ...]:
    """The family's default shape with the first conv's in_channels (e.g. a timm model built with in_chans=1)."""
    found = first_conv(model)
    if found is None or len(shape) != len(found[1].kernel_size) + 1 or not found[1].in_channels:
        return shape
    return (found[1].in_channels, *shape[1:])


def _torchvision_family(module: str) -> str:
    for family in ("segmentation", "video", "detection", "optical_flow"):
        if module.startswith(f"torchvision.models.{family}"):
            return family
    return "classification"


def load_module_attr(module_name: str, attr: str, *, model_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """`module:attr` from a module importable from the working directory or the environment."""
    with _importing_from(Path.cwd()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and f"{module_name}.".startswith(f"{error.name}."):
                raise ModelNotFoundError(f"{module_name}:{attr}: no module named {module_name!r}") from error
            raise ModelLoadError(f"{module_name}: import failed: {error}") from error
        except Exception as error:
            raise ModelLoadError(f"{module_name}: import failed: {type(error).__name__}: {error}") from error
        model = _named_model(module, attr, module_name, dict(model_kwargs or {}))
    return _custom(model, f"{module_name}:{attr}", module_name)


def load_model_file(
    path: str | Path, attr: str | None = None, *, model_kwargs: Mapping[str, Any] | None = None
) -> LoadedModel:
    """Execute a Python file and build its model by the rules in this module's docstring."""
    file = Path(path)
    if not file.is_file():
        raise ModelNotFoundError(f"{path}: no such file" if not file.exists() else f"{path}: not a file")
    label = str(path)
    with _importing_from(file.resolve().parent):
        module = _execute_file(file.resolve(), label)
        kwargs = dict(model_kwargs or {})
        model = _named_model(module, attr, label, kwargs) if attr else _discover_model(module, label, kwargs)
    return _custom(model, f"{label}:{attr}" if attr else label, str(file.resolve()))


def _custom(model: nn.Module, name: str, source: str) -> LoadedModel:
    return LoadedModel(model, name, source, "custom", inferred_input_shape(model))


def first_conv(model: nn.Module) -> tuple[str, nn.modules.conv._ConvNd] | None:
    """The model's first convolution in definition order (its qualified name and the module), if any."""
    return next(
        ((name, module) for name, module in model.named_modules() if isinstance(module, nn.modules.conv._ConvNd)),
        None,
    )


def inferred_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """One sample's shape where the first conv makes it unambiguous: 2-D gives (in_channels, 224, 224)."""
    found = first_conv(model)
    if found is None or len(found[1].kernel_size) != 2 or not found[1].in_channels:
        return None
    return (found[1].in_channels, _DEFAULT_IMAGE_SIZE, _DEFAULT_IMAGE_SIZE)


def input_shape_problem(model: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why one sample of `shape` cannot feed the model's first conv (wrong rank or channels), else None."""
    found = first_conv(model)
    if found is None:
        return None
    name, conv = found
    dims = len(conv.kernel_size)
    layer = f"the model's first layer {type(conv).__name__} {name!r}"
    if len(shape) != dims + 1:
        return f"{layer} expects {dims + 1} dimensions per sample ({_LAYOUTS[dims]}), not {len(shape)}"
    if conv.in_channels and shape[0] != conv.in_channels:
        plural = "s" if conv.in_channels != 1 else ""
        return f"{layer} expects {conv.in_channels} input channel{plural}, not {shape[0]}"
    return None


def missing_shape_reason(model: nn.Module) -> str:
    """Why the model has no default input shape, and an example of the option that gives one."""
    found = first_conv(model)
    if found is None:
        return "the model has no convolution to infer one sample's input shape from"
    name, conv = found
    dims = len(conv.kernel_size)
    example = "x".join(map(str, (conv.in_channels or 1, *(96 if dims == 3 else 1024,) * dims)))
    return (
        f"the model's first layer {type(conv).__name__} {name!r} expects {dims + 1} dimensions per sample"
        f" ({_LAYOUTS[dims]}), e.g. {example}"
    )


@contextmanager
def _importing_from(directory: Path) -> Iterator[None]:
    """Sibling imports work, and no __pycache__ is written into the user's directory."""
    saved_path, saved_bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(directory))
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode


_FILE_MODULES: set[str] = set()  # module names this process gave to model files


def _execute_file(file: Path, label: str) -> ModuleType:
    """Run the file as the module named after its stem, unless that name belongs to another module."""
    free = file.stem not in sys.modules or file.stem in _FILE_MODULES
    name = file.stem if file.stem.isidentifier() and free else f"_xconv_model_{len(_FILE_MODULES)}"
    _FILE_MODULES.add(name)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ModelNotFoundError(f"{label}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        if isinstance(error, SyntaxError):
            raise ModelLoadError(f"{label}:{error.lineno}: syntax error: {error.msg}") from error
        what = "import failed" if isinstance(error, ImportError) else type(error).__name__
        raise ModelLoadError(f"{label}:{_line_in(file, error)}: {what}: {error}") from error
    return module


def _line_in(file: Path, error: BaseException) -> int | str:
    """The last line of `file` on the error's traceback (where the user's code failed)."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(file)]
    return lines[-1] if lines else "?"


def _named_model(module: ModuleType, attr: str, label: str, kwargs: Mapping[str, Any]) -> nn.Module:
    if not hasattr(module, attr):
        available = [name for name, value in vars(module).items() if _is_candidate(value)]
        close = difflib.get_close_matches(attr, available, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"{label}: no attribute {attr!r}{hint}")
    value = getattr(module, attr)
    if isinstance(value, nn.Module):
        if kwargs:
            raise ModelKwargsError(
                f"--model-kwargs: {label}: {attr} is an nn.Module instance, which takes no keywords;"
                " name a class or factory (--attr)"
            )
        return value
    if callable(value):
        return _build(value, f"{label}: {attr}", kwargs)
    raise ModelLoadError(f"{label}: {attr} is a {type(value).__name__}, not an nn.Module or a callable returning one")


def _is_candidate(value: object) -> bool:
    return isinstance(value, nn.Module) or callable(value)


def _discover_model(module: ModuleType, label: str, kwargs: Mapping[str, Any]) -> nn.Module:
    if "model" in vars(module):
        return _named_model(module, "model", label, kwargs)
    for factory in FACTORY_NAMES:
        if callable(vars(module).get(factory)):
            return _build(vars(module)[factory], f"{label}: {factory}", kwargs)
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, nn.Module)
        and value.__module__ == module.__name__
        and not _missing_arguments(value, kwargs)
    ]
    if len(classes) > 1 and kwargs:  # prefer the classes that take every keyword given
        classes = [cls for cls in classes if not _unexpected_keywords(cls, kwargs)] or classes
    if len(classes) == 1:
        return _build(classes[0], f"{label}: {classes[0].__name__}", kwargs)
    given = "with --model-kwargs" if kwargs else "without arguments"
    if classes:
        names = ", ".join(cls.__name__ for cls in classes)
        raise ModelLoadError(f"{label}: several nn.Module classes build {given} ({names}); use --attr")
    raise ModelLoadError(
        f"{label}: no model found: define `model`, a factory ({', '.join(FACTORY_NAMES)}), "
        f"or one nn.Module class that constructs {given}, or pass --attr"
    )


def _parameters(function: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None


def _missing_arguments(function: Callable, kwargs: Mapping[str, Any]) -> list[str]:
    """The required parameters that keywords `kwargs` leave unfilled (["?"] if the signature is unknown)."""
    parameters = _parameters(function)
    if parameters is None:
        return ["?"]
    return [
        parameter.name
        for parameter in parameters
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and (parameter.name not in kwargs or parameter.kind is inspect.Parameter.POSITIONAL_ONLY)
    ]


def _unexpected_keywords(function: Callable, kwargs: Mapping[str, Any]) -> list[str]:
    """The keywords the signature cannot take (none when it has **kwargs or is unknown)."""
    parameters = _parameters(function)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return []
    names = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return [key for key in kwargs if key not in names]


def _build(factory: Callable, what: str, kwargs: Mapping[str, Any]) -> nn.Module:
    missing = _missing_arguments(factory, kwargs)
    if missing:
        needed = f" ({', '.join(missing)})" if missing != ["?"] else ""
        raise ModelLoadError(
            f"{what} needs arguments{needed}; give them with --model-kwargs, or a zero-argument callable"
            " or an nn.Module instance"
        )
    return _call(factory, what, kwargs)


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def _call(factory: Callable, what: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """factory(**kwargs); a keyword it does not take is a --model-kwargs error naming the keyword."""
    unexpected = _unexpected_keywords(factory, kwargs)
    if unexpected:
        raise ModelKwargsError(_unexpected_message(factory, unexpected[0], kwargs))
    try:
        model = factory(**kwargs)
    except Exception as error:
        match = _UNEXPECTED.search(str(error)) if isinstance(error, TypeError) else None
        if match and match.group(1) in kwargs:  # a builder taking **kwargs passed it on (torchvision, timm)
            raise ModelKwargsError(
                f"--model-kwargs: {_callable_name(factory)}() got an unexpected keyword {match.group(1)!r}"
                f" ({_first_line(error)})"
            ) from error
        raise ModelLoadError(f"{what}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{what}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _unexpected_message(factory: Callable, key: str, kwargs: Mapping[str, Any]) -> str:
    parameters = [
        p.name
        for p in _parameters(factory) or []
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and p.name not in kwargs
    ]
    close = difflib.get_close_matches(key, parameters, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(parameters)}" if parameters else ""
    return f"--model-kwargs: {_callable_name(factory)}() got an unexpected keyword {key!r}{hint}"


def _callable_name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or type(factory).__name__


def _first_line(error: BaseException) -> str:
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'3x224x224' or '3,224,224' (one sample, no batch dimension) as a tuple of positive ints."""
    parts = text.replace(",", "x").replace("X", "x").split("x")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: expected sizes like 3x224x224") from None
    if any(size <= 0 for size in shape):
        raise ValueError(f"--input-shape {text!r}: sizes must be positive")
    return shape


def with_image_size(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The shape with its height and width (the last two sizes; the length of a 1-D signal) set to `size`."""
    if size <= 0:
        raise ValueError(f"--image-size must be positive, got {size}")
    spatial = min(2, len(shape) - 1)
    if spatial <= 0:
        raise ValueError(f"--image-size: input shape {shape} has no spatial dimensions")
    return (*shape[:-spatial], *(size,) * spatial)
