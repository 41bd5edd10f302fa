"""Finding the model a user names: a torchvision model, a Python file, or `module:attr`.

Rules for a model file (`xconv patch model.py`, `xconv profile model.py`):

1. `--attr NAME` (or `model.py:NAME`): a module-level nn.Module, or a zero-argument callable
   (a class or a function) that returns one.
2. Otherwise a module-level `model` (an nn.Module or a zero-argument callable).
3. Otherwise the first zero-argument factory found among `build_model`, `create_model`, `get_model`.
4. Otherwise the single nn.Module subclass defined in the file whose constructor needs no arguments.

The file is executed as a module named after its stem (so what it defines pickles under that
name), with its directory on sys.path while it runs; no bytecode is written next to it. torchvision
models are built with random weights: nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import nn

FACTORY_NAMES = ("build_model", "create_model", "get_model")

_FAMILY_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "classification": (3, 224, 224),
    "segmentation": (3, 224, 224),
    "video": (3, 16, 112, 112),
    "detection": (3, 224, 224),
    "optical_flow": (3, 128, 128),
    "custom": (3, 224, 224),
}

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


@dataclass
class LoadedModel:
    """A built model and what is known about how to feed it."""

    model: nn.Module
    name: str
    source: str
    family: str
    input_shape: tuple[int, ...]


def resolve_model(spec: str, attr: str | None = None) -> LoadedModel:
    """Build the model `spec` names: a torchvision model, `timm:NAME`, `file.py[:attr]` or `module:attr`."""
    path_part, _, spec_attr = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if path_part == "timm" and spec_attr and not attr:
        return timm_model(spec_attr)
    if spec_attr and attr and spec_attr != attr:
        raise ModelNotFoundError(f"{spec}: names attribute {spec_attr!r} but --attr says {attr!r}")
    attr = attr or spec_attr or None
    if path_part.endswith(".py") or Path(path_part).exists() or "/" in path_part:
        return load_model_file(path_part, attr)
    if spec_attr:
        return load_module_attr(path_part, spec_attr)
    if attr:
        raise ModelNotFoundError(f"--attr needs a model file or module, not the torchvision name {spec!r}")
    return torchvision_model(spec)


def torchvision_model(name: str) -> LoadedModel:
    """A torchvision model with random weights (weights=None, weights_backbone=None where accepted)."""
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelNotFoundError(f"unknown model {name!r}: not a file and not a torchvision model{hint}")
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    family = _torchvision_family(builder.__module__)
    input_shape = _MODEL_INPUT_SHAPES.get(name, _FAMILY_INPUT_SHAPES[family])
    return LoadedModel(builder(**kwargs), name, f"torchvision.models.{name}", family, input_shape)


def timm_model(name: str) -> LoadedModel:
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
    model = timm.create_model(name, pretrained=False)
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size", _FAMILY_INPUT_SHAPES["classification"])
    return LoadedModel(model, f"timm:{name}", f"timm.create_model({name!r})", "classification", tuple(input_size))


def _torchvision_family(module: str) -> str:
    for family in ("segmentation", "video", "detection", "optical_flow"):
        if module.startswith(f"torchvision.models.{family}"):
            return family
    return "classification"


def load_module_attr(module_name: str, attr: str) -> LoadedModel:
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
        model = _named_model(module, attr, module_name)
    return _custom(model, f"{module_name}:{attr}", module_name)


def load_model_file(path: str | Path, attr: str | None = None) -> LoadedModel:
    """Execute a Python file and build its model by the rules in this module's docstring."""
    file = Path(path)
    if not file.is_file():
        raise ModelNotFoundError(f"{path}: no such file" if not file.exists() else f"{path}: not a file")
    label = str(path)
    with _importing_from(file.resolve().parent):
        module = _execute_file(file.resolve(), label)
        model = _named_model(module, attr, label) if attr else _discover_model(module, label)
    return _custom(model, f"{label}:{attr}" if attr else label, str(file.resolve()))


def _custom(model: nn.Module, name: str, source: str) -> LoadedModel:
    return LoadedModel(model, name, source, "custom", _FAMILY_INPUT_SHAPES["custom"])


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


def _named_model(module: ModuleType, attr: str, label: str) -> nn.Module:
    if not hasattr(module, attr):
        available = [name for name, value in vars(module).items() if _is_candidate(value)]
        close = difflib.get_close_matches(attr, available, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"{label}: no attribute {attr!r}{hint}")
    value = getattr(module, attr)
    if isinstance(value, nn.Module):
        return value
    if callable(value):
        return _build(value, f"{label}: {attr}")
    raise ModelLoadError(f"{label}: {attr} is a {type(value).__name__}, not an nn.Module or a callable returning one")


def _is_candidate(value: object) -> bool:
    return isinstance(value, nn.Module) or callable(value)


def _discover_model(module: ModuleType, label: str) -> nn.Module:
    if "model" in vars(module):
        return _named_model(module, "model", label)
    for factory in FACTORY_NAMES:
        if callable(vars(module).get(factory)):
            return _build(vars(module)[factory], f"{label}: {factory}")
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, nn.Module)
        and value.__module__ == module.__name__
        and _takes_no_arguments(value)
    ]
    if len(classes) == 1:
        return _build(classes[0], f"{label}: {classes[0].__name__}")
    if classes:
        names = ", ".join(cls.__name__ for cls in classes)
        raise ModelLoadError(f"{label}: several nn.Module classes build without arguments ({names}); use --attr")
    raise ModelLoadError(
        f"{label}: no model found: define `model`, a factory ({', '.join(FACTORY_NAMES)}), "
        "or one nn.Module class that constructs without arguments, or pass --attr"
    )


def _takes_no_arguments(function: Callable) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    return all(
        parameter.default is not inspect.Parameter.empty
        or parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for parameter in signature.parameters.values()
    )


def _build(factory: Callable, what: str) -> nn.Module:
    if not _takes_no_arguments(factory):
        raise ModelLoadError(f"{what} needs arguments; give a zero-argument callable or an nn.Module instance")
    try:
        model = factory()
    except Exception as error:
        raise ModelLoadError(f"{what}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{what}() returned a {type(model).__name__}, not an nn.Module")
    return model


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
