"""Rich output of the xconv commands: formatting only, every figure comes from the library."""

from __future__ import annotations

import math
import os
import shlex
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from xconv_patch import ConversionReport
from xconv_patch.measure import BREAKDOWN_KEYS, DEFAULT_BATCH_SIZE, ProfileResult, notes

from .patching import PatchPlan

PIPE_WIDTH = 100


def stdout_console() -> Console:
    """The terminal's width on a terminal, else COLUMNS when set (Rich reads it), else PIPE_WIDTH."""
    console = Console()
    columns_set = os.environ.get("COLUMNS", "").strip().isdigit()
    return console if console.is_terminal or columns_set else Console(width=PIPE_WIDTH)


def print_heading(console: Console, parts: list[str], separator: str = " · ") -> None:
    """The parts joined by the separator, each line as wide as the console, broken only between parts."""
    lines = [""]
    for part in parts:
        joined = f"{lines[-1]}{separator}{part}" if lines[-1] else part
        if lines[-1] and len(joined) > console.width:
            lines.append(part)
        else:
            lines[-1] = joined
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def size(count: int | None) -> str:
    if count is None:
        return "-"
    if abs(count) >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    if abs(count) >= 2**20:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 2**10:.1f} KiB"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@contextmanager
def progress(console: Console) -> Iterator[Callable[[str], None]]:
    """Each stage as it starts: a live spinner with the stage and the elapsed time on a terminal;
    elsewhere (a pipe, a log file) one plain line per stage, `xconv: [ 12.3 s] stage`, so that a
    long run is never silent. The console is stderr's: stdout stays for the result (and --json)."""
    if not console.is_terminal:
        started = time.perf_counter()

        def line(stage: str) -> None:
            console.print(f"xconv: [{time.perf_counter() - started:6.1f} s] {stage}", markup=False, highlight=False,
                          soft_wrap=True)

        yield line
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("starting")
        yield lambda stage: bar.update(task, description=stage)


def print_profile(console: Console, result: ProfileResult, per_layer: bool) -> None:
    spec = result.spec
    measured = f"median of {spec.steps} steps, {result.threads} threads"
    kind = "predicted (FakeTensorMode)" if result.predicted else measured
    print_heading(console, [
        spec.model, result.device, f"batch {spec.batch_size}", f"input {'x'.join(map(str, result.input_shape))}",
        f"{spec.dtype}{' + amp' if spec.amp else ''}", *([] if spec.recompute else ["no recompute"]),
        *([f"norm inputs {spec.norm_storage}"] if spec.norm_storage else []),
        *([f"memory budget {spec.memory_budget}"] if spec.memory_budget else []),
        f"recipe {result.conversion['recipe']}", *([f"probes {spec.probes}"] if spec.probes is not None else []),
        kind,
    ])
    table = Table()
    table.add_column("")
    for column in ("exact", "xconv", "exact / xconv"):
        table.add_column(column, justify="right")
    ratios = result.ratios
    table.add_row("peak step memory", size(result.exact.peak_bytes), size(result.xconv.peak_bytes),
                  _ratio(ratios["peak_bytes"]), style="bold")
    for key in BREAKDOWN_KEYS:
        exact, xconv = result.exact.breakdown[key], result.xconv.breakdown[key]
        table.add_row(f"  {key.replace('_', ' ')}", size(exact), size(xconv), _ratio(exact / xconv if xconv else None))
    table.add_row("saved activations", size(result.exact.activation_bytes), size(result.xconv.activation_bytes),
                  _ratio(ratios["activation_bytes"]), style="bold")
    table.add_row("  left allocated by forward", size(result.exact.retained_bytes), size(result.xconv.retained_bytes),
                  _ratio(ratios["retained_bytes"]))
    if not result.predicted:
        table.add_row("step time", f"{result.exact.step_seconds:.3f} s", f"{result.xconv.step_seconds:.3f} s",
                      _ratio(ratios["step_seconds"]), style="bold")
    console.print(table)
    console.print(_breakdown_caption(result), markup=False, highlight=False)
    conversion = result.conversion
    counts = conversion["counts"]
    planned = (
        f"plan: saved activations {size(conversion['activation_bytes_before'])}"
        f" -> {size(conversion['activation_bytes_after'])}"
        if conversion["activation_bytes_before"] is not None
        else f"plan: {conversion['analysis']}"
    )
    storage = ", ".join(f"{count} {kind}" for kind, count in conversion["storage"].items() if count)
    console.print(
        f"convert: {counts['patched']} convs patched, {counts['exact']} exact, {counts['skipped']} skipped"
        f" ({conversion['path']}); conv inputs {storage}; {planned}"
    )
    fidelity = result.fidelity
    for group, label in (("all", "all convs"), ("probed", "probed convs")):
        summary = fidelity[group]
        if summary["layers"]:
            noise = (
                f"; minibatch SGD noise of the same convs median {_number(summary['sgd_noise_median'])}"
                if summary["sgd_noise_median"] is not None
                else ""
            )
            console.print(
                f"weight-gradient fidelity, {summary['layers']} {label} (same weights, same batch): relative error"
                f" median {_number(summary['rel_error_median'])}, max {_number(summary['rel_error_max'])};"
                f" cosine median {_number(summary['cosine_median'])}, min {_number(summary['cosine_min'])}{noise}"
            )
    meaning = fidelity_meaning(fidelity, spec.batch_size, spec.norm_storage)
    if meaning:
        console.print(meaning, markup=False, highlight=False)
    if result.max_batch is not None:
        best = result.max_batch
        console.print(
            f"largest batch under {size(best.limit_bytes)} (predicted): exact {best.exact}, xconv {best.xconv}"
            f" ({_ratio(best.ratio)})"
        )
    for note in notes(result.batchnorm_layers, result.probed_layers):
        console.print(f"[yellow]note:[/] {note}")
    if per_layer:
        _print_layer_table(console, result)
    suggestion = recipe_suggestion(result)
    if suggestion:
        console.print(suggestion, markup=False, highlight=False, soft_wrap=True)  # a command to copy: unwrapped


def _breakdown_caption(result: ProfileResult) -> str:
    """What the breakdown rows are: the tensors live at the peak, which is why gradients can be below parameters."""
    caption = "breakdown: the tensors live at the moment of the peak"
    if any(v.breakdown["gradients"] < v.breakdown["parameters"] for v in (result.exact, result.xconv)):
        caption += " (it falls inside backward, before every gradient exists: hence gradients below parameters)"
    return caption


def fidelity_meaning(
    fidelity: dict[str, dict[str, float | int | None]], batch_size: int, norm_storage: str | None = None
) -> str | None:
    """One line on what the probe error means for training, from its ratio to the minibatch SGD noise.

    Probe and batch sampling are independent, so the variances add: the probed weights' gradient noise
    is sqrt(1 + ratio^2) times exact training's, which is the noise exact training has with a batch
    1 + ratio^2 times smaller (minibatch noise variance falls as 1 / batch)."""
    probed = fidelity["probed"]["layers"]
    summary = fidelity["probed"] if probed else fidelity["all"]
    ratio, worst = summary["noise_ratio_median"], summary["noise_ratio_max"]
    if ratio is None or not math.isfinite(ratio):
        return None
    if not probed:
        if norm_storage in ("bfloat16", "int8"):
            return (f"meaning for training: no conv is probed; norm inputs kept as {norm_storage} (stochastic"
                    f" rounding, unbiased) move the weight gradients by {ratio:.2g}x the minibatch noise")
        return (f"meaning for training: no conv is probed; the weight gradients differ from exact by rounding"
                f" ({ratio:.2g}x the minibatch noise): training runs as exact")
    verdict = (
        "below the minibatch noise, so probing adds little variance" if ratio < 1
        else "above the minibatch noise: more probes (--probes) would lower it"
    )
    return (
        f"meaning for training: probe error / minibatch noise median {ratio:.2g} (max {worst:.2g}), {verdict};"
        f" the probed weights' gradient noise is x{math.sqrt(1 + ratio**2):.2f} exact training's at batch"
        f" {batch_size}: exact training's with a {1 + ratio**2:.3g}x smaller batch"
    )


def recipe_suggestion(result: ProfileResult) -> str | None:
    """One line naming a shipped recipe that keeps clearly less (ProfileResult.suggested_recipe) and the
    command that profiles with it; None when there is none."""
    name = result.suggested_recipe
    if name is None or result.recipes is None:
        return None
    conversion, spec = result.conversion, result.spec
    before, current = conversion["activation_bytes_before"], conversion["activation_bytes_after"]
    better = result.recipes[name].activation_bytes
    options = [spec.model]
    if spec.attr is not None:
        options += ["--attr", spec.attr]
    if spec.batch_size != DEFAULT_BATCH_SIZE:
        options += ["--batch-size", str(spec.batch_size)]
    if spec.input_shape is not None:
        options += ["--input-shape", "x".join(map(str, spec.input_shape))]
    if spec.image_size is not None:
        options += ["--image-size", str(spec.image_size)]
    if spec.probes is not None:
        options += ["--probes", str(spec.probes)]
    if not spec.recompute:
        options.append("--no-recompute")
    if spec.norm_storage is not None:
        options += ["--norm-storage", spec.norm_storage]
    command = shlex.join(["xconv", "profile", *options, "--recipe", name])
    return (
        f"suggestion: recipe {name!r} keeps {size(better)} of saved activations ({before / better:.2f}x less than"
        f" exact), {conversion['recipe'].removesuffix('.toml')!r} {size(current)} ({before / current:.2f}x),"
        f" from the plans: {command}"
    )


def _layer_table(result: ProfileResult, reasons: bool = True) -> Table:
    table = Table(title="per layer", title_justify="left")
    for column in ("layer", "input kept as", "probes", "saved before", "saved after", "grad error", "cosine",
                   "SGD noise"):
        table.add_column(column, justify="left" if column in ("layer", "input kept as") else "right", no_wrap=True)
    if reasons:
        table.add_column("reason", min_width=REASON_WIDTH)
    for layer in result.layers:
        table.add_row(
            layer["name"], layer["storage"], str(layer["probes"]),
            size(layer["activation_bytes_before"]), size(layer["activation_bytes_after"]),
            _number(layer["grad_rel_error"]), _number(layer["grad_cosine"]), _number(layer.get("grad_sgd_noise")),
            *([Text(layer["reason"])] if reasons else []),
        )
    return table


def _print_layer_table(console: Console, result: ProfileResult) -> None:
    """The per-layer table with a reason column where the console has room for one, else the reasons below it."""
    reasons = [(layer["name"], layer["reason"]) for layer in result.layers]
    print_with_reasons(console, partial(_layer_table, result), reasons)


REASON_WIDTH = 40  # narrower than this, the reasons go below the table, one per line


def conversion_table(report: ConversionReport, reasons: bool = True) -> Table:
    """Every convolution with its action, how its input is kept, probes, shapes, bytes and reason."""
    measured = report.activation_bytes_before is not None
    table = Table()
    for column in ("layer", "type", "action", "input kept as", "probes", "input"):
        table.add_column(column, justify="right" if column == "probes" else "left", no_wrap=column != "input kept as")
    if measured:
        table.add_column("saved before", justify="right", no_wrap=True)
        table.add_column("freed", justify="right", no_wrap=True)
    if reasons:
        table.add_column("reason", min_width=REASON_WIDTH)
    styles = {"patched": "green", "exact": "yellow", "skipped": "red"}
    for layer in report.layers:
        row = [
            layer.name,
            layer.type,
            Text(layer.action, style=styles[layer.action]),
            layer.storage,
            str(layer.probes) if layer.probes else "-",
            "x".join(map(str, layer.input_shape)) if layer.input_shape else "-",
        ]
        if measured:
            row += [size(layer.activation_bytes_before), size(layer.bytes_freed)]
        table.add_row(*row, *([layer.reason] if reasons else []))
    return table


def print_conversion_table(console: Console, report: ConversionReport) -> None:
    """The table with a reason column where the console has room for one, else the reasons below it."""
    reasons = [(layer.name, layer.reason) for layer in report.layers]
    print_with_reasons(console, partial(conversion_table, report), reasons)


def print_with_reasons(console: Console, table: Callable[..., Table], reasons: list[tuple[str, str]]) -> None:
    """`table(reasons=...)` with its reason column where the console has room for one, else without it
    and the reasons below it."""
    compact = table(reasons=False)
    if console.width - console.measure(compact).maximum >= REASON_WIDTH + 3:
        console.print(table(reasons=True))
        return
    console.print(compact)
    print_reasons(console, reasons)


def print_reasons(console: Console, reasons: list[tuple[str, str]]) -> None:
    """`reasons:` and one (wrapped) line per layer: the reason column of a table too narrow for one."""
    console.print("reasons:")
    indent = 3 + max((len(name) for name, _ in reasons), default=0)
    for name, reason in reasons:
        lines = textwrap.wrap(reason, max(console.width - indent, REASON_WIDTH // 2)) or [""]
        console.print(f"  {name.ljust(indent - 3)} {lines[0]}", markup=False, highlight=False, soft_wrap=True)
        for line in lines[1:]:
            console.print(" " * indent + line, markup=False, highlight=False, soft_wrap=True)


def print_conversion(console: Console, report: ConversionReport) -> None:
    """The conversion table, the path taken, how the figures were obtained and any warnings."""
    print_heading(console, f"xconv: {report.summary()}".split("; "), "; ")
    print_conversion_table(console, report)
    for note in (f"path: {report.path} ({report.path_reason})", f"analysis: {report.analysis}", *report.warnings):
        console.print(note, markup=False, highlight=False)


def print_patch(console: Console, plan: PatchPlan, written: dict[Path, bool], recipe_path: Path) -> None:
    """written: each output with whether it was written (False: an identical file was left as it is)."""
    print_heading(console, f"xconv: {plan.report.summary()}".split("; "), "; ")
    print_conversion_table(console, plan.report)
    report = plan.report
    totals = (
        f"saved activations {size(report.activation_bytes_before)} -> {size(report.activation_bytes_after)},"
        f" {size(report.bytes_freed)} freed"
        if report.bytes_freed is not None
        else f"no byte figures ({report.analysis})"
    )
    shape = "x".join(map(str, (plan.batch_size, *plan.sample_shape)))
    console.print(f"total for input {shape}: {totals}; path: {report.path} ({report.path_reason})")
    for path, wrote in written.items():
        console.print(f"wrote {path}" if wrote else f"kept {path} (identical to what would be written)")
    console.print("use it in a training script:")
    console.print(plan.usage(recipe_path), markup=False, highlight=False)
    for note in notes(plan.batchnorm_layers, plan.report.count("patched")):
        console.print(f"[yellow]note:[/] {note}")
