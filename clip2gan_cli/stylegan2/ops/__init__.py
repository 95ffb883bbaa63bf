"""The one dispatch point for StyleGAN2 ops. Backends, each a module with the reference's functions
(`bias_act`, `upfirdn2d`, `conv2d_resample`, `modulated_conv2d`, `modulated_conv2d_bias_act`):

* `reference` (`reference.py`): plain PyTorch that reads like the paper; the spec.
* `eager` (`eager.py`): the same math rearranged for speed in eager PyTorch (the CPU's fast path).
* `triton` (`triton_kernels.py`): real fused kernels; CUDA, or the CPU under TRITON_INTERPRET=1.
* `auto`: on a CUDA machine with Triton, per op and shape the faster of `eager` and `triton`,
  measured on first use and cached (`autotune.py`, resolved name `autotune`); elsewhere `eager`,
  or `reference` with one warning per process that says why `eager` cannot run.

`fused` is the old name of `eager`: still accepted, with one deprecation warning per process.
Nothing is compiled at import time, and triton is imported only when a backend that uses it is.

    ops = get_ops(resolve_backend("auto"))
    y = ops.bias_act(x, b, act="lrelu")
"""
from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType

from ...errors import DeviceError

BACKENDS = ("reference", "eager", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS
DEPRECATED_NAMES = {"fused": "eager"}  # old name -> backend it now means
_MODULES = {"reference": "reference", "eager": "eager", "triton": "triton_kernels", "autotune": "autotune"}

_auto_choice: str | None = None  # cached result of "auto" (decided once per process)
_auto_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # backend name -> ops module, filled by get_ops
_deprecation_warned: set[str] = set()


def _import_backend(name: str) -> tuple[ModuleType | None, str]:
    """(the backend's module or None, why it cannot be used here). `is_available()` decides."""
    module_name = f"{__name__}.{_MODULES[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None, f"this build has no {name} backend ({_MODULES[name]}.py is missing)"
        return None, f"the {name} backend cannot be imported: {error}"
    except Exception as error:  # a broken fast path must never break the reference path
        return None, f"the {name} backend cannot be imported: {type(error).__name__}: {error}"
    try:
        available = bool(module.is_available())
    except Exception as error:
        return None, f"the {name} backend's availability check failed: {type(error).__name__}: {error}"
    if available:
        return module, ""
    reason_fn = getattr(module, "unavailable_reason", None)
    reason = reason_fn() if callable(reason_fn) else f"{name}.is_available() returned False"
    return None, reason


def _import_fused() -> tuple[ModuleType | None, str]:
    """(eager module or None, reason): the eager backend's import, under the name tests patch."""
    return _import_backend("eager")


def _import_triton() -> tuple[ModuleType | None, str]:
    return _import_backend("triton")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_auto() -> str:
    """'autotune' on CUDA with working Triton and eager backends; else 'eager', else 'reference'."""
    eager, reason = _import_fused()
    if eager is None:
        warnings.warn(f"StyleGAN2 backend 'auto' uses the reference ops: {reason}", RuntimeWarning, stacklevel=3)
        return "reference"
    if not _cuda_available():
        return "eager"  # the CPU's fastest path, measured once in bench/generator.py
    triton_ops, reason = _import_triton()
    if triton_ops is None:
        warnings.warn(f"StyleGAN2 backend 'auto' uses the eager ops (no Triton kernels): {reason}",
                      RuntimeWarning, stacklevel=3)
        return "eager"
    return "autotune"


def resolve_backend(name: str | None = "auto") -> str:
    """Turn a backend name into the backend to use: 'reference', 'eager', 'triton' or 'autotune'.

    A named backend that cannot run here raises DeviceError; 'auto' falls back (see the module doc).
    """
    global _auto_choice
    name = (name or "auto").strip().lower()
    if name in DEPRECATED_NAMES and name not in _deprecation_warned:
        _deprecation_warned.add(name)
        warnings.warn(f"StyleGAN2 backend '{name}' is now called '{DEPRECATED_NAMES[name]}' (same ops); "
                      f"the old name will go away", FutureWarning, stacklevel=2)
    if name == "reference":
        return "reference"
    if name in ("eager", "fused", "triton", "autotune"):
        module, reason = _import_triton() if name == "triton" else _import_fused()
        if module is None:
            raise DeviceError(f"--backend {name} cannot run here: {reason}", hint="use --backend reference or auto")
        if name == "autotune" and not _cuda_available():
            raise DeviceError("backend 'autotune' measures CUDA kernels and there is no CUDA device here",
                              hint="use --backend auto")
        return DEPRECATED_NAMES.get(name, name)
    if name != "auto":
        raise DeviceError(f"unknown backend '{name}'", hint=f"expected one of {', '.join(BACKEND_CHOICES)}")
    with _auto_lock:
        if _auto_choice is None:
            _auto_choice = _resolve_auto()
        return _auto_choice


def get_ops(backend: str) -> ModuleType:
    """The ops module of a backend (any name `resolve_backend` takes; 'auto' is resolved first). Cached."""
    module = _loaded.get(backend)
    if module is not None:
        return module
    resolved = resolve_backend(backend)  # raises DeviceError for an unusable or unknown backend
    module = importlib.import_module(f"{__name__}.{_MODULES[resolved]}")
    _loaded[backend] = module
    return module


__all__ = ["BACKENDS", "BACKEND_CHOICES", "DEPRECATED_NAMES", "get_ops", "resolve_backend"]
