"""Image files: safe reading into 8-bit RGB, conversion to and from tensors, grids, PNG / JPEG writing.

Reading refuses anything that is not a plain, reasonably sized picture with one `ImageError` line
(missing, zero bytes, not an image, truncated, decompression bomb, smaller than 16 px) and turns
every odd mode (CMYK, 16-bit, grayscale, palette, alpha, animated) into 8-bit RGB.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ImageError, UserInputError, first_line
from .publish import write_output

if TYPE_CHECKING:  # torch and PIL are imported where used
    import torch
    from PIL import Image

MIN_SIDE = 16                      # smaller inputs carry no usable content
MAX_PIXELS = 40_000_000            # ~ 6300 x 6300; above this decoding could exhaust memory
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def read_image(path: str | Path) -> "Image.Image":
    """Open an image file as 8-bit RGB (first frame of an animation), or raise ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror or error}") from error
    if size == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size  # header only: checked before any pixel is decoded
            if width * height > MAX_PIXELS:
                raise ImageError(f"{path} is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit "
                                 "(possible decompression bomb)")
            if min(width, height) < MIN_SIDE:
                raise ImageError(f"{path} is {width}x{height}; images must be at least {MIN_SIDE} px on each side")
            image.seek(0)
            image.load()
            if image.format == "PNG":
                _check_png_rows(path)
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except PermissionError as error:
        raise ImageError(f"cannot read {path}: permission denied") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{path} is not an image (or not a format Pillow reads)") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path} is too large to decode safely (decompression bomb)") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's ways of saying "broken file"
        raise ImageError(f"{path} is truncated or corrupt: {first_line(error, 120)}") from error


PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _check_png_rows(path: Path) -> None:
    """ImageError unless the PNG's image data holds every row its header declares.

    Pillow stops quietly where the compressed stream ends, so a forged header (a larger size over the
    same data) would read as an image whose missing rows are blank. Interlaced files are left to Pillow.
    """
    import struct
    import zlib

    data = path.read_bytes()
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if interlace or colour not in PNG_CHANNELS:
        return
    expected = height * (1 + math.ceil(width * PNG_CHANNELS[colour] * depth / 8))
    stream, offset = zlib.decompressobj(), 8
    decoded = 0
    while offset + 8 <= len(data) and decoded < expected:
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            try:  # bounded: never more than the rows still missing
                decoded += len(stream.decompress(data[offset + 8:offset + 8 + length], expected - decoded))
            except zlib.error:
                break
        elif kind == b"IEND":
            break
        offset += 12 + length
    if decoded < expected:
        raise ImageError(f"{path} is truncated or corrupt: its image data holds {decoded:,} of the "
                         f"{expected:,} bytes its {width}x{height} header declares")


def to_rgb(image: "Image.Image") -> "Image.Image":
    """8-bit RGB from any Pillow mode: 16/32-bit and float scaled, alpha composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(float(values.max(initial=0)), 1.0) if values.max(initial=0) > 1.0 else 1.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def center_crop_resize(image: "Image.Image", resolution: int) -> "Image.Image":
    """Centre square crop, then Lanczos resize to `resolution` x `resolution`."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.LANCZOS)
    return square


def pil_to_tensor(image: "Image.Image") -> "torch.Tensor":
    """RGB PIL image -> float tensor [1, 3, H, W] in [-1, 1]."""
    import torch

    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def load_image_tensor(path: str | Path, resolution: int, align: bool = False) -> "torch.Tensor":
    """Read, optionally face-align, crop and resize an image to [1, 3, R, R] in [-1, 1]."""
    from .faces import align_face  # faces builds on this module's conversions

    image = read_image(path)
    image = align_face(image, resolution, source=str(path)) if align else center_crop_resize(image, resolution)
    return pil_to_tensor(image)


def to_uint8(images: "torch.Tensor") -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (clamped, rounded: deterministic)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to("cpu")
    return pixels.byte().permute(0, 2, 3, 1).numpy()


def make_grid(images: "torch.Tensor", columns: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> "torch.Tensor":
    """Tile [N, 3, H, W] images into one [1, 3, H', W'] image (same value range), `columns` wide."""
    import torch

    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = images.new_full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding),
                           pad_value)
    for index in range(count):
        row, col = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top:top + height, left:left + width] = images[index]
    return grid.unsqueeze(0) if isinstance(grid, torch.Tensor) else grid


def as_pil(image) -> "Image.Image":
    """A PIL image from a PIL image, a uint8 HWC array or a [1, 3, H, W] / [3, H, W] tensor in [-1, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8), "RGB")
    tensor = image if image.ndim == 4 else image.unsqueeze(0)
    return Image.fromarray(to_uint8(tensor[:1])[0], "RGB")


def save_image(path: str | Path, image, format: str | None = None, metadata: dict[str, Any] | None = None,
               no_clobber: bool = False) -> Path:
    """Write one image atomically as PNG (metadata as tEXt chunks) or JPEG (metadata as a JSON comment).

    Returns the path written (with `no_clobber`, possibly `<stem>-N<suffix>`: see `publish_new_file`).
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    fmt = (format or path.suffix.lstrip(".") or "png").lower()
    if fmt not in IMAGE_FORMATS:
        raise UserInputError(f"unknown image format '{fmt}'", hint="use png or jpg")
    pil = as_pil(image)

    def write(tmp: Path) -> None:
        if IMAGE_FORMATS[fmt] == "PNG":
            info = PngInfo()
            for key, value in (metadata or {}).items():
                info.add_itxt(str(key), value if isinstance(value, str) else json.dumps(value, sort_keys=True))
            pil.save(tmp, format="PNG", pnginfo=info)
        else:
            comment = json.dumps(metadata or {}, sort_keys=True).encode("utf-8")
            pil.save(tmp, format="JPEG", quality=95, comment=comment)

    return write_output(path, write, no_clobber)


def save_png(path: str | Path, image, metadata: dict[str, Any] | None = None, no_clobber: bool = False) -> Path:
    """Write a PNG atomically with `metadata` as text chunks (read back with `read_png_metadata`)."""
    return save_image(path, image, "png", metadata, no_clobber)


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by `save_png`."""
    from PIL import Image

    with Image.open(path) as image:
        return dict(getattr(image, "text", {}) or {})
