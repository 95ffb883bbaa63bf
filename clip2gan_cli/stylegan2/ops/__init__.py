"""The one dispatch point for StyleGAN2 ops: `reference` (plain PyTorch, the spec) or `fused` (faster).

Both backends are modules defining the same functions with NVIDIA's semantics: `bias_act`,
`upfirdn2d`, `conv2d_resample`, `modulated_conv2d` (see `reference.py`). Nothing is compiled at
import time; `fused` is imported only when asked for.

    ops = get_ops(resolve_backend("auto"))
    y = ops.bias_act(x, b, act="lrelu")

`resolve_backend("auto")` picks `fused` when `fused.is_available()` is true, otherwise `reference`
with one warning per process that says why. If `fused` defines `unavailable_reason() -> str`, that
text is the reason given.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType

from ...errors import DeviceError

BACKENDS = ("reference", "fused")
BACKEND_CHOICES = ("auto",) + BACKENDS

_auto_choice: str | None = None  # cached result of "auto" (decided once per process)
_auto_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # backend name -> ops module, filled by get_ops


def _import_fused() -> tuple[ModuleType | None, str]:
    """(fused module or None, reason it cannot be used)."""
    try:
        fused = importlib.import_module(f"{__name__}.fused")
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.fused":
            return None, "this build has no fused backend (clip2gan_cli/stylegan2/ops/fused.py is missing)"
        return None, f"the fused backend cannot be imported: {error}"
    except Exception as error:  # a broken fast path must never break the reference path
        return None, f"the fused backend cannot be imported: {type(error).__name__}: {error}"
    try:
        available = bool(fused.is_available())
    except Exception as error:
        return None, f"the fused backend's availability check failed: {type(error).__name__}: {error}"
    if available:
        return fused, ""
    reason_fn = getattr(fused, "unavailable_reason", None)
    reason = reason_fn() if callable(reason_fn) else "fused.is_available() returned False"
    return None, reason


def resolve_backend(name: str | None = "auto") -> str:
    """Turn 'auto', 'reference' or 'fused' into the backend to use ('reference' or 'fused').

    'fused' where it cannot run raises DeviceError; 'auto' falls back to 'reference' with one
    warning per process naming the reason.
    """
    global _auto_choice
    name = (name or "auto").strip().lower()
    if name == "reference":
        return "reference"
    if name == "fused":
        fused, reason = _import_fused()
        if fused is None:
            raise DeviceError(f"--backend fused cannot run here: {reason}", hint="use --backend reference or auto")
        return "fused"
    if name != "auto":
        raise DeviceError(f"unknown backend '{name}'", hint=f"expected one of {', '.join(BACKEND_CHOICES)}")
    with _auto_lock:
        if _auto_choice is None:
            fused, reason = _import_fused()
            _auto_choice = "fused" if fused is not None else "reference"
            if fused is None:
                warnings.warn(f"StyleGAN2 backend 'auto' uses the reference ops: {reason}",
                              RuntimeWarning, stacklevel=2)
        return _auto_choice


def get_ops(backend: str) -> ModuleType:
    """The ops module of a backend ('reference' or 'fused'; 'auto' is resolved first). Cached."""
    module = _loaded.get(backend)
    if module is not None:
        return module
    resolved = resolve_backend(backend)  # raises DeviceError for an unusable or unknown backend
    if resolved == "reference":
        from . import reference as module
    else:
        module = importlib.import_module(f"{__name__}.fused")
    _loaded[backend] = module
    return module


__all__ = ["BACKENDS", "BACKEND_CHOICES", "get_ops", "resolve_backend"]
