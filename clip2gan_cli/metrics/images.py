"""Image files in, uint8 RGB tensors out: the one way every metric reads real and generated images.

Each file is read by `imageio.read_image` as 8-bit RGB (as torch-fidelity's folder input does);
files it refuses (corrupt, not an image, under 16 px, decompression bombs) are skipped and counted
by the callers. Generated images are quantised to 8 bits exactly as a saved PNG, so a metric of
images generated on the fly equals the metric of the written files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserInputError

if TYPE_CHECKING:
    import torch

# File extensions read from a folder (lower-cased suffix, without the dot).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name.

    Raises UserInputError when the folder is missing, not a folder, or holds no image file.
    """
    directory = Path(folder)
    if not directory.exists():
        raise UserInputError(f"image folder {directory} does not exist")
    if not directory.is_dir():
        raise UserInputError(f"{directory} is not a folder")
    files = sorted(
        (path for path in directory.iterdir()
         if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
        key=lambda path: path.name,
    )
    if not files:
        raise UserInputError(f"image folder {directory} holds no images",
                             hint=f"expected files ending in {', '.join('.' + e for e in IMAGE_EXTENSIONS)}")
    return files


def read_rgb_uint8(path: str | os.PathLike) -> "torch.Tensor":
    """One image file as a uint8 tensor [3, H, W] via the project's safe reader (ImageError if unreadable)."""
    import numpy as np
    import torch

    from ..imageio import read_image

    array = np.asarray(read_image(path), dtype=np.uint8)  # [H, W, 3], 8-bit RGB
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def images_to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """Quantise generator output in [-1, 1] to uint8 exactly as a saved PNG would hold it."""
    import torch

    from ..imageio import to_uint8

    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
