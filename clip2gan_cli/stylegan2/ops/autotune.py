"""The `auto` backend on CUDA: per op and shape, the fastest of the candidate backends (eager, triton).

On first use of an (op, shape signature) each candidate runs on the real inputs (a warm-up call,
which also compiles, then a few timed calls: a few milliseconds), and the choice is remembered in
`$CLIP2GAN_HOME/autotune/stylegan2_ops.json`, keyed by op, shapes, dtypes, arguments, device name
and torch/triton versions, so later processes skip the measurement. A candidate is chosen only when
it measured faster than `eager`, so `auto` is never slower than the eager path. A candidate that
raises (a kernel that does not compile here) or whose output disagrees with eager's is left out
with one warning that says why. CPU tensors go straight to `eager`: on the CPU nothing is measured.

Only forward passes are timed (under no_grad); the backward of each candidate has the same layout.
"""
from __future__ import annotations

import functools
import inspect
import json
import statistics
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import eager, reference

OPS = ("bias_act", "upfirdn2d", "conv2d_resample", "modulated_conv2d", "modulated_conv2d_bias_act")
BASELINE = "eager"
CACHE_VERSION = 1


def cuda_timer(fn: Callable[[], object], reps: int = 5) -> float:
    """Median seconds of `fn()` on the current CUDA stream, after one untimed warm-up (compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _describe(value):
    """A JSON-able description of an argument: tensors by shape, dtype and layout, not by value."""
    if isinstance(value, torch.Tensor):
        layout = "channels_last" if (value.ndim == 4 and not value.is_contiguous()
                                     and value.is_contiguous(memory_format=torch.channels_last)) else "strided"
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""), "layout": layout}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


AGREEMENT_RTOL = 1e-2  # catches a wrong tap, layout or gain; TF32 and float16 rounding stay far below


def _check_agreement(got, expected) -> None:
    """ValueError unless a candidate's output matches eager's: a miscompiled kernel is never chosen."""
    if not isinstance(expected, torch.Tensor):
        return
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise ValueError(f"its output has shape {tuple(getattr(got, 'shape', ()))}, eager's {tuple(expected.shape)}")
    error = (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0
    bound = AGREEMENT_RTOL * max(1.0, expected.float().abs().max().item() if expected.numel() else 0.0)
    if not error <= bound:  # also catches NaN
        raise ValueError(f"its output differs from eager's by {error:.3g} (allowed {bound:.3g})")


class OpChooser:
    """Measures candidate backends per op and shape signature, caches the choice in memory and on disk."""

    def __init__(self,
                 candidates: dict[str, ModuleType],  # backend name -> ops module; must include BASELINE
                 cache_file: Path | None,  # JSON file of earlier choices (None: memory only)
                 timer: Callable[[Callable[[], object]], float] = cuda_timer,  # seconds one call takes
                 environment: dict | None = None,  # device name, versions: part of every key
                 ):
        if BASELINE not in candidates:
            raise ValueError(f"the candidates must include the baseline '{BASELINE}'")
        self.candidates, self.cache_file, self.timer = dict(candidates), cache_file, timer
        self.environment = environment if environment is not None else _environment()
        self._choices: dict[str, str] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def key(self, op: str, args: tuple, kwargs: dict) -> str:
        bound = _signature(op).bind(*args, **kwargs)
        bound.apply_defaults()  # a default passed explicitly or left out is the same call
        signature = {name: _describe(value) for name, value in bound.arguments.items()}
        return json.dumps({"op": op, "args": signature, **self.environment}, sort_keys=True)

    def choose(self, op: str, args: tuple, kwargs: dict) -> str:
        """The backend for this call: remembered, read from the cache file, or measured now."""
        key = self.key(op, args, kwargs)
        choice = self._choices.get(key)  # the common case, once measured: no lock (dict reads are atomic)
        if choice is not None:
            return choice
        with self._lock:
            choice = self._choices.get(key)
            if choice is None:
                choice = self._read_cache().get(key, {}).get("backend")
                if choice not in self.candidates:
                    choice = self._measure(op, key, args, kwargs)
                self._choices[key] = choice
            return choice

    def call(self, op: str, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if not first.is_cuda:  # the CPU: nothing is measured, eager as before
            return getattr(self.candidates[BASELINE], op)(*args, **kwargs)
        return getattr(self.candidates[self.choose(op, args, kwargs)], op)(*args, **kwargs)

    def _measure(self, op, key, args, kwargs) -> str:
        seconds = {}
        with torch.no_grad():
            expected = getattr(self.candidates[BASELINE], op)(*args, **kwargs)
            for name, module in self.candidates.items():
                try:
                    if name != BASELINE:
                        _check_agreement(getattr(module, op)(*args, **kwargs), expected)
                    seconds[name] = self.timer(lambda module=module: getattr(module, op)(*args, **kwargs))
                except Exception as error:
                    if name == BASELINE:
                        raise
                    self._warn_once(name, op, error)
        choice = min(seconds, key=lambda name: (seconds[name], name != BASELINE))  # ties go to eager
        if seconds[choice] >= seconds[BASELINE]:
            choice = BASELINE
        self._write_cache(key, {"backend": choice, "seconds": seconds})
        return choice

    def _warn_once(self, name, op, error):
        if name in self._warned:
            return
        self._warned.add(name)
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(f"StyleGAN2 backend 'auto': the {name} kernels failed on {op} ({reason}); "
                      f"using {BASELINE} wherever they fail", RuntimeWarning, stacklevel=4)

    def _read_cache(self) -> dict:
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(Path(self.cache_file).read_text())
        except (OSError, ValueError):  # missing or damaged: measure again (correctness never depends on it)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        choices = data.get("choices")
        return choices if isinstance(choices, dict) else {}

    def _write_cache(self, key: str, entry: dict) -> None:
        if self.cache_file is None:
            return
        from ...errors import OutputError
        from ...fileutil import atomic_write_text

        choices = self._read_cache()  # re-read: another process may have added choices meanwhile
        choices[key] = entry
        try:
            atomic_write_text(self.cache_file, json.dumps({"version": CACHE_VERSION, "choices": choices}, indent=1))
        except OutputError:
            pass  # a read-only cache only costs a measurement in the next process


def _environment() -> dict:
    env = {"torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def default_cache_file() -> Path:
    from ...weights import cache_dir

    return cache_dir() / "autotune" / "stylegan2_ops.json"


_chooser: OpChooser | None = None
_chooser_lock = threading.Lock()


def chooser() -> OpChooser:
    """The process's chooser over eager and (when it imports) triton, caching under $CLIP2GAN_HOME."""
    global _chooser
    if _chooser is not None:  # every op call comes here: no lock once it is built
        return _chooser
    with _chooser_lock:
        if _chooser is None:
            candidates = {BASELINE: eager}
            try:
                from . import triton_kernels
                candidates["triton"] = triton_kernels
            except Exception as error:  # no triton: eager alone, said once
                warnings.warn(f"StyleGAN2 backend 'auto' uses the eager ops: triton cannot be imported "
                              f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=3)
            _chooser = OpChooser(candidates, default_cache_file())
        return _chooser


def choices() -> dict[str, str]:
    """What `auto` chose in this process so far: call key (op, arguments, environment; JSON) -> backend."""
    return dict(_chooser._choices) if _chooser is not None else {}


def is_available() -> bool:
    return eager.is_available()


def unavailable_reason() -> str:
    return eager.unavailable_reason()


@functools.lru_cache(maxsize=None)
def _signature(op: str) -> inspect.Signature:
    """The reference op's signature (inspect.signature costs tens of microseconds: once per op)."""
    return inspect.signature(getattr(reference, op))


def _measured(op: str):
    """The op with the reference's signature, run by the backend the chooser picks for its inputs."""
    @functools.wraps(getattr(reference, op))
    def run(*args, **kwargs):
        return chooser().call(op, *args, **kwargs)
    return run


bias_act = _measured("bias_act")
upfirdn2d = _measured("upfirdn2d")
conv2d_resample = _measured("conv2d_resample")
modulated_conv2d = _measured("modulated_conv2d")
modulated_conv2d_bias_act = _measured("modulated_conv2d_bias_act")

__all__ = ["BASELINE", "OPS", "OpChooser", "bias_act", "chooser", "choices", "conv2d_resample", "cuda_timer",
           "default_cache_file", "is_available", "modulated_conv2d", "modulated_conv2d_bias_act",
           "unavailable_reason", "upfirdn2d"]
