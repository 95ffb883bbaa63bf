"""The perceptual term of `pipeline.refine_inversion` when edit refines its inversion.

LPIPS (alex) when its backbone is already in the cache, else None (L2 only): refining never
downloads. Sits beside train/ (it builds train.losses' LPIPS), above pipeline.
"""
from __future__ import annotations

from typing import Callable

from . import weights


def refine_lpips(refine_steps: int, log: Callable[[str], None] | None = None):
    """LPIPS (alex) for `refine_steps` > 0 when its backbone is cached; otherwise None (`log` says why once)."""
    if refine_steps <= 0:
        return None
    from .train.losses import LPIPS_BACKBONE_WEIGHTS, build_perceptual_loss

    registry = weights.load_registry()
    name = LPIPS_BACKBONE_WEIGHTS["alex"]
    if name not in registry.files or not weights.is_cached(registry.entry(name)):
        if log is not None:
            log(f"Note: refining with L2 only (LPIPS needs `clip2gan download-weights {name}`).")
        return None
    return build_perceptual_loss("alex", "registry")
