"""clip2gan: text-guided image generation and editing with frozen CLIP and StyleGAN2.

Importing this package is cheap (no torch); the model API is loaded on first use:

    import clip2gan_cli
    G = clip2gan_cli.load_generator("stylegan2-ffhq-1024x1024")
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_generator": ("clip2gan_cli.stylegan2.convert", "load_generator"),
    "load_discriminator": ("clip2gan_cli.stylegan2.convert", "load_discriminator"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'clip2gan_cli' has no attribute {name!r}")


__all__ = ["__version__", "load_generator", "load_discriminator"]
