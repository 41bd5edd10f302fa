"""Typer application for the xconv command."""

from __future__ import annotations

import typer

import xconv_patch

app = typer.Typer(
    name="xconv",
    help="Patch PyTorch CNNs with low-memory XConv layers and measure what they save.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xconv-patch {xconv_patch.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Patch PyTorch CNNs with low-memory XConv layers and measure what they save."""


def main() -> None:
    app()
