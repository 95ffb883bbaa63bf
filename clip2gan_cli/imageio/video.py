"""Animations: GIF (Pillow) and MP4 (PyAV or imageio-ffmpeg), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserInputError
from ..fileutil import atomic_path
from .images import as_pil


def save_gif(path: str | Path, frames: Sequence, fps: float = 12.0, loop: int = 0) -> Path:
    """Write an animated GIF (Pillow) atomically; `frames` are images as accepted by `save_image`."""
    pil_frames = [as_pil(frame) for frame in frames]
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


def require_mp4_encoder() -> str:
    """The MP4 encoder package `save_mp4` will use; UserInputError when none is installed."""
    encoder = mp4_encoder()
    if encoder is None:
        raise UserInputError("writing MP4 needs an encoder package, and none is installed",
                             hint="pip install av (or imageio-ffmpeg), or use `gif`")
    return encoder


def save_mp4(path: str | Path, frames: Sequence, fps: float = 24.0) -> Path:
    """Write an H.264 MP4 atomically with PyAV or imageio-ffmpeg; a clear error when neither is installed."""
    encoder = require_mp4_encoder()
    arrays = [np.asarray(as_pil(frame)) for frame in frames]
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
