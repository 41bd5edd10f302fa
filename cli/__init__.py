"""The xconv command line: a thin layer over xconv_patch's library functions."""

from .app import app, main

__all__ = ["app", "main"]
