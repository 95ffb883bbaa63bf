"""The `clip2gan` command line: one thin Typer function per subcommand.

Nothing here imports torch at module level, so `clip2gan --help` stays fast; each command
imports the library code it needs when it runs. Errors from the library (Clip2ganError) become
one line on stderr and exit code 1; CLIP2GAN_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .device import DEVICE_CHOICES, debug_enabled
from .errors import Clip2ganError, exit_code_for

app = typer.Typer(
    name="clip2gan",
    help="Text-guided image generation and editing with frozen CLIP + StyleGAN2 (CLIP2GAN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def err(message: str) -> None:
    """Print a human message on stderr (stdout is kept for --json output)."""
    typer.echo(message, err=True)


def handle_errors(command):
    """Turn project errors into one stderr line + exit code; Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Clip2ganError as error:
            if debug_enabled():
                raise
            err(f"Error: {error.one_line()}")
            raise typer.Exit(exit_code_for(error))
        except KeyboardInterrupt:
            err("Interrupted.")
            raise typer.Exit(130)

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clip2gan {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """clip2gan: generate and edit images from text with a frozen CLIP and StyleGAN2."""


# Shared option definitions (one place, so every command spells them the same way).
def device_option():
    return typer.Option("auto", "--device", help=f"Where models run: {DEVICE_CHOICES}.")


def precision_option():
    return typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 (fp32 default; fp16 needs a GPU).")


def backend_option():
    return typer.Option("auto", "--backend", help="StyleGAN2 kernels: auto | fused | reference.")


def json_option():
    return typer.Option(False, "--json", help="Print one JSON object per result on stdout; messages go to stderr.")


# --- download-weights (issue 2) ---

# --- generate / edit / interpolate (issue 4) ---

# --- train (issue 5) ---

# --- eval-fid (issue 6) ---


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
