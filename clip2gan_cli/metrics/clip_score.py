"""CLIP score and R-precision: how well images match their prompt, in a scoring CLIP space.

The usual convention (Hessel et al. 2021 with w = 100, as torchmetrics' `CLIPScore`):
score(image, prompt) = 100 * max(cos(E_I(image), E_T(prompt)), 0); a set's score is the mean over
all its images. Images are scored exactly as they would be saved (quantised to 8 bits), so a
score computed on the fly equals one computed from the written PNGs.

R-precision: the share of generated images whose own prompt is the scoring CLIP's strict best
match among the evaluated prompt set (chance: 1 / number of prompts). Both are biased upward
when the scoring CLIP is the one that conditions the generator; `evaluate` says which it is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import UserInputError

if TYPE_CHECKING:
    import torch

CLIP_SCORE_SCALE = 100.0


def clip_scores(clip_model, prompt: str, images: "torch.Tensor", batch_size: int = 32) -> "torch.Tensor":
    """Per-image CLIP scores [N] of `images` ([N, 3, H, W] in [-1, 1], or uint8) against `prompt`."""
    import torch

    if images.ndim != 4 or images.shape[0] == 0:
        raise UserInputError(f"expected a non-empty image batch [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], encode_image's range
    with torch.no_grad():
        clip_text_features = clip_model.encode_text([prompt])  # [1, D], L2-normalised
        scores = []
        for start in range(0, images.shape[0], batch_size):
            clip_image_features = clip_model.encode_image(images[start:start + batch_size])
            cosine = (clip_image_features @ clip_text_features.T).squeeze(1)
            scores.append(CLIP_SCORE_SCALE * cosine.clamp(min=0).float().cpu())
    return torch.cat(scores)


def mean_clip_score(per_prompt_scores: Sequence["torch.Tensor"]) -> float:
    """Mean over every image of every prompt (prompts with more images weigh more)."""
    import torch

    if not per_prompt_scores:
        raise UserInputError("no images to score")
    return float(torch.cat([scores.flatten() for scores in per_prompt_scores]).mean())


def prompt_ranked_first(clip_model, prompts: Sequence[str], images: "torch.Tensor", prompt_index: int,
                        batch_size: int = 32) -> "torch.Tensor":
    """R-precision hits [N]: is `prompts[prompt_index]` the scoring CLIP's strict best match of each image?

    Ties with another prompt count as misses, so a CLIP that cannot tell prompts apart scores 0, not 1.
    """
    import torch

    if len(prompts) < 2:
        raise UserInputError("R-precision needs at least 2 prompts to rank")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    with torch.no_grad():
        text = clip_model.encode_text(list(prompts))  # [P, D], L2-normalised
        hits = []
        for start in range(0, images.shape[0], batch_size):
            similarity = clip_model.encode_image(images[start:start + batch_size]) @ text.T  # [B, P]
            own = similarity[:, prompt_index]
            others = torch.cat([similarity[:, :prompt_index], similarity[:, prompt_index + 1:]], dim=1)
            hits.append((own > others.max(dim=1).values).cpu())
    return torch.cat(hits)
