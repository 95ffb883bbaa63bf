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
    return score_and_rank(clip_model, prompt, images, batch_size)[0]


def mean_clip_score(per_prompt_scores: Sequence["torch.Tensor"]) -> float:
    """Mean over every image of every prompt (prompts with more images weigh more)."""
    import torch

    if not per_prompt_scores:
        raise UserInputError("no images to score")
    return float(torch.cat([scores.flatten() for scores in per_prompt_scores]).mean())


def encode_prompts(clip_model, prompts: Sequence[str]) -> "torch.Tensor":
    """The prompt set's text features [P, D] (L2-normalised) that R-precision ranks against: encode once per set."""
    import torch

    if len(prompts) < 2:
        raise UserInputError("R-precision needs at least 2 prompts to rank")
    with torch.no_grad():
        return clip_model.encode_text(list(prompts))


def prompt_ranked_first(clip_model, prompts: Sequence[str], images: "torch.Tensor", prompt_index: int,
                        batch_size: int = 32) -> "torch.Tensor":
    """R-precision hits [N]: is `prompts[prompt_index]` the scoring CLIP's strict best match of each image?

    Ties with another prompt count as misses, so a CLIP that cannot tell prompts apart scores 0, not 1.
    """
    ranking = (encode_prompts(clip_model, prompts), prompt_index)
    return _score_and_rank(clip_model, images, batch_size, None, ranking)[1]


def score_and_rank(clip_model, prompt: str, images: "torch.Tensor", batch_size: int = 32,
                   ranking: "tuple[torch.Tensor, int] | None" = None) -> tuple:
    """(CLIP scores [N], R-precision hits [N] or None) of `images` for `prompt`, each image encoded once.

    `ranking`: (`encode_prompts` of the prompt set, the index of `prompt` in it) for the hits. The score's
    text is `prompt` encoded alone, as `clip_scores` does (a batched encoding can differ in the last bit).
    """
    import torch

    if images.ndim != 4 or images.shape[0] == 0:
        raise UserInputError(f"expected a non-empty image batch [N, 3, H, W], got {tuple(images.shape)}")
    with torch.no_grad():
        text_features = clip_model.encode_text([prompt])  # [1, D], L2-normalised
    return _score_and_rank(clip_model, images, batch_size, text_features, ranking)


def _score_and_rank(clip_model, images, batch_size: int, text_features, ranking) -> tuple:
    """Scores against `text_features` [1, D] and hits against `ranking` (each where given), one image pass."""
    import torch

    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], encode_image's range
    scores, hits = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            image_features = clip_model.encode_image(images[start:start + batch_size])
            if text_features is not None:
                cosine = (image_features @ text_features.T).squeeze(1)
                scores.append(CLIP_SCORE_SCALE * cosine.clamp(min=0).float().cpu())
            if ranking is not None:
                prompt_features, prompt_index = ranking
                similarity = image_features @ prompt_features.T  # [B, P]
                own = similarity[:, prompt_index]
                others = torch.cat([similarity[:, :prompt_index], similarity[:, prompt_index + 1:]], dim=1)
                hits.append((own > others.max(dim=1).values).cpu())
    return (torch.cat(scores) if text_features is not None else None,
            torch.cat(hits) if ranking is not None else None)
