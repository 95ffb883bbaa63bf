"""Shared by the StyleGAN2 parity and conversion tests: the parity folder, its tolerance and helpers."""
from __future__ import annotations

from pathlib import Path

import torch

PARITY = Path(__file__).parent / "data" / "parity"
TOLERANCE = 1e-5  # max|out - ref| <= TOLERANCE * max(1, max|ref|) (shared/parity/README)


def split_prefix(tensors: dict, prefix: str) -> dict:
    """The entries whose key starts with `prefix`, with the prefix removed ("G.mapping.fc0" -> "mapping.fc0")."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Shapes equal and max|actual - expected| within the parity tolerance, naming the tensor."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    error = (actual - expected).abs().max().item()
    bound = TOLERANCE * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: max|out - ref| = {error:.3g} > {bound:.3g}"
