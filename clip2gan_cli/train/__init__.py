"""Training of the CLIP2GAN mapper (`clip2gan train`): config, data, losses and the loop.

`TrainConfig` / `load_config` import no torch; `run_training` and friends load the trainer on first use.
"""
from __future__ import annotations

from .config import TrainConfig, load_config, load_run_config

_LAZY = {
    "run_training": "trainer",
    "TrainModels": "models",
    "TrainResult": "trainer",
    "build_models": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "load_config", "load_run_config", *_LAZY]
