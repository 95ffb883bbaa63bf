"""Shared by the StyleGAN2 parity, conversion and fused-ops tests: the parity folder, its tolerance
rule and helpers."""
from __future__ import annotations

from pathlib import Path

import torch

PARITY = Path(__file__).parent / "data" / "parity"
TOLERANCE = 1e-5  # float32 parity (shared/parity/README): max|out - ref| <= TOLERANCE * max(1, max|ref|)


def split_prefix(tensors: dict, prefix: str) -> dict:
    """The entries whose key starts with `prefix`, with the prefix removed ("G.mapping.fc0" -> "mapping.fc0")."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float = TOLERANCE) -> None:
    """The parity rule: shapes equal and max|actual - expected| <= rtol * max(1, max|expected|).

    Compared in float64 on the CPU, so any device or dtype (e.g. a float16 run with its own
    `rtol`) can be checked against a float32 reference. `name` says which tensor failed.
    """
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    error = (actual - expected).abs().max().item()
    bound = rtol * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: max|out - ref| = {error:.3g} > {bound:.3g}"


def randomize_network(module, seed: int = 0):
    """Every parameter and buffer random (noise strengths, biases, const), FIR filters kept: so every path
    of a StyleGAN2 network contributes when backends are compared."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if "resample_filter" not in name:
                offset = 1.0 if "affine.bias" in name else 0.0  # styles around 1, as in trained networks
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5 + offset)
    return module
