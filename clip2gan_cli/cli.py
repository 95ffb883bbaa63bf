"""The `clip2gan` command line: one thin Typer function per subcommand.

Nothing here imports torch at module level, so `clip2gan --help` stays fast; each command
imports the library code it needs when it runs. Errors from the library (Clip2ganError) become
one line on stderr and exit code 1; CLIP2GAN_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .device import DEVICE_CHOICES, PRECISION_CHOICES, debug_enabled
from .errors import Clip2ganError, exit_code_for

app = typer.Typer(
    name="clip2gan",
    help="Text-guided image generation and editing with frozen CLIP + StyleGAN2 (CLIP2GAN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# Library errors name the parameter at fault in backquotes (`frames`); here each becomes the flag that sets it.
PARAMETER_FLAGS = {
    "n": "-n", "batch_size": "--batch-size", "frames": "--frames", "prior": "--prior", "gif": "--gif",
    "layers": "--layers", "neutral": "--neutral", "contrast_sets": "--contrast", "direction": "--direction",
    "refine_steps": "--refine-steps", "align=False": "--no-align", "beta": "--beta", "edit": "--edit",
    # eval-fid (metrics.EvalConfig's fields)
    "real": "--real", "stats": "--stats", "save_stats": "--save-stats", "fake": "--fake", "prompts": "--prompts",
    "pack": "--pack", "images_per_prompt": "-n", "score_clip": "--score-clip", "features": "--features",
    "fid_mode": "--fid-mode", "inception_weights": "--inception-weights", "kid": "--kid",
    "kid_subset_size": "--kid-subset-size", "kid_subsets": "--kid-subsets",
    # models (packs.select_models) and train (TrainConfig's fields, run_training's arguments)
    "mapper": "--mapper", "generator": "--generator", "clip": "--clip", "data": "--data", "steps": "--steps",
    "resume": "--resume", "run_dir": "--out", "export_pack": "--export-pack", "overrides": "--set",
    # the run options of every model command
    "device": "--device", "precision": "--precision", "backend": "--backend",
}


def as_flags(message: str) -> str:
    """A library message as a command-line user reads it: each `parameter` it names becomes its flag."""
    return re.sub(r"`([^`\s]+)`", lambda match: PARAMETER_FLAGS.get(match[1], match[0]), message)


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
            err(f"Error: {as_flags(error.one_line())}")
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


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Library warnings (unknown words, long prompts) as one 'Warning:' line, without the source line."""
    return f"Warning: {as_flags(' '.join(str(message).split()))}\n"


# Shared option definitions (one place, so every command spells them the same way).
def device_option():
    return typer.Option("auto", "--device", help=f"Where models run: {DEVICE_CHOICES}.")


def precision_option():
    return typer.Option("auto", "--precision", metavar="|".join(PRECISION_CHOICES),
                        help="What the generator's float16-marked blocks (the checkpoint's num_fp16_res) run "
                             "in: auto = fp16 on CUDA, fp32 on CPU / MPS; fp16 | bf16 on any device; fp32: all.")


def backend_option():
    return typer.Option("auto", "--backend", help="StyleGAN2 ops: auto | eager | triton | reference (fused: old name of eager).")


def json_option():
    return typer.Option(False, "--json", help="Print one JSON object per result on stdout; messages go to stderr.")


def _check_choice(flag: str, value: str | None, choices) -> None:
    """A one-line error for a value outside `choices` (None: the library's default), before any model loads."""
    from .errors import UserInputError

    if value is not None and value not in choices:
        raise UserInputError(f"unknown {flag} '{value}'", hint=f"expected {' or '.join(choices)}")


@app.command("download-weights")
@handle_errors
def download_weights(
    ctx: typer.Context,
    names: Optional[List[str]] = typer.Argument(
        None, metavar="NAME|PACK",
        help="Registry files or packs to fetch (a pack fetches its generator, CLIP, identity net, ...)."),
    all_files: bool = typer.Option(False, "--all", help="Fetch every file in the registry."),
    list_only: bool = typer.Option(False, "--list",
                                   help="Print the files (name, size, cached, license) and packs, then exit "
                                        "(with --json: every field, licenses in full)."),
    registry_file: Optional[Path] = typer.Option(None, "--registry", dir_okay=False,
                                                 help="Registry TOML to use instead of the packaged weights.toml."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = json_option(),
) -> None:
    """Fetch pretrained weights into the cache ($CLIP2GAN_HOME), verified by size and sha256."""
    from . import weights

    registry = weights.load_registry(registry_file)
    for note in registry.notes:
        err(f"Note: {note}")
    if list_only:
        _print_registry(registry, json_out)
        return
    if all_files and names:
        ctx.fail("give NAMEs or --all, not both")
    if not all_files and not names:
        ctx.fail("name at least one file or pack, or use --all or --list")
    for entry in _requested_entries(registry, names or [], all_files):
        path = weights.fetch(entry.name, registry=registry, progress=not quiet)
        _emit_fetched(entry.name, path, json_out)
        if entry.format in weights.CONVERTIBLE_FORMATS:
            from .stylegan2.convert import convert_checkpoint

            _emit_fetched(entry.name, convert_checkpoint(path), json_out)


def _requested_entries(registry, names: list[str], all_files: bool) -> list:
    """The registry files to fetch for NAMEs (files or packs) or --all; a note for builtin and untrained packs."""
    entries = list(registry.files.values()) if all_files else []
    for name in names:
        pack = registry.packs.get(name)
        if pack is not None and pack.builtin:
            err(f"Pack '{name}' is builtin: its files ship with clip2gan, nothing to download.")
        elif pack is not None and not pack.mapper:
            err(f"Note: pack '{name}' has no trained mapper yet; make one with "
                f"`clip2gan train --pack {name} --export-pack {name}`.")
        entries += [entry for entry in registry.files_for(name) if entry not in entries]
    return entries


def _emit_fetched(name: str, path: Path, json_out: bool) -> None:
    """`NAME: PATH` of a file in the cache (a JSON object with --json)."""
    import json

    typer.echo(json.dumps({"name": name, "path": str(path)}) if json_out else f"{name}: {path}")


def _print_registry(registry, json_out: bool = False) -> None:
    """The registry's files and packs: two tables that fit 80 columns, or one JSON object per line (--json)."""
    import json

    from .registry_listing import registry_records, registry_tables

    if json_out:
        for record in registry_records(registry):
            typer.echo(json.dumps(record, ensure_ascii=False))
        return
    from rich.console import Console

    console = Console()
    for table in registry_tables(registry):
        console.print(table)


def _emit(records, json_out: bool) -> None:
    """One JSON object per written file on stdout (--json), else the paths; a summary on stderr."""
    import json

    for record in records:
        typer.echo(json.dumps(record, ensure_ascii=False) if json_out else record["path"])
    folders = sorted({str(Path(record["path"]).parent) for record in records})
    err(f"Wrote {len(records)} file(s) to {', '.join(folders)}")


def _progress(description: str, total: int):
    """A rich progress bar on stderr; returns (context manager, advance(k) callable)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=total)
    return bar, lambda count=1: bar.advance(task, count)


def _model_options():
    return {
        "pack": typer.Option(None, "--pack", help="Pack name (default: the builtin 'shapes')."),
        "mapper": typer.Option(None, "--mapper", help="Mapper file (with --generator and --clip instead of --pack)."),
        "generator": typer.Option(None, "--generator", help="Generator: registry name or file."),
        "clip": typer.Option(None, "--clip", help="CLIP: MODEL:TAG, MODEL:FILE, or a clip_config.json."),
    }


_MODEL = _model_options()


@app.command("generate")
@handle_errors
def generate_command(
    prompts: List[str] = typer.Argument(..., metavar="PROMPT...", help="Text prompts; '-' reads one per line from stdin."),
    n: int = typer.Option(8, "-n", help="Images per prompt."),
    pack: Optional[str] = _MODEL["pack"],
    mapper: Optional[Path] = _MODEL["mapper"],
    generator: Optional[str] = _MODEL["generator"],
    clip: Optional[str] = _MODEL["clip"],
    seed: int = typer.Option(0, "--seed", help="Seed of the feature noise (same seed, same files)."),
    truncation: float = typer.Option(1.0, "--truncation", help="Truncation psi toward the average latent."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per generator call."),
    out: Path = typer.Option(Path("outputs"), "--out", help="Output directory."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Also write one grid image per prompt."),
    image_format: str = typer.Option("png", "--format", help="png | jpg."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Write the W+ codes (safetensors) too."),
    prior: Optional[str] = typer.Option(
        None, "--prior", metavar="text|retrieval",
        help="text: map the prompt's CLIP feature (the paper); retrieval: map a real image's feature from the "
             "mapper's bank, drawn by CLIP similarity to the prompt (default: the mapper's, else text)."),
    json_out: bool = json_option(),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
) -> None:
    """Generate images from text prompts."""
    from . import imageio, pipeline
    from .device import resolve_device
    from .mapper import GENERATION_PRIORS
    from .packs import output_metadata, select_models

    texts = pipeline.validate_prompts(imageio.read_prompt_args(prompts))
    pipeline.check_sizes(n, batch_size)
    _check_choice("--format", image_format.lower(), imageio.IMAGE_FORMATS)
    _check_choice("--prior", prior, GENERATION_PRIORS)
    imageio.check_output_dir(out)
    # text only: generate never encodes images, and a text-only CLIP skips importing open_clip
    models = select_models(pack, mapper, generator, clip, resolve_device(device), backend, text_only=True,
                           precision=precision)
    bar, advance = _progress("Generating", len(texts) * n)
    with bar:
        result = pipeline.generate(models.generator, models.clip, models.mapper, texts, n=n, seed=seed,
                                   truncation_psi=truncation, batch_size=batch_size, prior=prior, progress=advance)
    records = imageio.write_generate_outputs(
        out, result.images, result.w_plus, texts, result.prompt_index, result.sample_index, seed,
        fmt=image_format, grid=grid, save_latents=save_latents,
        metadata=output_metadata(models, truncation=truncation, prior=result.prior))
    _emit(records, json_out)


@app.command("edit")
@handle_errors
def edit_command(
    image: Path = typer.Argument(..., metavar="IMAGE", help="Image to edit."),
    text: Optional[str] = typer.Argument(None, metavar="TEXT", help="Edit text (weight: --beta)."),
    beta: Optional[str] = typer.Option(None, "--beta", help="Strength of TEXT's edit (default: the mapper's, else 2)."),
    edits: List[str] = typer.Option([], "--edit", metavar="TEXT:BETA", help="More edits (repeatable)."),
    neutral: Optional[str] = typer.Option(
        None, "--neutral", metavar="TEXT|auto|none",
        help="Neutral text: the direction of TEXT minus that of the neutral text (what the image shows now). "
             "auto: TEXT with its contrast words swapped for those CLIP finds in the image ('blue' -> 'red'); "
             "none: no neutral (the paper). Default: the mapper's, else none."),
    contrast: List[str] = typer.Option(
        [], "--contrast", metavar="WORD,WORD,...",
        help="Interchangeable words for --neutral auto (repeatable; replaces the mapper's sets)."),
    direction: Optional[str] = typer.Option(
        None, "--direction", metavar="text|image",
        help="text: n = M(C_text(t)) (the paper); image: n = M(C_img(x) + C_text(t)) - M(C_img(x)) "
             "(default: the mapper's, else text)."),
    layers: Optional[str] = typer.Option(None, "--layers", metavar="START:STOP",
                                         help="W+ rows the edit moves, e.g. 2: (default: the mapper's, else all)."),
    align: Optional[bool] = typer.Option(None, "--align/--no-align", help="MTCNN face alignment (default: face packs)."),
    refine_steps: int = typer.Option(0, "--refine-steps", help="Optimise the inverted W+ this many steps first."),
    latent: Optional[Path] = typer.Option(None, "--latent", help="Start from this W+ file instead of inverting."),
    pack: Optional[str] = _MODEL["pack"],
    mapper: Optional[Path] = _MODEL["mapper"],
    generator: Optional[str] = _MODEL["generator"],
    clip: Optional[str] = _MODEL["clip"],
    out: Path = typer.Option(Path("outputs"), "--out", help="Output directory."),
    json_out: bool = json_option(),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
) -> None:
    """Edit an image with text: w' = M(C_img(x)) + sum(beta * n(t))."""
    from . import imageio, inputs, pipeline, refine
    from .mapper import EDIT_DIRECTIONS, NEUTRAL_AUTO
    from .packs import output_metadata, select_models

    requested = _requested_edits(text, beta, edits)
    _check_choice("--direction", direction, EDIT_DIRECTIONS)
    pipeline.check_refine_steps(refine_steps)  # before any model loads, like the checks around it
    row_range = pipeline.parse_layers(layers) if layers is not None else None
    imageio.read_image(image)  # bad images fail before any model loads
    imageio.check_output_dir(out)
    models = select_models(pack, mapper, generator, clip, device, backend, precision=precision)  # device resolved there
    source, start = inputs.load_image(image, models, align), inputs.load_start_latent(latent, models)
    bar, advance = _progress("Refining", refine_steps)
    with bar:
        result = pipeline.edit(models.generator, models.clip, models.mapper, source, requested, neutral=neutral,
                               refine_steps=refine_steps, lpips=refine.refine_lpips(refine_steps, log=err),
                               w_plus=start, direction=direction, layers=row_range,
                               contrast_sets=[spec.split(",") for spec in contrast] or None, progress=advance)
    settings, used = result.settings, [row[0] for row in result.neutrals]  # one image: each edit's neutral
    if settings.neutral == NEUTRAL_AUTO:
        for line in pipeline.describe_inferred_neutrals(settings.edits, used):
            err(line)
    label, neutral_used = imageio.edit_label(settings.edits, used)
    metadata = output_metadata(models, source=image.name, edits=label, neutral=neutral_used,
                               direction=settings.direction, layers=imageio.layers_label(settings.layers))
    _emit(imageio.write_edit_outputs(out, image.stem, source, result.reconstruction, result.edited,
                                     result.w_plus_edited, label, metadata=metadata), json_out)


def _requested_edits(text: str | None, beta: str | None, edits: list[str]) -> list[tuple[str, float | None]]:
    """(text, beta) of TEXT [--beta] and each --edit TEXT:BETA; a beta left out is None (the mapper's)."""
    from . import pipeline
    from .errors import UserInputError

    text_beta = pipeline.parse_beta(beta) if beta is not None else None
    requested = ([(text, text_beta)] if text is not None else []) + [pipeline.parse_edit(e) for e in edits]
    if not requested:
        raise UserInputError("no edit given", hint="give TEXT (with --beta) or --edit TEXT:BETA")
    return requested


@app.command("interpolate")
@handle_errors
def interpolate_command(
    a: str = typer.Argument(..., metavar="A", help="Start: a prompt, an image, or a latent (.safetensors)."),
    b: str = typer.Argument(..., metavar="B", help="End: a prompt, an image, or a latent (.safetensors)."),
    frames: int = typer.Option(24, "--frames", help="Number of frames, endpoints included."),
    spherical: bool = typer.Option(False, "--spherical", help="Spherical instead of linear interpolation."),
    gif: Optional[Path] = typer.Option(None, "--gif", help="Write an animated GIF here."),
    mp4: Optional[Path] = typer.Option(None, "--mp4", help="Write an MP4 here (needs PyAV or imageio-ffmpeg)."),
    fps: float = typer.Option(12.0, "--fps", help="Frames per second of the GIF / MP4."),
    align: Optional[bool] = typer.Option(None, "--align/--no-align", help="MTCNN face alignment of image endpoints."),
    prior: Optional[str] = typer.Option(
        None, "--prior", metavar="text|retrieval",
        help="Prompt endpoints: the prompt's feature (text) or the bank image generate's first sample would use "
             "(retrieval; default: the mapper's, else text)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the retrieval draw for prompt endpoints."),
    pack: Optional[str] = _MODEL["pack"],
    mapper: Optional[Path] = _MODEL["mapper"],
    generator: Optional[str] = _MODEL["generator"],
    clip: Optional[str] = _MODEL["clip"],
    out: Path = typer.Option(Path("outputs"), "--out", help="Directory for the frames (PNG)."),
    json_out: bool = json_option(),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
) -> None:
    """Interpolate between two prompts, images or latents; frames as PNGs, optionally a GIF / MP4."""
    from . import imageio, inputs, pipeline
    from .device import resolve_device
    from .errors import UserInputError
    from .mapper import GENERATION_PRIORS
    from .packs import output_metadata, select_models

    pipeline.check_frames(frames)
    _check_choice("--prior", prior, GENERATION_PRIORS)
    if not a.strip() or not b.strip():
        raise UserInputError("empty prompt", hint="A and B must be prompts, images or latent files")
    if mp4 is not None:
        imageio.require_mp4_encoder()  # before any work
    imageio.check_output_dir(out)
    models = select_models(pack, mapper, generator, clip, resolve_device(device), backend,
                           text_only=not inputs.needs_image_encoder(a, b), precision=precision)
    w_a, w_b = (inputs.endpoint_latent(spec, models, align, prior, seed) for spec in (a, b))
    bar, advance = _progress("Rendering", frames)
    with bar:
        images = pipeline.synthesize(models.generator, pipeline.interpolate(w_a, w_b, frames, spherical=spherical),
                                     progress=advance)
    metadata = output_metadata(models, a=a, b=b, seed=seed, prior=pipeline.generation_prior(models.mapper, prior))
    _emit(imageio.write_interpolation_outputs(out, inputs.interpolation_name(a, b), images, gif=gif, mp4=mp4,
                                              fps=fps, metadata=metadata), json_out)


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
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | fp16 | bf16: G's and D's mixed precision (config default fp32)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="StyleGAN2 ops: auto | eager | triton | reference (fused: old name of eager)."),
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
    if result.rank != 0:  # under torchrun only rank 0 reports
        return
    losses = ", ".join(f"{name} {value:.4g}" for name, value in result.final_losses.items())
    err(f"Trained {result.steps} steps ({result.steps_per_second:.2f} steps/s). {losses}")
    typer.echo(str(result.mapper_path))


@app.command("eval-fid")
@handle_errors
def eval_fid_command(
    real: Optional[Path] = typer.Option(None, "--real", help="Folder of real images (its statistics are cached)."),
    stats: Optional[Path] = typer.Option(None, "--stats",
                                         help="Precomputed real statistics (npz: mu, sigma, mode) instead of --real."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats",
                                              help="Write the --real folder's statistics (npz) here."),
    fake: Optional[Path] = typer.Option(None, "--fake", help="Folder of generated images."),
    pack: Optional[str] = typer.Option(None, "--pack", help="Pack that generates (with --prompts) and whose CLIP "
                                                            "--features clip uses (default: shapes)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts file, one per line: generate on the fly."),
    n: Optional[int] = typer.Option(None, "-n", help="Images generated per prompt (with --prompts)."),
    prior: Optional[str] = typer.Option(None, "--prior", help="text | retrieval (default: the mapper's)."),
    features: str = typer.Option("inception", "--features", help="inception (FID) | dinov2 (FD_DINOv2, ViT-L/14) | "
                                                                 "clip (FD_CLIP, the pack's CLIP; offline)."),
    fid_mode: str = typer.Option("legacy", "--fid-mode", help="legacy (NVIDIA/torch-fidelity: TF1 bilinear) | "
                                                              "clean (clean-fid: PIL bicubic)."),
    score_clip: Optional[str] = typer.Option(None, "--score-clip", help="CLIP that scores prompts, MODEL:TAG "
                                                                        "(default: the pack's, biased upward)."),
    kid: bool = typer.Option(False, "--kid", help="Also compute KID (each set needs >= --kid-subset-size images)."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="Images per KID subset."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="Number of KID subsets."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", dir_okay=False,
                                                     help="Local torch-fidelity Inception .pth instead of the registry's."),
    report: Optional[Path] = typer.Option(None, "--report", dir_okay=False, help="Also write the JSON report here."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the real folder's statistics."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    json_out: bool = json_option(),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per feature-extractor / generator call."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generation noise and of the KID subsets."),
) -> None:
    """FID / FD_DINOv2 / FD_CLIP, precision/recall (k=3), KID, CLIP score, R-precision and diversity.

    Every report names the mode, resize, extractor weights' sha256 and image counts. See docs/metrics.md.
    """
    import json

    from rich.console import Console

    from .metrics import EvalConfig, evaluate, report_table, write_report

    config = EvalConfig(real=real, stats=stats, save_stats=save_stats, fake=fake, pack=pack, prompts=prompts,
                        images_per_prompt=n, prior=prior, features=features.lower(), fid_mode=fid_mode.lower(),
                        score_clip=score_clip, kid=kid, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                        inception_weights=inception_weights, device=device, backend=backend, precision=precision.lower(),
                        batch_size=batch_size,
                        seed=seed, cache=not no_cache, progress=not quiet)
    result = evaluate(config, warn=lambda message: err(as_flags(message)))
    if report is not None:
        write_report(result, report)
    Console(stderr=json_out).print(report_table(result))
    if json_out:
        typer.echo(json.dumps(result, sort_keys=True))


# The serve command lives in serve/command.py (typer only at import; the server loads when it runs).
from .serve.command import serve_command  # noqa: E402

app.command("serve")(handle_errors(serve_command))


def main() -> None:
    """Console-script entry point."""
    if not debug_enabled():
        warnings.formatwarning = _format_warning
    app()


if __name__ == "__main__":
    main()
