"""Face alignment: MTCNN's five landmarks, then NVIDIA's FFHQ crop."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageError
from .images import to_rgb

if TYPE_CHECKING:
    from PIL import Image


@functools.lru_cache(maxsize=1)
def _mtcnn():
    """facenet-pytorch's MTCNN (its P/R/O-net weights ship inside the package: works offline)."""
    import torch
    from facenet_pytorch import MTCNN

    from ..device import place_model

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
        raise ImageError(f"no face found in {source}; use `align=False`")
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
