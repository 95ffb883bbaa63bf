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


@app.command("download-weights")
@handle_errors
def download_weights(
    ctx: typer.Context,
    names: Optional[List[str]] = typer.Argument(
        None, metavar="NAME|PACK",
        help="Registry files or packs to fetch (a pack fetches its generator, CLIP, identity net, ...)."),
    all_files: bool = typer.Option(False, "--all", help="Fetch every file in the registry."),
    list_only: bool = typer.Option(False, "--list",
                                   help="Print the files (name, kind, size, license, cached) and packs, then exit."),
    registry_file: Optional[Path] = typer.Option(None, "--registry", dir_okay=False,
                                                 help="Registry TOML to use instead of the packaged weights.toml."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fetch pretrained weights into the cache ($CLIP2GAN_HOME), verified by size and sha256."""
    from . import weights

    registry = weights.load_registry(registry_file)
    for note in registry.notes:
        err(f"Note: {note}")
    if list_only:
        _print_registry(registry)
        return
    if all_files and names:
        ctx.fail("give NAMEs or --all, not both")
    if not all_files and not names:
        ctx.fail("name at least one file or pack, or use --all or --list")
    entries = list(registry.files.values()) if all_files else []
    for name in names or []:
        pack = registry.packs.get(name)
        if pack is not None and pack.builtin:
            err(f"Pack '{name}' is builtin: its files ship with clip2gan, nothing to download.")
        elif pack is not None and not pack.mapper:
            err(f"Note: pack '{name}' has no trained mapper yet; make one with "
                f"`clip2gan train --pack {name} --export-pack {name}`.")
        entries += [entry for entry in registry.files_for(name) if entry not in entries]
    for entry in entries:
        path = weights.fetch(entry.name, registry=registry, progress=not quiet)
        typer.echo(f"{entry.name}: {path}")
        if entry.format in weights.CONVERTIBLE_FORMATS:
            converted = _convert_checkpoint(path)
            if converted is not None:
                typer.echo(f"{entry.name}: {converted}")


def _convert_checkpoint(path: Path) -> Optional[Path]:
    """Convert a fetched pickle / rosinality checkpoint to safetensors once (when the converter exists)."""
    import importlib

    try:
        convert = importlib.import_module(f"{__package__}.stylegan2.convert")
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.stylegan2.convert":
            return None  # the converter has not landed yet (issue 3)
        raise
    convert_checkpoint = getattr(convert, "convert_checkpoint", None)
    return convert_checkpoint(path) if convert_checkpoint is not None else None


def _print_registry(registry) -> None:
    """Rich tables of the registry's files and packs on stdout."""
    from rich.console import Console
    from rich.table import Table

    from . import weights

    files = Table(title=f"Files ({registry.source})", title_justify="left")
    for column in ("name", "kind", "size", "license", "cached"):
        files.add_column(column, no_wrap=column != "license")
    for entry in registry.files.values():
        files.add_row(entry.name, entry.format, _human_size(entry.size), entry.license,
                      "yes" if weights.is_cached(entry) else "no")
    packs = Table(title="Packs", title_justify="left")
    for column in ("name", "generator", "clip", "mapper", "identity", "cached"):
        packs.add_column(column, overflow="fold", no_wrap=column in ("name", "cached"))
    for pack in registry.packs.values():
        if pack.builtin:
            packs.add_row(pack.name, "builtin", pack.clip_model or "builtin", "builtin", "-", "yes")
            continue
        needed = registry.files_for(pack.name)
        cached = all(weights.is_cached(entry) for entry in needed)
        packs.add_row(pack.name + (" (local)" if pack.local else ""), pack.generator,
                      f"{pack.clip_model}/{pack.clip_pretrained}", pack.mapper or "not trained yet",
                      pack.identity or "-", "yes" if cached else "no")
    console = Console()
    console.print(files)
    console.print(packs)


def _human_size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} GB"

# --- generate / edit / interpolate (issue 4) ---

# --- train (issue 5) ---
@app.command("train")
@handle_errors
def train_command(
    pack: Optional[str] = typer.Option(None, "--pack", help="Pack to train a mapper for (G, D, CLIP, identity)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Generator source (registry name or file), with --clip."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP as MODEL:TAG, MODEL:FILE, a clip_config.json or its directory."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of training images, or 'synthetic' (sampled from G)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to create (must not exist or be empty)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimiser steps (a resumed run continues to N)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every random draw."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with TrainConfig keys."),
    overrides: List[str] = typer.Option([], "--set", help="Override one config key: --set lambda_div=0.2 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config as TOML and exit."),
    export_pack: Optional[str] = typer.Option(None, "--export-pack", help="Register the result as local pack NAME."),
    device: Optional[str] = typer.Option(None, "--device", help=f"Where to train: {DEVICE_CHOICES} (config default auto)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 autocast (config default fp32)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="StyleGAN2 kernels: auto | fused | reference."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train the CLIP->W+ mapper without text (frozen CLIP and StyleGAN2); resumable, torchrun-ready."""
    from .errors import UserInputError
    from .train.config import load_config, load_run_config, parse_override

    given = {"pack": pack, "generator": generator, "clip": clip, "data": data, "steps": steps, "seed": seed,
             "device": device, "precision": precision, "backend": backend}
    values = {key: value for key, value in given.items() if value is not None}
    if values.keys() & {"pack", "generator", "clip"}:  # naming models replaces the other way of naming them
        values = {"pack": "", "generator": "", "clip": "", **values}
    values.update(parse_override(text) for text in overrides)
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise UserInputError("--out and --resume name different directories", hint="give only --resume RUN_DIR")
    base = load_run_config(resume) if resume is not None else None
    config = load_config(config_file, values, base=base)
    if dry_run:
        typer.echo(config.to_toml(), nl=False)
        return
    run_dir = resume if resume is not None else out
    if run_dir is None:
        raise UserInputError("no run directory", hint="give --out RUN_DIR (or --resume RUN_DIR)")
    from .train.trainer import run_training

    result = run_training(config, run_dir, resume=resume is not None, export_pack=export_pack, progress=progress,
                          log=err)
    losses = ", ".join(f"{name} {value:.4g}" for name, value in result.final_losses.items())
    err(f"Trained {result.steps} steps ({result.steps_per_second:.2f} steps/s). {losses}")
    typer.echo(str(result.mapper_path))


# --- eval-fid (issue 6) ---


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
