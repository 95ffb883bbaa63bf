"""The run directory on disk: its checks, checkpoints (atomic save, fallback load, resume checks) and RNG state.

A checkpoint is a plain dict saved with torch.save and read with weights_only=True: tensors, numbers,
strings and lists only, so loading one never runs code.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, OutputError, UserInputError, first_line
from ..fileutil import atomic_path, atomic_write_bytes, ensure_writable_dir
from ..imageio import sort_safetensors_header_bytes
from ..mapper import Mapper, check_compatible, save_mapper
from .config import TrainConfig
from .reporting import stderr_line

CHECKPOINT_FORMAT = "clip2gan-train-v1"
CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """New run: the directory must be absent or empty; resume: it must hold checkpoints. Writable either way.

    Only `run_dir` itself is created here, so a run that fails while loading models leaves an empty
    directory that the same command accepts again.
    """
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise UserInputError(f"`resume` {run_dir}: no checkpoints/ folder there (not a training run)")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserInputError(f"run directory {run_dir} already exists; refusing to overwrite it",
                             hint=f"use `resume` {run_dir} to continue it, or another `run_dir`")
    ensure_writable_dir(run_dir)


def prepare_run_dir(run_dir: Path) -> None:
    """Create checkpoints/ and samples/, and remove temp files of a save that was killed half-way."""
    ensure_writable_dir(run_dir / "checkpoints")
    ensure_writable_dir(run_dir / "samples")
    for leftover in (run_dir / "checkpoints").glob(".step-*.tmp"):
        leftover.unlink(missing_ok=True)


def checkpoint_paths(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in a run, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, config: TrainConfig, mapper: Mapper, mapper_ema: Mapper,
                    discriminator: nn.Module | None, opt_m, opt_d, scaler, sources: dict[str, str]) -> Path:
    """Write checkpoints/step-N.pt and mapper.safetensors atomically; prune old checkpoints after.

    Each file appears under its final name only once complete (temp file + fsync + rename), so a
    kill at any moment leaves the previous checkpoint intact.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config.to_dict(),
        "sources": dict(sources),
        "mapper_config": mapper.config.to_dict(),
        "mapper": mapper.state_dict(),
        "mapper_ema": mapper_ema.state_dict(),
        "discriminator": discriminator.state_dict() if discriminator is not None else None,
        "opt_m": opt_m.state_dict(),
        "opt_d": opt_d.state_dict() if opt_d is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,  # fp16 only
        "rng": capture_rng_state(),
    }
    target = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    with atomic_path(target) as tmp:
        write_checkpoint_file(state, tmp)
    metadata = {"clip2gan.train_step": str(step),
                **{f"clip2gan.source.{key}": value for key, value in sorted(sources.items())}}
    save_mapper_reproducibly(mapper_ema, run_dir / "mapper.safetensors", metadata)
    for _, old in checkpoint_paths(run_dir)[:-config.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return target


def save_mapper_reproducibly(mapper: Mapper, path: Path, metadata: dict[str, str]) -> Path:
    """save_mapper, then rewrite the safetensors JSON header with sorted keys (`sort_safetensors_header`)."""
    save_mapper(mapper, path, metadata=metadata)
    return sort_safetensors_header(path)


def sort_safetensors_header(path: Path) -> Path:
    """Rewrite a safetensors file's JSON header with sorted keys, atomically (`sort_safetensors_header_bytes`).

    Equal weights then give byte-identical files, whatever order safetensors wrote the header in.
    """
    return atomic_write_bytes(path, sort_safetensors_header_bytes(path.read_bytes()))


def write_checkpoint_file(state: dict[str, Any], path: Path) -> None:
    """Serialise a checkpoint dict (the one place that writes bytes; tests inject failures here)."""
    try:
        torch.save(state, path)
    except RuntimeError as error:  # torch reports a failed write (a full disk: "unexpected pos") this way
        free_mib = shutil.disk_usage(path.parent).free / 2**20
        raise OutputError(f"cannot write a checkpoint in {path.parent} ({free_mib:.1f} MiB free on that disk): "
                          f"{first_line(error, 120)}", hint="free some space and resume with `resume`") from error


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest readable checkpoint of a run (an unreadable newest one falls back to the previous)."""
    candidates = checkpoint_paths(run_dir)
    if not candidates:
        raise CheckpointError(f"`resume` {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    errors = []
    for step, path in reversed(candidates):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or foreign file: try the one before
            errors.append(f"{path.name}: {first_line(error, 120)}")
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            errors.append(f"{path.name}: not a clip2gan training checkpoint")
            continue
        if errors:
            stderr_line(f"Skipped unreadable checkpoint(s): {'; '.join(errors)}")
        return state
    raise CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}: {'; '.join(errors)}")


def check_resume_compatible(checkpoint: dict[str, Any], mapper: Mapper, generator: nn.Module, clip: nn.Module,
                            discriminator: nn.Module | None) -> None:
    """CheckpointError when the G/CLIP pair of this run does not fit the mapper being resumed."""
    saved = Mapper(config=type(mapper.config).from_dict(checkpoint["mapper_config"]))
    check_compatible(saved, generator, clip)
    if saved.config != mapper.config:
        raise CheckpointError(f"the checkpoint's mapper ({saved.extra_repr()}) differs from this run's "
                              f"({mapper.extra_repr()})", hint="resume with the config the run was started with")
    if (discriminator is None) != (checkpoint.get("discriminator") is None):
        raise CheckpointError("the checkpoint and this run disagree on the adversarial loss (lambda_adv) being on")
    if discriminator is not None:
        expected = {k: tuple(v.shape) for k, v in discriminator.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in checkpoint["discriminator"].items()}
        if expected != found:
            raise CheckpointError("the checkpoint's discriminator does not fit this generator's resolution")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (pickle-free types only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    random.setstate(_to_tuples(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
