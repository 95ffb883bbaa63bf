"""Image -> feature maps of the metrics: torch-fidelity's Inception and DINOv2 extractors, the pack's CLIP.

How images reach an extractor (the same for real and fake sets, so sizes never bias a metric):
images are uint8 RGB [N, 3, H, W], batched with others of the same size, and resized to the
extractor's input by one of two named conventions (`fid_mode`):

- legacy (NVIDIA's, what StyleGAN papers and torch-fidelity report): the uint8 image goes into
  torch-fidelity's extractor, which resizes it with its TensorFlow-1.x compatible bilinear
  interpolation (no antialiasing; a non-square image is stretched).
- clean (clean-fid's, what GigaGAN and StyleGAN-T report): clean-fid's own resizer (PIL bicubic,
  antialiased, on each channel in float32, no re-quantisation afterwards) makes the extractor's
  input size, and that float image goes into the same torch-fidelity extractor, whose own resize
  is then the identity.

The two agree exactly for images already at the extractor's input size (299x299 for Inception,
224x224 for DINOv2): both resizes are then the identity (tested). The CLIP space has one
convention of its own: the pack's `encode_image` preprocessing (centre square crop, antialiased
bicubic resize), so `fid_mode` does not apply to it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import CheckpointError, UserInputError, WeightsNotFoundError, first_line
from ..fileutil import sha256_file

if TYPE_CHECKING:
    import torch

FID_MODES = ("legacy", "clean")
# torch-fidelity's Inception layer used for FID and KID (pool3, 2048-d).
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_INPUT_SIZE = 299
# torch-fidelity's DINOv2 extractors (name -> timm architecture of the same network).
DINOV2_ARCHITECTURES = {"dinov2-vit-s-14": "vit_small_patch14_dinov2", "dinov2-vit-b-14": "vit_base_patch14_dinov2",
                        "dinov2-vit-l-14": "vit_large_patch14_dinov2", "dinov2-vit-g-14": "vit_giant_patch14_dinov2"}
DINOV2_INPUT_SIZE = 224
DINOV2_PATCH = 14
# DINOv2's hub models add this to the target grid before computing the position-embedding scale.
DINOV2_INTERPOLATE_OFFSET = 0.1


def resize_description(mode: str, size: int) -> str:
    """The exact resize of a convention, as the report and the cache key name it."""
    if mode == "legacy":
        return f"torch-fidelity TF1.x-compatible bilinear to {size}x{size} (no antialias) of uint8 images"
    from importlib import metadata

    return (f"clean-fid {metadata.version('clean-fid')} PIL bicubic (antialiased, float32 per channel, "
            f"not re-quantised) to {size}x{size} of uint8 images")


def clean_resize(batch_uint8: "torch.Tensor", size: int) -> "torch.Tensor":
    """clean-fid's resizer (`make_resizer("PIL", False, "bicubic", ...)`, its "clean" mode) on a batch: float32."""
    import numpy as np
    import torch
    from cleanfid.resize import make_resizer

    resizer = make_resizer("PIL", False, "bicubic", (size, size))
    images = [resizer(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())) for image in batch_uint8]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


class FeatureSpace:
    """An image -> feature-vector map: uint8 RGB batches [N, 3, H, W] in, float32 [N, D] out.

    `name` is the `--features` kind; `description` names the exact model and layer; `fid_mode` and
    `resize` the preprocessing. All of them and `weights_sha256` go into the real-folder cache key.
    """

    name: str = ""
    description: str = ""
    weights_sha256: str = ""
    fid_mode: str | None = None
    resize: str = ""

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError


@contextlib.contextmanager
def _torch_fidelity_cannot_download() -> Iterator[None]:
    """Make torch-fidelity's Inception loader fail instead of downloading (belt and braces)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    def refuse(url, *args, **kwargs):
        raise WeightsNotFoundError(f"torch-fidelity tried to download {url}; clip2gan passes weights locally")

    original = inception_module.load_state_dict_from_url
    inception_module.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        inception_module.load_state_dict_from_url = original


@contextlib.contextmanager
def _accepting_float_input(module) -> Iterator[None]:
    """Let a torch-fidelity extractor take clean-fid's float images: only its uint8 dtype check is lifted."""
    original = module.vassert

    def vassert(truth, message):
        if not truth and message.startswith("Expecting image as torch.Tensor with dtype=torch.uint8"):
            return
        original(truth, message)

    module.vassert = vassert
    try:
        yield
    finally:
        module.vassert = original


def _check_mode(mode: str) -> None:
    if mode not in FID_MODES:
        raise UserInputError(f"unknown fid_mode '{mode}'", hint=f"expected one of {', '.join(FID_MODES)}")


def _run_extractor(extractor, module, batch_uint8: "torch.Tensor", mode: str, size: int,
                   device: "torch.device") -> "torch.Tensor":
    """Features of one batch through a torch-fidelity extractor in the given convention."""
    import torch

    with torch.no_grad():
        if mode == "clean":
            with _accepting_float_input(module):
                (features,) = extractor(clean_resize(batch_uint8, size).to(device))
        else:
            (features,) = extractor(batch_uint8.to(device))
    return features.float().cpu()


def _check_plain_state_dict(path: Path, what: str) -> None:
    """torch-fidelity unpickles with weights_only=False: check the file holds only tensors first."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{what} {path} are not a plain state dict; nothing was executed "
                              f"({first_line(error, 160)})") from error


class InceptionFeatureSpace(FeatureSpace):
    """torch-fidelity's `inception-v3-compat` extractor (pool3, 2048-d) with local weights."""

    name = "inception"
    description = f"torch-fidelity inception-v3-compat, layer {INCEPTION_FEATURE_LAYER}"

    def __init__(self, weights_path: str | os.PathLike, device: "torch.device | str" = "cpu",
                 weights_sha256: str | None = None, mode: str = "legacy"):
        import torch
        from torch_fidelity.utils import create_feature_extractor

        from ..device import place_model

        _check_mode(mode)
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise WeightsNotFoundError(f"Inception weights file {weights_path} does not exist",
                                       hint="clip2gan download-weights inception-fid")
        _check_plain_state_dict(weights_path, "Inception weights")
        with _torch_fidelity_cannot_download():
            extractor = create_feature_extractor(
                "inception-v3-compat", [INCEPTION_FEATURE_LAYER], cuda=False,
                feature_extractor_weights_path=str(weights_path), verbose=False)
        self.device = torch.device(device)
        self.extractor = place_model(extractor, self.device)
        self.weights_sha256 = weights_sha256 or sha256_file(weights_path)
        self.fid_mode, self.resize = mode, resize_description(mode, INCEPTION_INPUT_SIZE)

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        import torch_fidelity.feature_extractor_inceptionv3 as module

        return _run_extractor(self.extractor, module, batch_uint8, self.fid_mode, INCEPTION_INPUT_SIZE, self.device)


def dinov2_position_embedding(pos_embed: "torch.Tensor", grid: int) -> "torch.Tensor":
    """DINOv2's hub `interpolate_pos_encoding` (bicubic, no antialias, scale (grid + 0.1) / M) done once."""
    import math

    import torch
    import torch.nn.functional as F

    cls_token, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    side, dim = int(math.sqrt(patches.shape[1])), patches.shape[2]
    if side == grid:
        return pos_embed
    scale = float(grid + DINOV2_INTERPOLATE_OFFSET) / side
    resized = F.interpolate(patches.reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                            antialias=False, scale_factor=(scale, scale))
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_token, resized], dim=1)


def load_dinov2_backbone(weights_path: str | os.PathLike, model: str = "dinov2-vit-l-14"):
    """The DINOv2 ViT from a local file (Meta's `*_pretrain.pth` layout or timm's), built by timm."""
    import timm
    import torch
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsNotFoundError(f"DINOv2 weights file {weights_path} does not exist",
                                   hint=f"clip2gan download-weights {model}")
    try:
        state = dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        backbone = timm.create_model(DINOV2_ARCHITECTURES[model], pretrained=False, num_classes=0,
                                     img_size=DINOV2_INPUT_SIZE)
        state["pos_embed"] = dinov2_position_embedding(state["pos_embed"], DINOV2_INPUT_SIZE // DINOV2_PATCH)
        backbone.load_state_dict(checkpoint_filter_fn(state, backbone))
    except (RuntimeError, KeyError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{weights_path} is not a {model} state dict ({first_line(error, 160)})") from error
    return backbone.eval()


class DinoV2FeatureSpace(FeatureSpace):
    """torch-fidelity's DINOv2 extractor (its preprocessing; CLS token) around a locally loaded backbone.

    torch-fidelity 0.4 gets the network from torch.hub, which downloads code and weights by itself
    and refuses a local weights file; here its `torch.hub.load` call receives the same network,
    built by timm from the registry's file (`load_dinov2_backbone`), so nothing is downloaded.
    """

    name = "dinov2"

    def __init__(self, weights_path=None, device: "torch.device | str" = "cpu", weights_sha256: str | None = None,
                 mode: str = "legacy", model: str = "dinov2-vit-l-14", backbone=None):
        import torch
        from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

        from ..device import place_model

        _check_mode(mode)
        if backbone is None:
            backbone = load_dinov2_backbone(weights_path, model)
        original_load = torch.hub.load
        torch.hub.load = lambda *args, **kwargs: backbone  # torch-fidelity's only way in
        try:
            extractor = FeatureExtractorDinoV2(model, ["dinov2"])
        finally:
            torch.hub.load = original_load
        self.device = torch.device(device)
        self.extractor = place_model(extractor, self.device)
        self.weights_sha256 = weights_sha256 or (sha256_file(weights_path) if weights_path else
                                                 state_dict_sha256(backbone))
        self.description = f"torch-fidelity {model} extractor (CLS token after the final norm), timm backbone"
        self.fid_mode, self.resize = mode, resize_description(mode, DINOV2_INPUT_SIZE)

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        import torch_fidelity.feature_extractor_dinov2 as module

        return _run_extractor(self.extractor, module, batch_uint8, self.fid_mode, DINOV2_INPUT_SIZE, self.device)


class ClipFeatureSpace(FeatureSpace):
    """The pack's CLIP image embedding (L2-normalised, as `ClipModel.encode_image` returns it).

    The Frechet distance in this space is FD_CLIP (Kynkaanniemi et al. 2023).
    """

    name = "clip"

    def __init__(self, clip_model, weights_sha256: str, device: "torch.device | str" = "cpu"):
        import torch

        self.clip = clip_model
        self.device = torch.device(device)
        self.weights_sha256 = weights_sha256
        size = getattr(clip_model, "image_size", "?")
        self.description = f"{getattr(clip_model, 'name', 'clip')} image embedding (L2-normalised, {size} px input)"
        self.resize = f"the CLIP's own preprocessing: centre square crop, antialiased bicubic to {size}x{size}"

    def extract(self, batch_uint8: "torch.Tensor") -> "torch.Tensor":
        import torch

        images = batch_uint8.to(self.device).float() / 127.5 - 1.0  # uint8 -> [-1, 1] (encode_image's range)
        with torch.no_grad():
            features = self.clip.encode_image(images)
        return features.float().cpu()


def state_dict_sha256(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes): identifies its weights."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extract_features(images: Sequence["torch.Tensor"], space: FeatureSpace, batch_size: int = 32) -> "torch.Tensor":
    """Features [N, D] of uint8 images [3, H, W], in input order; same-size images share batches."""
    import torch

    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    indices_by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        indices_by_size.setdefault(tuple(image.shape), []).append(index)
    rows: list = [None] * len(images)
    for indices in indices_by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            features = space.extract(torch.stack([images[i] for i in chunk]))
            for row, index in zip(features, chunk):
                rows[index] = row
    return torch.stack(rows) if rows else torch.zeros(0, 0)
