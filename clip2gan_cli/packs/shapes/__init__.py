"""The builtin `shapes` pack: a procedural domain and the weights this project trained on it.

The domain (`data`): one coloured shape on a plain background, 32x32, every attribute known, so
an independent checker can measure generated images. The weights beside this file
(generator.safetensors, discriminator.safetensors, clip.safetensors + clip_config.json,
mapper.safetensors, build_times.json) are rebuilt by the recipe in `clip2gan_cli/recipes/shapes` and loaded
by `clip2gan_cli.packs.load_pack()` (the default pack), offline and on the CPU.
"""
from __future__ import annotations

from pathlib import Path

from .data import (BACKGROUNDS, COLORS, JITTER, RESOLUTION, SHAPES, SIZES, TEMPLATES, caption, render,
                   render_batch, sample, vocabulary)

PACK_DIR = Path(__file__).resolve().parent
WEIGHT_FILES = ("generator.safetensors", "clip.safetensors", "clip_config.json", "mapper.safetensors",
                "discriminator.safetensors")


def missing_weight_files() -> list[str]:
    """Names of the shipped weight files that are not present (empty when the pack is complete)."""
    return [name for name in WEIGHT_FILES if not (PACK_DIR / name).is_file()]


__all__ = ["BACKGROUNDS", "COLORS", "JITTER", "PACK_DIR", "RESOLUTION", "SHAPES", "SIZES", "TEMPLATES",
           "WEIGHT_FILES", "caption", "missing_weight_files", "render", "render_batch", "sample", "vocabulary"]
