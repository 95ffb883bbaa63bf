"""Device, precision and seeding: the one place that decides where models run.

Every model the tool uses (generator, discriminator, CLIP, mapper, identity net, LPIPS,
Inception) goes through `place_model`, so device, dtype, eval mode and freezing are
handled the same way everywhere.
"""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from .errors import DeviceError

if TYPE_CHECKING:  # torch is imported lazily so the CLI starts fast
    import torch

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_CHOICES = ("auto",) + PRECISIONS


def resolve_device(spec: str | None = "auto") -> "torch.device":
    """Turn 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' into an available torch.device.

    'auto' picks CUDA, then MPS, then CPU. Asking for a device that is not there raises
    DeviceError with a one-line reason.
    """
    import torch

    spec = str(spec or "auto").strip().lower()  # str(): a torch.device passed along works too
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError("--device mps was asked for but MPS is not available on this machine",
                              hint="use --device cpu or auto")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec} was asked for but CUDA is not available on this machine",
                              hint="use --device cpu or auto")
        if spec.startswith("cuda:"):
            index_text = spec.split(":", 1)[1]
            if not index_text.isdigit():
                raise DeviceError(f"malformed device '{spec}'", hint=f"expected {DEVICE_CHOICES}")
            index = int(index_text)
            if index >= torch.cuda.device_count():
                raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise DeviceError(f"unknown device '{spec}'", hint=f"expected {DEVICE_CHOICES}")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(precision: str | None, device: "torch.device") -> "torch.dtype":
    """Map --precision (fp32|fp16|bf16) to a dtype that works on `device`.

    fp32 is the default everywhere. fp16 on the CPU is refused (most CPU kernels lack it).
    """
    import torch

    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision '{precision}'", hint="expected fp32, fp16 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type == "cpu":
            raise DeviceError("--precision fp16 is not supported on the CPU", hint="use fp32 or bf16")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("--precision bf16 is not supported by this GPU", hint="use fp16 or fp32")
    return torch.bfloat16


def precision_name(precision: str | None) -> str:
    """`precision` as one of PRECISION_CHOICES (None is 'auto'); DeviceError for any other name."""
    name = str(precision or "auto").strip().lower()
    if name not in PRECISION_CHOICES:
        raise DeviceError(f"unknown precision '{precision}'", hint=f"expected one of {', '.join(PRECISION_CHOICES)}")
    return name


def resolve_precision(precision: str | None, device: "torch.device") -> str:
    """What a StyleGAN2 network's `precision` means on `device`: 'fp32', 'fp16' or 'bf16'.

    The one place that decides what 'auto' is: the checkpoint's mixed precision (its num_fp16_res
    blocks in float16) on CUDA, where tensor cores make it pay; float32 on CPU and MPS, where float16
    kernels are slow or inexact. An explicit 'fp16' or 'bf16' is honoured on any device (on the CPU:
    slow, for tests and parity), except bf16 on a GPU without it.
    """
    import torch

    name = precision_name(precision)
    device = torch.device(device)
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("precision bf16 is not supported by this GPU", hint="use fp16 or fp32")
    return name


def reduced_dtype(precision: str | None, device: "torch.device") -> "torch.dtype | None":
    """The dtype of the blocks a network marks for reduced precision, or None when everything runs float32."""
    import torch

    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[resolve_precision(precision, device)]


def reduced_precision_channels_last(device: "torch.device") -> bool:
    """Whether reduced-precision blocks keep their maps channels_last by default: on CUDA, where
    tensor-core convolutions want NHWC (NVIDIA's --nhwc); elsewhere NCHW, NVIDIA's default layout,
    which reproduces its CPU float16 outputs bit for bit (tests/test_stylegan2_parity_fp16.py)."""
    import torch

    return torch.device(device).type == "cuda"


def seed_everything(seed: int) -> "torch.Generator":
    """Seed Python, NumPy and torch and return a CPU generator seeded with `seed`.

    Same seed, same machine, same arguments -> same bytes. Random tensors that must be
    reproducible across devices are drawn on the CPU from the returned generator.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def disable_tf32() -> None:
    """Use true float32 on CUDA (TF32 errors are far above the parity tolerances)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def place_model(module: "torch.nn.Module", device: "torch.device", dtype: "torch.dtype | None" = None,
                trainable: bool = False) -> "torch.nn.Module":
    """Move a model to `device` (and `dtype`); freeze it and put it in eval mode unless trainable.

    The one loader step every model of the tool goes through.
    """
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    if not trainable:
        module.eval()
        module.requires_grad_(False)
    return module


def debug_enabled() -> bool:
    """True when CLIP2GAN_DEBUG asks for tracebacks."""
    return os.environ.get("CLIP2GAN_DEBUG", "") not in ("", "0", "false", "no")
