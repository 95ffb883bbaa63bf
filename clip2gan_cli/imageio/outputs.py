"""What generate / edit / interpolate write: file names, metadata, one record per written file.

Command outputs are written with `no_clobber=True`: a deterministic name that already holds
different bytes (another run, another process) is never replaced; the new file gets `-2`, `-3`, ...
instead, and the records name the file actually written.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import OutputError, UserInputError
from .images import IMAGE_FORMATS, make_grid, save_image, save_png, to_uint8
from .latents import save_latent
from .video import require_mp4_encoder, save_gif, save_mp4

if TYPE_CHECKING:
    import torch


def check_output_dir(path: str | Path) -> Path:
    """The output directory, created if needed; OutputError when it cannot be written."""
    from ..fileutil import ensure_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    return ensure_writable_dir(path)


def slugify(text: str, max_length: int = 48) -> str:
    """A file-name-safe slug of a prompt; a short hash is added when the slug loses information.

    "a red circle" -> "a-red-circle"; "A red circle!" -> "a-red-circle-1c0b3f" (so two different
    prompts never share file names).
    """
    import hashlib
    import re

    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = "-".join(words)[:max_length].strip("-") or "prompt"
    if slug.replace("-", " ") != text:
        slug += "-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]
    return slug


def write_generate_outputs(out_dir: str | Path, images: "torch.Tensor", w_plus: "torch.Tensor",
                           texts: Sequence[str], prompt_index: Sequence[int], sample_index: Sequence[int],
                           seed: int, fmt: str = "png", grid: bool = True, save_latents: bool = False,
                           metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write generate's images (+ one grid and one latent file per prompt); one record per file.

    Names: `<slug>_s<seed>_<index:03d>.<fmt>`, `<slug>_s<seed>_grid.<fmt>`, `<slug>_s<seed>.safetensors`;
    a name that already holds other bytes is kept and the new file gets `-2`, `-3`, ... (publish_new_file).
    Records: {"path", "role" (image|grid|latents), "prompt", "seed", "index"}.
    """
    fmt = fmt.lower()
    if fmt not in IMAGE_FORMATS:
        raise UserInputError(f"unknown image format '{fmt}'", hint="use png or jpg")
    out_dir = check_output_dir(out_dir)
    records: list[dict[str, Any]] = []
    for p, text in enumerate(texts):
        slug = slugify(text)
        rows = [i for i, prompt in enumerate(prompt_index) if int(prompt) == p]
        for row in rows:
            index = int(sample_index[row])
            path = save_image(out_dir / f"{slug}_s{seed}_{index:03d}.{fmt}", images[row:row + 1], fmt,
                              {**(metadata or {}), "prompt": text, "seed": str(seed), "index": str(index)},
                              no_clobber=True)
            records.append({"path": str(path), "role": "image", "prompt": text, "seed": seed, "index": index})
        if grid and len(rows) > 1:
            path = save_image(out_dir / f"{slug}_s{seed}_grid.{fmt}", make_grid(images[rows]), fmt,
                              {**(metadata or {}), "prompt": text, "seed": str(seed)}, no_clobber=True)
            records.append({"path": str(path), "role": "grid", "prompt": text, "seed": seed})
        if save_latents:
            path = save_latent(out_dir / f"{slug}_s{seed}.safetensors", w_plus[rows],
                               {**(metadata or {}), "prompt": text, "seed": str(seed)}, no_clobber=True)
            records.append({"path": str(path), "role": "latents", "prompt": text, "seed": seed})
    return records


def write_edit_outputs(out_dir: str | Path, stem: str, source: "torch.Tensor", reconstruction: "torch.Tensor",
                       edited: "torch.Tensor", w_plus_edited: "torch.Tensor", edit_label: str,
                       metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write edit's outputs: the edited image, the reconstruction, a sheet (input | reconstruction |
    edit) and the edited W+ code. Records: {"path", "role" (edited|reconstruction|sheet|latent)}."""
    out_dir = check_output_dir(out_dir)
    import re

    safe_stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:40] or "image"  # file stems need no hash
    base = f"{safe_stem}_{slugify(edit_label, 40)}"
    meta = dict(metadata or {})
    outputs = [
        ("edited", out_dir / f"{base}_edited.png", edited[:1]),
        ("reconstruction", out_dir / f"{base}_reconstruction.png", reconstruction[:1]),
        ("sheet", out_dir / f"{base}_sheet.png",
         make_grid(_cat([source[:1], reconstruction[:1], edited[:1]]), columns=3)),
    ]
    records = []
    for role, path, image in outputs:
        path = save_png(path, image, {**meta, "role": role}, no_clobber=True)
        records.append({"path": str(path), "role": role})
    latent_path = save_latent(out_dir / f"{base}_edited.safetensors", w_plus_edited[:1], {**meta, "role": "latent"},
                              no_clobber=True)
    records.append({"path": str(latent_path), "role": "latent"})
    return records


def write_interpolation_outputs(out_dir: str | Path | None, name: str, frames: "torch.Tensor",
                                gif: str | Path | None = None, mp4: str | Path | None = None, fps: float = 12.0,
                                metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write interpolation frames (`<name>_<i:03d>.png` in out_dir, when given) and the GIF / MP4.

    Records: {"path", "role" (frame|gif|mp4), "index" for frames}. The MP4 encoder is checked first,
    so a missing encoder fails before anything is written.
    """
    if mp4 is not None:
        require_mp4_encoder()
    records: list[dict[str, Any]] = []
    if out_dir is not None:
        directory = check_output_dir(out_dir)
        for index in range(frames.shape[0]):
            path = save_png(directory / f"{name}_{index:03d}.png", frames[index:index + 1],
                            {**(metadata or {}), "frame": str(index)}, no_clobber=True)
            records.append({"path": str(path), "role": "frame", "index": index})
    pixels = list(to_uint8(frames))
    if gif is not None:
        records.append({"path": str(save_gif(gif, pixels, fps=fps)), "role": "gif"})
    if mp4 is not None:
        records.append({"path": str(save_mp4(mp4, pixels, fps=fps)), "role": "mp4"})
    return records


def edit_label(edits, neutrals_used) -> tuple[str, str]:
    """(file label, metadata neutral) of an edit: one shared neutral is named once, else each edit's own."""
    if len(set(neutrals_used)) == 1:
        shared = neutrals_used[0]
        return "+".join(f"{t}:{b:g}" for t, b in edits) + (f"-vs-{shared}" if shared else ""), shared or ""
    return ("+".join(f"{t}:{b:g}" + (f"-vs-{n}" if n else "") for (t, b), n in zip(edits, neutrals_used)),
            "; ".join(n or "" for n in neutrals_used))


def layers_label(layers) -> str:
    """The W+ rows an edit moved, as metadata: "all" or "START:STOP"."""
    return "all" if layers is None else ":".join("" if v is None else str(v) for v in layers)


def _cat(tensors):
    import torch

    return torch.cat(list(tensors))
