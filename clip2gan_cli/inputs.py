"""What generate / edit / interpolate start from, as the models need it.

An image file becomes a [1, 3, R, R] tensor (face packs align it), a latent file a W+ code, and an
interpolation endpoint (a prompt, an image or a latent file) its W+ code. This sits above
`pipeline` (it maps images and prompts through it) and reads files with `imageio`; the `models`
argument is what `packs.select_models` returns (generator, clip, mapper, is_face_pack).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import imageio, pipeline
from .errors import ImageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LATENT_SUFFIX = ".safetensors"


def face_alignment(models, align: bool | None = None) -> bool:
    """Whether input images are face-aligned: `align` when given, else for face packs only."""
    return models.is_face_pack if align is None else align


def load_image(path: str | Path, models, align: bool | None = None) -> "torch.Tensor":
    """An image file at the generator's resolution, [1, 3, R, R] in [-1, 1] (see `face_alignment`)."""
    return imageio.load_image_tensor(path, models.generator.img_resolution, align=face_alignment(models, align))


def load_start_latent(path: str | Path | None, models) -> "torch.Tensor | None":
    """The first W+ code of a latent file as [1, num_ws, w_dim] (None without a file)."""
    if path is None:
        return None
    return imageio.load_latent(path, models.generator.num_ws, models.generator.w_dim)[:1]


def is_file(spec: str) -> bool:
    """Path(spec).is_file(), False where spec cannot be a path at all (a long prompt: ENAMETOOLONG)."""
    try:
        return Path(spec).is_file()
    except (OSError, ValueError):
        return False


def is_image_endpoint(spec: str) -> bool:
    """An existing file with a suffix other than .safetensors: `endpoint_latent` reads it as an image."""
    path = Path(spec)
    return path.suffix.lower() != LATENT_SUFFIX and is_file(spec) and bool(path.suffix)


def needs_image_encoder(*specs: str) -> bool:
    """Whether any endpoint is an image (without one, a text-only CLIP is enough)."""
    return any(is_image_endpoint(spec) for spec in specs)


def endpoint_latent(spec: str, models, align: bool | None = None, prior: str | None = None,
                    seed: int = 0) -> "torch.Tensor":
    """W+ [1, num_ws, w_dim] of an interpolation endpoint: a latent file, an image, or a prompt.

    A prompt is mapped with `prior` (default: the mapper's) as `generate`'s first sample of `seed`
    would be, without feature noise (`pipeline.prompt_latents`).
    """
    path = Path(spec)
    if path.suffix.lower() == LATENT_SUFFIX:
        return load_start_latent(path, models)
    if is_image_endpoint(spec):
        return pipeline.invert(models.clip, models.mapper, load_image(path, models, align))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ImageError(f"image not found: {path}")
    return pipeline.prompt_latents(models.clip, models.mapper, [spec], prior=prior, seed=seed)


def interpolation_name(a: str, b: str) -> str:
    """The file-name stem of an interpolation's frames: `interp_<A>_to_<B>` (file stems, else the prompts)."""
    def label(spec: str) -> str:
        return imageio.slugify(Path(spec).stem if is_file(spec) else spec, 24)

    return f"interp_{label(a)}_to_{label(b)}"
