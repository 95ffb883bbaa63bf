"""Clean-room StyleGAN2 (NVIDIA-compatible keys and numerics) with switchable ops backends.

    from clip2gan_cli.stylegan2 import build_generator
    G = build_generator(256, backend="reference", seed=0).eval()
    img = G(torch.randn(1, G.z_dim), truncation_psi=0.7)  # [1, 3, 256, 256], nominal [-1, 1]

Checkpoint import (`load_generator`, `load_discriminator`) lives in `stylegan2.convert`; it reads
files with `checkpoint`, translates rosinality names with `keymap` and reads the architecture from
the tensors with `architecture`.
"""
from __future__ import annotations

from .networks import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    build_discriminator,
    build_generator,
    load_state_dict_strict,
)
from .ops import BACKENDS, get_ops, resolve_backend

__all__ = [
    "BACKENDS", "Discriminator", "DiscriminatorConfig", "Generator", "GeneratorConfig",
    "build_discriminator", "build_generator", "get_ops", "load_state_dict_strict", "resolve_backend",
]
