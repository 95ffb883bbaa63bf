"""Diversity: mean perceptual distance between images generated for the same prompt.

`diversity_lpips` is the mean LPIPS (Zhang et al. 2018, AlexNet trunk, v0.1 linear heads) over
all pairs among the first `DIVERSITY_SAMPLE` images of each prompt, averaged over pairs of all
prompts. The AlexNet trunk comes from the registry (`torchvision-alexnet`), the linear heads ship
inside the `lpips` package; nothing is downloaded by lpips or torchvision themselves.

Fallback: when the AlexNet weights are not available (offline and not in the cache), the same
pairs are scored by `diversity_l1`, the mean absolute pixel difference of images scaled to
[0, 1]. It is reported under its own key, never as LPIPS, since the two are not comparable.
"""
from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import DownloadError, UserInputError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch

# All pairs among this many images per prompt (120 pairs); bounds the cost for large -n.
DIVERSITY_SAMPLE = 16
# LPIPS' AlexNet trunk needs a few pixels after its pooling; smaller images are upsampled to this.
LPIPS_MIN_SIZE = 64
LPIPS_BACKBONE_WEIGHTS = "torchvision-alexnet"


def load_lpips(device: "torch.device | str" = "cpu", backbone_path=None, progress: bool = True):
    """LPIPS (AlexNet, v0.1) with the registry's AlexNet trunk; frozen, eval mode, on `device`.

    Raises WeightsNotFoundError / DownloadError when the trunk weights cannot be had.
    """
    import torch
    import lpips

    from .. import weights
    from ..device import place_model
    from ..errors import CheckpointError

    if backbone_path is None:
        backbone_path = weights.fetch(LPIPS_BACKBONE_WEIGHTS, progress=progress)
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    alexnet_state = torch.load(backbone_path, map_location="cpu", weights_only=True)
    # lpips splits torchvision's `features` into slices that keep the original indices as names.
    trunk_state = {}
    for name in model.net.state_dict():
        _slice, index, param = name.split(".")
        key = f"features.{index}.{param}"
        if key not in alexnet_state:
            raise CheckpointError(f"{backbone_path} is not a torchvision AlexNet state dict (no {key})")
        trunk_state[name] = alexnet_state[key]
    model.net.load_state_dict(trunk_state)
    return place_model(model, torch.device(device))


def lpips_distance(lpips_model) -> Callable:
    """A distance fn(images_a, images_b) -> [N] for images in [-1, 1] using `lpips_model`."""
    import torch
    import torch.nn.functional as F

    def distance(images_a: "torch.Tensor", images_b: "torch.Tensor") -> "torch.Tensor":
        device = next(lpips_model.parameters()).device
        images_a, images_b = images_a.to(device).float(), images_b.to(device).float()
        if min(images_a.shape[-2:]) < LPIPS_MIN_SIZE:  # same bilinear upsampling for both sides
            size = (max(LPIPS_MIN_SIZE, images_a.shape[-2]), max(LPIPS_MIN_SIZE, images_a.shape[-1]))
            images_a = F.interpolate(images_a, size=size, mode="bilinear", align_corners=False)
            images_b = F.interpolate(images_b, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return lpips_model(images_a, images_b).flatten().cpu()

    return distance


def l1_distance(images_a: "torch.Tensor", images_b: "torch.Tensor") -> "torch.Tensor":
    """Mean absolute pixel difference per pair, images in [-1, 1] measured on a [0, 1] scale."""
    return ((images_a.float() - images_b.float()).abs().flatten(1).mean(dim=1) / 2.0).cpu()


def mean_pairwise_distance(images_by_prompt: Sequence["torch.Tensor"], distance: Callable,
                           batch_size: int = 32) -> float | None:
    """Mean `distance` over all pairs among the first DIVERSITY_SAMPLE images of each prompt.

    Images are [N, 3, H, W] in [-1, 1] (uint8 is accepted). Returns None when no prompt has two images.
    """
    import torch

    values = []
    for images in images_by_prompt:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        images = images[:DIVERSITY_SAMPLE]
        pairs = list(itertools.combinations(range(images.shape[0]), 2))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            first = images[[i for i, _ in chunk]]
            second = images[[j for _, j in chunk]]
            values.append(distance(first, second).float())
    if not values:
        return None
    return float(torch.cat(values).mean())


def diversity(images_by_prompt: Sequence["torch.Tensor"], device: "torch.device | str" = "cpu",
              batch_size: int = 32, progress: bool = True, warn: Callable[[str], None] | None = None) -> dict:
    """{'diversity_lpips': x} or, when LPIPS weights are unavailable, {'diversity_l1': x, 'diversity_note': ...}.

    Empty dict when no prompt has at least two images.
    """
    if any(images.ndim != 4 for images in images_by_prompt):
        raise UserInputError("diversity expects one [N, 3, H, W] batch per prompt")
    if not any(images.shape[0] >= 2 for images in images_by_prompt):
        return {}
    try:
        distance = lpips_distance(load_lpips(device, progress=progress))
        key, note = "diversity_lpips", None
    except (WeightsNotFoundError, DownloadError) as error:
        distance, key = l1_distance, "diversity_l1"
        note = f"LPIPS unavailable ({error.one_line()}); pixel L1 on a [0, 1] scale reported instead"
        if warn is not None:
            warn(f"Warning: {note}")
    value = mean_pairwise_distance(images_by_prompt, distance, batch_size=batch_size)
    result = {key: value}
    if note:
        result["diversity_note"] = note
    return result
