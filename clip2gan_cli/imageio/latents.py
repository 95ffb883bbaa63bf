"""W+ latent files (safetensors, one `w_plus` tensor): byte-reproducible writing, shape-checked reading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UserInputError, first_line
from .publish import write_output

if TYPE_CHECKING:
    import torch

LATENT_KEY = "w_plus"


def save_latent(path: str | Path, w_plus: "torch.Tensor", metadata: dict[str, Any] | None = None,
                no_clobber: bool = False) -> Path:
    """Write W+ codes [N, num_ws, w_dim] (or one [num_ws, w_dim]) as safetensors, atomically; returns the path.

    The same codes and metadata always give the same bytes (see `_safetensors_bytes`).
    """
    header = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    data = _safetensors_bytes({LATENT_KEY: w_plus.detach().float().to("cpu").contiguous()}, header)
    return write_output(Path(path), lambda tmp: tmp.write_bytes(data), no_clobber)


def _safetensors_bytes(tensors: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted (`sort_safetensors_header_bytes`)."""
    from safetensors.torch import save

    return sort_safetensors_header_bytes(save(tensors, metadata=metadata))


def sort_safetensors_header_bytes(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (same length; tensor bytes untouched).

    safetensors writes its metadata map through a Rust HashMap whose order changes from call to call,
    so equal tensors would give different files (and a rerun of generate could not recognise its own
    output); sorting the header, padded with spaces as safetensors pads, makes them byte-identical.
    """
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # never expected (same entries, same compact JSON); keep safetensors' own bytes
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size:]


def load_latent(path: str | Path, num_ws: int | None = None, w_dim: int | None = None) -> "torch.Tensor":
    """Read W+ codes as [N, num_ws, w_dim]; UserInputError when the shape does not fit the generator.

    A single W vector [w_dim] or [1, w_dim] is broadcast to all num_ws layers.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"latent file not found: {path}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:
        raise CheckpointError(f"cannot read latent file {path}: {first_line(error, 160)}") from error
    if LATENT_KEY not in tensors:
        raise UserInputError(f"{path} holds no '{LATENT_KEY}' tensor (not a clip2gan latent file)")
    w_plus = tensors[LATENT_KEY].float()
    if w_plus.ndim == 1:
        w_plus = w_plus.view(1, 1, -1)
    elif w_plus.ndim == 2:
        w_plus = w_plus.unsqueeze(0)
    if w_plus.ndim != 3:
        raise UserInputError(f"latent in {path} has shape {tuple(w_plus.shape)}; expected [N, num_ws, w_dim]")
    if w_dim is not None and w_plus.shape[2] != w_dim:
        raise UserInputError(f"latent in {path} has shape {tuple(w_plus.shape)}: wrong for this generator "
                             f"(expects [N, {num_ws}, {w_dim}])")
    if num_ws is not None and w_plus.shape[1] != num_ws:
        if w_plus.shape[1] != 1:
            raise UserInputError(f"latent in {path} has shape {tuple(w_plus.shape)}: wrong for this generator "
                                 f"(expects [N, {num_ws}, {w_dim}])")
        w_plus = w_plus.expand(-1, num_ws, -1).contiguous()
    return w_plus
