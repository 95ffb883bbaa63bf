"""Image and latent files: safe reading, face alignment, grids, PNG metadata, GIF/MP4, atomic writes.

Reading refuses anything that is not a plain, reasonably sized picture with one `ImageError` line
(missing, zero bytes, not an image, truncated, decompression bomb, smaller than 16 px) and turns
every odd mode (CMYK, 16-bit, grayscale, palette, alpha, animated) into 8-bit RGB.
Every write goes through `fileutil.atomic_path`: a failed or interrupted write leaves nothing behind.
Command outputs (generate / edit / interpolate) are written with `no_clobber=True`: a deterministic
name that already holds different bytes (another run, another process) is never replaced; the new
file gets `-2`, `-3`, ... instead, and the records name the file actually written.
"""
from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import itertools
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import CheckpointError, ImageError, OutputError, UserInputError, first_line
from .fileutil import atomic_path

if TYPE_CHECKING:  # torch and PIL are imported where used
    import torch
    from PIL import Image

MIN_SIDE = 16                      # smaller inputs carry no usable content
MAX_PIXELS = 40_000_000            # ~ 6300 x 6300; above this decoding could exhaust memory
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
LATENT_KEY = "w_plus"


# --- reading ---
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
    image = read_image(path)
    image = align_face(image, resolution, source=str(path)) if align else center_crop_resize(image, resolution)
    return pil_to_tensor(image)


# --- faces ---
@functools.lru_cache(maxsize=1)
def _mtcnn():
    """facenet-pytorch's MTCNN (its P/R/O-net weights ship inside the package: works offline)."""
    import torch
    from facenet_pytorch import MTCNN

    from .device import place_model

    detector = MTCNN(keep_all=True, select_largest=True, device=torch.device("cpu"))
    return place_model(detector, torch.device("cpu"))


def detect_face_landmarks(image: "Image.Image") -> np.ndarray | None:
    """Five landmarks [5, 2] (left eye, right eye, nose, left/right mouth corner) of the largest face."""
    import torch

    with torch.no_grad():
        boxes, probs, landmarks = _mtcnn().detect(to_rgb(image), landmarks=True)
    if boxes is None or len(boxes) == 0:
        return None
    return np.asarray(landmarks[0], dtype=np.float64)  # select_largest: the biggest face comes first


def align_face(image: "Image.Image", output_size: int = 1024, source: str = "image") -> "Image.Image":
    """Detect the face with MTCNN and crop/rotate it like FFHQ (NVIDIA's ffhq-dataset recipe).

    The FFHQ recipe builds an oriented square from the eye centres and mouth corners; MTCNN gives
    those five points directly. Raises ImageError when no face is found.
    """
    landmarks = detect_face_landmarks(image)
    if landmarks is None:
        raise ImageError(f"no face found in {source}; use --no-align")
    eye_left, eye_right, _, mouth_left, mouth_right = landmarks
    return _ffhq_crop(image, eye_left, eye_right, mouth_left, mouth_right, output_size)


def _ffhq_crop(image: "Image.Image", eye_left, eye_right, mouth_left, mouth_right, output_size: int):
    from PIL import Image

    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    # Oriented crop rectangle (ffhq-dataset/download_ffhq.py, recreate_aligned_images).
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    center = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([center - x - y, center - x + y, center + x + y, center + x - y])
    quad_size = np.hypot(*x) * 2
    # Shrink first so the final resampling does not alias.
    shrink = int(np.floor(quad_size / output_size * 0.5))
    if shrink > 1:
        image = image.resize((int(np.rint(image.size[0] / shrink)), int(np.rint(image.size[1] / shrink))),
                             Image.LANCZOS)
        quad /= shrink
    # Reflect-pad where the rectangle leaves the picture (FFHQ pads too, instead of black corners).
    pad = int(np.ceil(max(0.0, -quad.min(), quad[:, 0].max() - image.size[0], quad[:, 1].max() - image.size[1])))
    if pad > 0:
        array = np.asarray(image)
        pad = min(pad, min(array.shape[:2]) - 1)  # numpy's reflect mode needs pad < side
        array = np.pad(array, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        image = Image.fromarray(array)
        quad = quad + pad
    transform_size = output_size * 2 if quad_size > output_size else output_size
    aligned = image.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if transform_size != output_size:
        aligned = aligned.resize((output_size, output_size), Image.LANCZOS)
    return aligned


# --- tensors -> pixels ---
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


def _as_pil(image) -> "Image.Image":
    """A PIL image from a PIL image, a uint8 HWC array or a [1, 3, H, W] / [3, H, W] tensor in [-1, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8), "RGB")
    tensor = image if image.ndim == 4 else image.unsqueeze(0)
    return Image.fromarray(to_uint8(tensor[:1])[0], "RGB")


# --- writing ---
def publish_new_file(source: Path, path: Path) -> Path:
    """Give the finished file `source` the name `path` without ever replacing a different file.

    A hard link claims a name atomically (it fails when the name exists), so two processes that
    write the same deterministic name cannot overwrite each other. When `path` already holds the
    same bytes it is kept (a rerun changes nothing); when it holds other bytes the file is published
    as `<stem>-2<suffix>`, `-3`, ... Returns the name used; `source` is left for the caller to remove.
    """
    for number in itertools.count(1):
        candidate = path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        try:
            os.link(source, candidate)
            return candidate
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise OutputError(f"cannot write {candidate}: {error.strerror or error}") from error
            if not candidate.exists():  # no hard links on this file system: check, then rename (racy)
                os.replace(source, candidate)
                return candidate
        if candidate.is_file() and filecmp.cmp(source, candidate, shallow=False):
            return candidate


def _write_output(path: Path, write, no_clobber: bool) -> Path:
    """Run `write(tmp)` on a temp file, then publish it at `path` (replacing it) or, with
    `no_clobber`, through `publish_new_file`. Returns the path written."""
    if not no_clobber:
        with atomic_path(path) as tmp:
            write(tmp)
        return path
    staged = path.with_name(f".{path.name}.{secrets.token_hex(6)}.staged")  # complete, fsynced, hidden
    try:
        with atomic_path(staged) as tmp:
            write(tmp)
        return publish_new_file(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


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
    pil = _as_pil(image)

    def write(tmp: Path) -> None:
        if IMAGE_FORMATS[fmt] == "PNG":
            info = PngInfo()
            for key, value in (metadata or {}).items():
                info.add_itxt(str(key), value if isinstance(value, str) else json.dumps(value, sort_keys=True))
            pil.save(tmp, format="PNG", pnginfo=info)
        else:
            comment = json.dumps(metadata or {}, sort_keys=True).encode("utf-8")
            pil.save(tmp, format="JPEG", quality=95, comment=comment)

    return _write_output(path, write, no_clobber)


def save_png(path: str | Path, image, metadata: dict[str, Any] | None = None, no_clobber: bool = False) -> Path:
    """Write a PNG atomically with `metadata` as text chunks (read back with `read_png_metadata`)."""
    return save_image(path, image, "png", metadata, no_clobber)


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by `save_png`."""
    from PIL import Image

    with Image.open(path) as image:
        return dict(getattr(image, "text", {}) or {})


def save_gif(path: str | Path, frames: Sequence, fps: float = 12.0, loop: int = 0) -> Path:
    """Write an animated GIF (Pillow) atomically; `frames` are images as accepted by `save_image`."""
    pil_frames = [_as_pil(frame) for frame in frames]
    if not pil_frames:
        raise UserInputError("no frames to write")
    with atomic_path(path) as tmp:
        pil_frames[0].save(tmp, format="GIF", save_all=True, append_images=pil_frames[1:],
                           duration=int(round(1000 / fps)), loop=loop, optimize=False)
    return Path(path)


def mp4_encoder() -> str | None:
    """Name of an importable MP4 encoder package ("av" or "imageio_ffmpeg"), or None."""
    import importlib.util

    for name in ("av", "imageio_ffmpeg"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def save_mp4(path: str | Path, frames: Sequence, fps: float = 24.0) -> Path:
    """Write an H.264 MP4 atomically with PyAV or imageio-ffmpeg; a clear error when neither is installed."""
    encoder = mp4_encoder()
    if encoder is None:
        raise UserInputError("writing MP4 needs an encoder package, and none is installed",
                             hint="pip install av (or imageio-ffmpeg), or use --gif")
    arrays = [np.asarray(_as_pil(frame)) for frame in frames]
    if not arrays:
        raise UserInputError("no frames to write")
    height, width = arrays[0].shape[:2]
    with atomic_path(path) as tmp:
        if encoder == "av":
            import av

            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=int(round(fps)))
                stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
                for array in arrays:
                    array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
                    for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        else:
            import imageio_ffmpeg

            writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=fps, output_params=["-f", "mp4"],
                                                 macro_block_size=1)
            writer.send(None)
            for array in arrays:
                writer.send(np.ascontiguousarray(array))
            writer.close()
    return Path(path)


# --- latent codes ---
def save_latent(path: str | Path, w_plus: "torch.Tensor", metadata: dict[str, Any] | None = None,
                no_clobber: bool = False) -> Path:
    """Write W+ codes [N, num_ws, w_dim] (or one [num_ws, w_dim]) as safetensors, atomically; returns the path.

    The same codes and metadata always give the same bytes (see `_safetensors_bytes`).
    """
    header = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    data = _safetensors_bytes({LATENT_KEY: w_plus.detach().float().to("cpu").contiguous()}, header)
    return _write_output(Path(path), lambda tmp: tmp.write_bytes(data), no_clobber)


def _safetensors_bytes(tensors: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted.

    safetensors writes its metadata map in a different order from call to call, so equal latents
    would give different files (and a rerun of generate could not recognise its own output).
    """
    import struct

    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
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


def check_output_dir(path: str | Path) -> Path:
    """The output directory, created if needed; OutputError when it cannot be written."""
    from .fileutil import ensure_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    return ensure_writable_dir(path)


# --- command outputs (file names, metadata, one record per written file) ---
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
    if mp4 is not None and mp4_encoder() is None:
        save_mp4(mp4, [])  # raises the "needs an encoder package" error
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


def _cat(tensors):
    import torch

    return torch.cat(list(tensors))


def read_prompt_args(prompts: Sequence[str], stdin=None) -> list[str]:
    """The prompts of a command line: each `-` is replaced by the non-empty lines of stdin (UTF-8)."""
    texts: list[str] = []
    for prompt in prompts:
        if prompt != "-":
            texts.append(prompt)
            continue
        import sys

        stream = stdin if stdin is not None else sys.stdin
        raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserInputError(f"stdin is not UTF-8 text (byte {error.start})") from error
        texts.extend(line.strip() for line in raw.splitlines() if line.strip())
        if not texts:
            raise UserInputError("no prompts on stdin", hint="give one prompt per line")
    return texts
