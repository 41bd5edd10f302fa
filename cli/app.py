"""Typer application for the xconv command: parses options, calls the library, prints."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

import xconv_patch
from xconv_patch.conversion import RecipeError
from xconv_patch.measure import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    ProfileError,
    ProfileSpec,
    SpecError,
    parse_size,
)
from xconv_patch.measure import profile as run_profile
from xconv_patch.models import ModelLoadError, ModelNotFoundError, parse_input_shape, parse_model_kwargs

from . import render
from .patching import OutputExistsError, default_recipe_path, plan_patch, write_patch
from .plot import check_plot_target, save_plot

if TYPE_CHECKING:
    import click  # typer's own (vendored) click at run time; only the types are named here


def _plain_help(params: list[click.Parameter]) -> list[click.Parameter]:
    """Flags show as `--json`, not `--json <bool>`."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """Help as users type it: plain flags, and `MODEL` rather than `{model}` in the usage line."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_help(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_help(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="xconv",
    help="Patch PyTorch CNNs with low-memory XConv layers and measure what they save.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USAGE_ERRORS = (ModelNotFoundError, SpecError, RecipeError, OutputExistsError, ValueError)
RUN_ERRORS = (ModelLoadError, ProfileError)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xconv-patch {xconv_patch.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Patch PyTorch CNNs with low-memory XConv layers and measure what they save."""


@contextmanager
def _reported_errors(debug: bool, json_output: bool) -> Iterator[None]:
    """One line on stderr and exit status 2 (usage) or 1 (run); the traceback only with --debug.

    With --json, whatever the user's model code prints goes to stderr: stdout holds only the JSON.
    """
    try:
        with redirect_stdout(sys.stderr) if json_output else nullcontext():
            yield
    except Exception as error:
        if debug:
            traceback.print_exc()
            if getattr(error, "worker_traceback", None):
                typer.echo(error.worker_traceback, err=True)
        message = str(error) if isinstance(error, (*USAGE_ERRORS, *RUN_ERRORS)) else f"{type(error).__name__}: {error}"
        typer.echo(f"xconv: error: {message.splitlines()[0] if message else type(error).__name__}", err=True)
        raise typer.Exit(2 if isinstance(error, USAGE_ERRORS) else 1) from None


def _shape(text: str | None) -> tuple[int, ...] | None:
    return parse_input_shape(text) if text is not None else None


MODEL_HELP = "A torchvision model name, timm:NAME, a Python file (file.py or file.py:attr), or module:attr."
ATTR_HELP = "The model file's nn.Module or zero-argument callable to use."
MODEL_KWARGS_HELP = """Keywords for the model's class or factory, a JSON object: '{"in_channels": 1}'."""
SHAPE_HELP = (
    "One sample's shape without the batch, e.g. 3x224x224 or 1x96x96x96 (default: the model family's;"
    " Cx224x224 for a 2-D first conv; needed for a 3-D one)."
)
IMAGE_HELP = "Set the input's height and width (the default shape otherwise)."
PROBES_HELP = "Probe budget for patched convs (0 = exact); replaces the recipe's default, not its rules."
RECIPE_HELP = "A shipped recipe's name (default, resnet, vgg, densenet, mobilenet, unet) or a TOML file."
RECOMPUTE_HELP = "Recompute in backward what a norm's kept input gives cheaply (exact); off: probes and masks only."
NORM_STORAGE_HELP = (
    "How the norm inputs recomputation starts from are kept: exact, bfloat16 or int8 (stochastic rounding;"
    " gradients unbiased, no longer exact)."
)
MEMORY_BUDGET_HELP = (
    "Choose the settings (exact, recompute, probes, checkpointing, compressed norm inputs) whose training step"
    " is predicted to fit this much memory, e.g. 6GiB."
)
MEMORY_BUDGET_OPTION = typer.Option("--memory-budget", metavar="SIZE", help=MEMORY_BUDGET_HELP)
DEBUG_HELP = "Show Python tracebacks on errors."
THREADS_HELP = "torch intra-op threads of the measuring processes (default: torch's); 1 on a shared machine."
DTYPE_HELP = "Parameter and input dtype: float32, float64, bfloat16 or float16."
PREDICT_HELP = "Predict the memory figures under FakeTensorMode (nothing allocated, no timing)."
MAX_MEMORY_HELP = "Also predict the largest batch that fits in this much memory, e.g. 8GiB."
JSON_HELP = "Print one JSON document and nothing else on stdout."
OUTPUT_RECIPE_HELP = "Where to write the recipe TOML (default: ./<name>.xconv.toml: the file's stem or model's name)."
PER_LAYER_HELP = "Add a per-layer table (with each decision's reason) and suggest a shipped recipe that keeps less."
PLOT_HELP = "Also draw the peak breakdown and the largest layers' saved bytes into this image (needs matplotlib)."
SAVE_MODEL_HELP = "Also torch.save the patched model here (torch.load it with weights_only=False)."


@app.command(cls=_Command)
def profile(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)],
    attr: Annotated[str | None, typer.Option("--attr", help=ATTR_HELP)] = None,
    model_kwargs: Annotated[str | None, typer.Option("--model-kwargs", metavar="JSON", help=MODEL_KWARGS_HELP)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = DEFAULT_BATCH_SIZE,
    image_size: Annotated[int | None, typer.Option("--image-size", help=IMAGE_HELP)] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help=SHAPE_HELP)] = None,
    probes: Annotated[int | None, typer.Option("--probes", help=PROBES_HELP)] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help=RECIPE_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "float32",
    amp: Annotated[bool, typer.Option("--amp", help="Run forward and loss under bfloat16 autocast.")] = False,
    recompute: Annotated[bool, typer.Option("--recompute/--no-recompute", help=RECOMPUTE_HELP)] = True,
    norm_storage: Annotated[str | None, typer.Option("--norm-storage", help=NORM_STORAGE_HELP)] = None,
    memory_budget: Annotated[str | None, MEMORY_BUDGET_OPTION] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per model, after a warm-up step.")] = DEFAULT_STEPS,
    threads: Annotated[int | None, typer.Option("--threads", help=THREADS_HELP)] = None,
    predict: Annotated[bool, typer.Option("--predict", help=PREDICT_HELP)] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help=MAX_MEMORY_HELP)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    per_layer: Annotated[bool, typer.Option("--per-layer", help=PER_LAYER_HELP)] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help=PLOT_HELP)] = None,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Measure a real training step of MODEL before and after patching.

    Peak memory, saved activations, step time and gradient fidelity; each memory figure from a fresh process.
    """
    with _reported_errors(debug, json_output):
        spec = ProfileSpec(
            model, attr=attr, model_kwargs=_kwargs(model_kwargs), batch_size=batch_size,
            input_shape=_shape(input_shape), image_size=image_size, probes=probes, recipe=recipe, device=device,
            dtype=dtype, amp=amp, recompute=recompute, norm_storage=norm_storage, memory_budget=memory_budget,
            steps=steps, threads=threads,
        )
        limit = parse_size(max_memory) if max_memory is not None else None
        if plot is not None:
            check_plot_target(plot)  # before minutes of measuring
        with render.progress(Console(stderr=True)) as progress:
            result = run_profile(spec, predict=predict, max_memory=limit, compare_recipes=per_layer,
                                 progress=progress)
        if plot is not None:
            save_plot(result, plot)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render.print_profile(render.stdout_console(), result, per_layer)


@app.command(cls=_Command)
def patch(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP, show_default=False)],
    attr: Annotated[str | None, typer.Option("--attr", help=ATTR_HELP)] = None,
    model_kwargs: Annotated[str | None, typer.Option("--model-kwargs", metavar="JSON", help=MODEL_KWARGS_HELP)] = None,
    probes: Annotated[int | None, typer.Option("--probes", help=PROBES_HELP)] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help=RECIPE_HELP)] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help=SHAPE_HELP)] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=IMAGE_HELP)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the byte figures.")] = 1,
    norm_storage: Annotated[str | None, typer.Option("--norm-storage", help=NORM_STORAGE_HELP)] = None,
    memory_budget: Annotated[str | None, MEMORY_BUDGET_OPTION] = None,
    output_recipe: Annotated[Path | None, typer.Option("--output-recipe", help=OUTPUT_RECIPE_HELP)] = None,
    save_model: Annotated[Path | None, typer.Option("--save-model", help=SAVE_MODEL_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Plan the patch of MODEL, print it, and write a recipe TOML for convert().

    With --save-model, also the patched model. A model file is only read; an existing output
    identical to what would be written is left as it is.

    From a model file the model is --attr NAME (an nn.Module or a callable), else a module-level
    `model`, else a build_model/create_model/get_model factory, else the file's only nn.Module
    class that constructs without arguments (or with --model-kwargs)."""
    with _reported_errors(debug, json_output):
        recipe_path = output_recipe or default_recipe_path(model)
        with render.progress(Console(stderr=True)) as progress:
            progress("building the model and planning the patch")
            plan = plan_patch(
                model, attr=attr, model_kwargs=_kwargs(model_kwargs), probes=probes, recipe=recipe,
                input_shape=_shape(input_shape), image_size=image_size, batch_size=batch_size,
                norm_storage=norm_storage, memory_budget=memory_budget,
            )
            progress("writing the recipe" + (" and the patched model" if save_model else ""))
            written = write_patch(plan, recipe_path, save_model, force)
    if json_output:
        outputs = {"recipe": str(recipe_path), "model": _optional(save_model)}
        unchanged = [str(path) for path, wrote in written.items() if not wrote]
        typer.echo(json.dumps({**plan.to_dict(), "outputs": {**outputs, "unchanged": unchanged}}, indent=2))
    else:
        render.print_patch(render.stdout_console(), plan, written, recipe_path)


def _kwargs(text: str | None) -> dict[str, Any] | None:
    return parse_model_kwargs(text) if text is not None else None


def _optional(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def main() -> None:
    app()
