"""Packs: a name -> the models that work together (generator, CLIP, mapper; discriminator, identity net).

`loading` resolves names and explicit flags, `pack` holds the loaded `Pack`, `clip_spec` parses `--clip`;
the builtin `shapes` pack lives in `shapes/`. Re-exports only.
"""
from __future__ import annotations

from .clip_spec import ClipSpec, load_clip_spec, parse_clip_spec
from .loading import (BUILTIN_FILES, DEFAULT_PACK, PACKS_DIR, load_models, load_pack, select_models,
                      train_command)
from .pack import Pack, output_metadata

__all__ = ["BUILTIN_FILES", "DEFAULT_PACK", "PACKS_DIR", "ClipSpec", "Pack", "load_clip_spec", "load_models",
           "load_pack", "output_metadata", "parse_clip_spec", "select_models", "train_command"]
