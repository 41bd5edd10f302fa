"""Rich output of the xconv commands: formatting only, every figure comes from the library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from xconv_patch import ConversionReport
from xconv_patch.measure import BREAKDOWN_KEYS, ProfileResult, notes

from .patching import PatchPlan


def stdout_console() -> Console:
    """The terminal's width on a terminal; wide enough for the layer tables in files and pipes."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


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
    """A spinner with the current stage and the elapsed time on an interactive (stderr) console."""
    if not console.is_terminal:
        yield lambda stage: None
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
    title = (
        f"{spec.model} · {result.device} · batch {spec.batch_size} · input {'x'.join(map(str, result.input_shape))}"
        f" · {spec.dtype}{' + amp' if spec.amp else ''}{'' if spec.recompute else ' · no recompute'}"
        f" · recipe {result.conversion['recipe']}"
        f"{f' · probes {spec.probes}' if spec.probes is not None else ''} · {kind}"
    )
    table = Table(title=title, title_justify="left")
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
            console.print(
                f"weight-gradient fidelity, {summary['layers']} {label} (same weights, same batch): relative error"
                f" median {_number(summary['rel_error_median'])}, max {_number(summary['rel_error_max'])};"
                f" cosine median {_number(summary['cosine_median'])}, min {_number(summary['cosine_min'])}"
            )
    if result.max_batch is not None:
        best = result.max_batch
        console.print(
            f"largest batch under {size(best.limit_bytes)} (predicted): exact {best.exact}, xconv {best.xconv}"
            f" ({_ratio(best.ratio)})"
        )
    for note in notes(result.batchnorm_layers, result.probed_layers):
        console.print(f"[yellow]note:[/] {note}")
    if per_layer:
        console.print(_layer_table(result))


def _layer_table(result: ProfileResult) -> Table:
    table = Table(title="per layer", title_justify="left")
    for column in ("layer", "type", "action", "probes", "saved before", "saved after", "grad rel. error", "cosine"):
        table.add_column(column, justify="left" if column in ("layer", "type", "action") else "right",
                         no_wrap=column == "layer")
    for layer in result.layers:
        table.add_row(
            layer["name"], layer["type"], layer["action"], str(layer["probes"]),
            size(layer["activation_bytes_before"]), size(layer["activation_bytes_after"]),
            _number(layer["grad_rel_error"]), _number(layer["grad_cosine"]),
        )
    return table


def conversion_table(report: ConversionReport) -> Table:
    """Every convolution with its action, how its input is kept, probes, shapes, bytes and reason."""
    measured = report.activation_bytes_before is not None
    table = Table(title=f"xconv: {report.summary()}", title_justify="left")
    for column in ("layer", "type", "action", "input kept as", "probes", "input"):
        table.add_column(column, justify="right" if column == "probes" else "left", no_wrap=column == "layer")
    if measured:
        table.add_column("saved before", justify="right")
        table.add_column("freed", justify="right")
    table.add_column("reason")
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
        table.add_row(*row, layer.reason)
    return table


def print_conversion(console: Console, report: ConversionReport) -> None:
    """The conversion table, the path taken, how the figures were obtained and any warnings."""
    console.print(conversion_table(report))
    for note in (f"path: {report.path} ({report.path_reason})", f"analysis: {report.analysis}", *report.warnings):
        console.print(note, markup=False, highlight=False)


def print_patch(console: Console, plan: PatchPlan, written: list[Path], recipe_path: Path) -> None:
    console.print(conversion_table(plan.report))
    report = plan.report
    totals = (
        f"saved activations {size(report.activation_bytes_before)} -> {size(report.activation_bytes_after)},"
        f" {size(report.bytes_freed)} freed"
        if report.bytes_freed is not None
        else f"no byte figures ({report.analysis})"
    )
    shape = "x".join(map(str, (plan.batch_size, *plan.sample_shape)))
    console.print(f"total for input {shape}: {totals}; path: {report.path} ({report.path_reason})")
    for path in written:
        console.print(f"wrote {path}")
    console.print("use it in a training script:")
    console.print(plan.usage(recipe_path), markup=False, highlight=False)
    for note in notes(plan.batchnorm_layers, plan.report.count("patched")):
        console.print(f"[yellow]note:[/] {note}")
