"""The loading API for users' StyleGAN2 checkpoints: load, convert once to `.safetensors`, save.

A checkpoint is read by `checkpoint.py` (NVIDIA pickles without executing them, rosinality `.pt`
with torch's weights-only loader, the project's `.safetensors`), rosinality key names are
translated by `keymap.py`, and the architecture is read from the tensors by `architecture.py`.
This module builds the networks, estimates a missing truncation centre as rosinality's
`mean_latent` does, converts NVIDIA / rosinality files once into `<cache>/converted/`, and loads.

    G = load_generator("stylegan2-ffhq-1024x1024")        # registry name: fetch, convert once, load
    G = load_generator("network-snapshot-000800.pkl")     # converted into <cache>/converted/ once
    D = load_discriminator("550000.pt", device="cpu")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, DeviceError, UserInputError
from ..fileutil import atomic_path, sha256_file
from .architecture import infer_discriminator_config, infer_generator_config
from .checkpoint import (DISCRIMINATOR_FORMAT, GENERATOR_FORMAT, ImportedCheckpoint, ImportedNetwork,
                         read_checkpoint, read_safetensors, sniff_format)
from .keymap import (rosinality_discriminator_key, rosinality_generator_key, rosinality_to_nvidia_discriminator,
                     rosinality_to_nvidia_generator)
from .networks import Discriminator, Generator, load_state_dict_strict

CONVERTER_VERSION = "2"  # bump when conversion output changes, so cached files are redone (2: num_fp16_res)

# rosinality's generate.py estimates the truncation centre as the mean of 4096 mapped z.
LATENT_AVG_SAMPLES = 4096
LATENT_AVG_SEED = 0


# ----------------------------------------------------------------------------------------------
# Building networks and saving them


def _build(network: ImportedNetwork, backend: str, source: str) -> torch.nn.Module:
    """A network of the imported config with the imported weights (CPU, strict key/shape check)."""
    try:
        module = (Generator(network.config, backend=backend) if network.kind == "generator"
                  else Discriminator(network.config, backend=backend))
    except UserInputError as error:
        raise CheckpointError(f"{source}: {error}") from None
    state_dict = network.state_dict
    if network.estimate_w_avg:  # a placeholder centre, replaced by the estimate right after loading
        state_dict = {**state_dict, "mapping.w_avg": torch.zeros(network.config.w_dim)}
    load_state_dict_strict(module, state_dict, source=source)
    if network.estimate_w_avg:
        estimate_w_avg(module)
        network.metadata["w_avg_source"] = (f"estimated: mean of mapping(z) over {LATENT_AVG_SAMPLES} z ~ N(0, I) "
                                            f"drawn from torch.Generator seed {LATENT_AVG_SEED} (rosinality mean_latent)")
        network.estimate_w_avg = False
    return module


@torch.no_grad()
def estimate_w_avg(generator: Generator, samples: int = LATENT_AVG_SAMPLES, seed: int = LATENT_AVG_SEED) -> torch.Tensor:
    """Set `mapping.w_avg` to the mean of the mapping over `samples` seeded z (rosinality's
    `mean_latent`, used when a checkpoint has no truncation centre); returns it."""
    z = torch.randn([samples, generator.z_dim], generator=torch.Generator().manual_seed(seed))
    z = z.to(generator.w_avg.device, generator.w_avg.dtype)
    w = generator.mapping(z, truncation_psi=1.0)[:, 0]
    generator.mapping.w_avg.copy_(w.mean(dim=0))
    return generator.mapping.w_avg


def _save_module(module: torch.nn.Module, path: str | os.PathLike, file_format: str,
                 extra_metadata: Mapping[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in module.state_dict().items()}
    metadata = {str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in (extra_metadata or {}).items()}
    metadata.update({"format": file_format, "config": json.dumps(module.config.to_dict()),
                     "converter_version": CONVERTER_VERSION})
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def save_generator(G: Generator, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a generator's state dict to `path` (.safetensors) with its config JSON in the metadata.

    The write is atomic. `extra_metadata` values are stored as strings (non-strings as JSON).
    """
    return _save_module(G, path, GENERATOR_FORMAT, extra_metadata)


def save_discriminator(D: Discriminator, path: str | os.PathLike,
                       extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a discriminator's state dict to `path` (.safetensors) with its config JSON in the metadata."""
    return _save_module(D, path, DISCRIMINATOR_FORMAT, extra_metadata)


# ----------------------------------------------------------------------------------------------
# Conversion cache


def converted_paths(source: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(<out_dir>/<stem>.G.safetensors, <out_dir>/<stem>.D.safetensors) for a checkpoint path;
    `out_dir` defaults to `<cache>/converted`."""
    if out_dir is None:
        from ..weights import cache_dir

        out_dir = cache_dir() / "converted"
    stem = Path(source).stem
    return Path(out_dir) / f"{stem}.G.safetensors", Path(out_dir) / f"{stem}.D.safetensors"


def discriminator_path(generator_path: str | os.PathLike) -> Path:
    """The `.D.safetensors` file that belongs to a converted `.G.safetensors` file."""
    generator_path = Path(generator_path)
    return generator_path.with_name(generator_path.name.replace(".G.safetensors", ".D.safetensors"))




def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # an unreadable cached file is simply redone
        return {}


def _cached_conversion(source: Path, generator_path: Path) -> bool:
    """True when `generator_path` (and its D when recorded) was converted from this very source."""
    if not generator_path.is_file():
        return False
    metadata = _read_metadata(generator_path)
    if metadata.get("format") != GENERATOR_FORMAT or metadata.get("converter_version") != CONVERTER_VERSION:
        return False
    if metadata.get("has_discriminator") == "true" and not discriminator_path(generator_path).is_file():
        return False
    stat = source.stat()
    if metadata.get("source_size") == str(stat.st_size) and metadata.get("source_mtime_ns") == str(stat.st_mtime_ns):
        return True
    return metadata.get("source_sha256") == sha256_file(source)


def convert_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert an NVIDIA .pkl or rosinality .pt into the project's .safetensors files; return G's path.

    Writes `<out_dir>/<stem>.G.safetensors` and, when the checkpoint has a discriminator,
    `<stem>.D.safetensors` (config JSON in the metadata; `out_dir` defaults to
    `<cache>/converted`). Conversion happens once: a file converted from the same source (same
    size and mtime, or same sha256) is reused. A refused or malformed checkpoint raises
    UnsafeCheckpointError / CheckpointError and writes nothing.
    """
    source = Path(path)
    if not source.is_file():
        raise UserInputError(f"checkpoint file {source} does not exist")
    generator_path, discriminator_out = converted_paths(source, out_dir)
    if _cached_conversion(source, generator_path):
        return generator_path
    checkpoint = read_checkpoint(source)
    if checkpoint.generator is None:
        raise CheckpointError(f"{source.name} holds no generator")
    stat = source.stat()
    provenance = {"source": source.name, "source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns),
                  "source_sha256": sha256_file(source)}
    generator = _build(checkpoint.generator, "reference", source.name)
    discriminator = (_build(checkpoint.discriminator, "reference", source.name)
                     if checkpoint.discriminator is not None else None)
    if discriminator is not None:  # written first, so a G file never points at a missing D
        save_discriminator(discriminator, discriminator_out, {**checkpoint.discriminator.metadata, **provenance})
    save_generator(generator, generator_path, {**checkpoint.generator.metadata, **provenance,
                                               "has_discriminator": "true" if discriminator is not None else "false"})
    return generator_path


# ----------------------------------------------------------------------------------------------
# Public loading API


def _resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint path for `source`: an existing file, or a registry name fetched into the cache."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise UserInputError(f"{path} is not a checkpoint file (it is a directory or a special file)")
    text = str(source)
    looks_like_path = (isinstance(source, os.PathLike) or os.sep in text or "/" in text
                       or path.suffix.lower() in (".pkl", ".pt", ".pth", ".safetensors", ".ckpt"))
    if looks_like_path:
        raise UserInputError(f"checkpoint file {path} does not exist")
    from ..weights import fetch

    return fetch(text)


def network_precision(precision: str | None, device: torch.device) -> str:
    """'fp32', 'fp16' or 'bf16': what `precision` ('auto' or a name) means for a network on `device`.

    device.resolve_precision decides what 'auto' is; a name outside device.PRECISION_CHOICES is a
    UserInputError naming the parameter.
    """
    from ..device import PRECISION_CHOICES, precision_name, resolve_precision

    try:
        name = precision_name(precision)
    except DeviceError:  # a user's input here, named as the parameter it came through
        raise UserInputError(f"unknown `precision` '{precision}'",
                             hint=f"expected {' | '.join(PRECISION_CHOICES)}") from None
    return resolve_precision(name, device)


def _load_network(source: str | os.PathLike, kind: str, device: str, backend: str,
                  precision: str | None) -> torch.nn.Module:
    from ..device import place_model, resolve_device

    target_device = resolve_device(device)  # fail fast on a bad device or precision before any heavy work
    resolved_precision = network_precision(precision, target_device)
    path = _resolve_source(source)
    if sniff_format(path) != "safetensors":  # NVIDIA / rosinality files are converted once, then read back
        generator_path = convert_checkpoint(path)
        path = generator_path if kind == "generator" else discriminator_path(generator_path)
        if not path.is_file():
            raise CheckpointError(f"{Path(source).name} holds no discriminator")
    checkpoint = read_safetensors(path)
    network = checkpoint.generator if kind == "generator" else checkpoint.discriminator
    if network is None:
        other = "a discriminator" if kind == "generator" else "a generator"
        raise CheckpointError(f"{path.name} holds {other}, not a {kind}")
    module = _build(network, backend, path.name)
    module.set_precision(resolved_precision)
    return place_model(module, target_device)


def load_generator(source: str | os.PathLike, device: str = "auto", backend: str = "auto",
                   precision: str = "auto") -> Generator:
    """A frozen, eval-mode StyleGAN2 Generator from a registry name, an NVIDIA `.pkl`, a rosinality
    `.pt`, or a project `.safetensors` (config JSON inside or beside it).

    The architecture is read from the checkpoint's tensors; nothing inside the file is executed.
    `precision` ("auto" | "fp32" | "fp16" | "bf16") is what the checkpoint's num_fp16_res blocks run
    in, resolved for the device now (auto: float16 on CUDA, float32 on CPU and MPS; `G.precision`
    tells which); weights, styles and the image stay float32.
    Raises UserInputError for a missing file or an unknown precision, UnsafeCheckpointError for a
    file that asks to run code, CheckpointError for an unreadable or unsupported one.
    """
    return _load_network(source, "generator", device, backend, precision)


def load_discriminator(source: str | os.PathLike, device: str = "auto", backend: str = "auto",
                       precision: str = "auto") -> Discriminator:
    """A frozen, eval-mode StyleGAN2 Discriminator from the same kinds of source as `load_generator`;
    `precision` as there, for its num_fp16_res highest-resolution blocks."""
    return _load_network(source, "discriminator", device, backend, precision)


__all__ = [
    "CONVERTER_VERSION", "DISCRIMINATOR_FORMAT", "GENERATOR_FORMAT", "ImportedCheckpoint", "ImportedNetwork",
    "convert_checkpoint", "converted_paths", "discriminator_path", "estimate_w_avg", "infer_discriminator_config",
    "infer_generator_config", "load_discriminator", "load_generator", "network_precision", "read_checkpoint",
    "rosinality_discriminator_key", "rosinality_generator_key", "rosinality_to_nvidia_discriminator",
    "rosinality_to_nvidia_generator", "save_discriminator", "save_generator", "sniff_format",
]
