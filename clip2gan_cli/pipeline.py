"""Pure tensor functions of CLIP2GAN: generate from text, invert and edit images, interpolate W+ codes.

No files, no terminal: every function takes models and tensors and returns tensors, so the CLI
commands are thin and a user can call these directly:

    pack = load_pack("shapes")
    result = generate(pack.generator, pack.clip, pack.mapper, ["a red circle"], n=8, seed=0)

Generator contract (stylegan2.networks.Generator): `synthesis(ws, noise_mode)`, `num_ws`, `w_dim`,
`w_avg`, `img_resolution`. Images are [N, 3, R, R] in [-1, 1].
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import UserInputError
from .mapper import (NEUTRAL_AUTO, check_contrast_sets, check_edit_direction, check_generation_prior,
                     perturb_clip_features)

MAX_NEUTRAL_CANDIDATES = 4096  # texts scored by infer_neutrals for one edit text (product of its sets' sizes)
DEFAULT_EDIT_BETA = 2.0  # an edit's strength when neither the caller nor the mapper file gives one
NEUTRAL_NONE = "none"  # edit's neutral: explicitly none (the paper), whatever the mapper file recommends


@dataclass
class GenerateResult:
    """Output of `generate`: row i is sample `sample_index[i]` of prompt `prompt_index[i]`."""

    images: torch.Tensor        # [P*n, 3, R, R] in [-1, 1] (clamped), on the CPU
    w_plus: torch.Tensor        # [P*n, num_ws, w_dim] after truncation, on the CPU
    prompt_index: torch.Tensor  # [P*n] long: which prompt
    sample_index: torch.Tensor  # [P*n] long: which of its n samples
    prior: str = "text"         # the generation prior used ("text" or "retrieval")


@dataclass
class EditSettings:
    """An edit's arguments with every one the caller left out filled from the mapper file (`edit_settings`)."""

    edits: list          # (text, beta) pairs, every beta a number
    neutral: str | None  # None, a neutral text, or "auto"
    direction: str       # "text" or "image"
    layers: tuple[int | None, int | None] | None  # W+ rows [start, stop) the edit moves; None: all
    contrast_sets: list | None  # the word sets "auto" swaps over (None unless neutral is "auto")


@dataclass
class EditResult:
    """Output of `edit`: the inverted code, its reconstruction, and the edited code and image."""

    w_plus: torch.Tensor          # [N, num_ws, w_dim] inverted (and refined) code
    reconstruction: torch.Tensor  # [N, 3, R, R] G(w_plus)
    w_plus_edited: torch.Tensor   # [N, num_ws, w_dim] w_plus + sum(beta * direction) on the edited rows
    edited: torch.Tensor          # [N, 3, R, R] G(w_plus_edited)
    directions: torch.Tensor      # [len(edits), N, num_ws, w_dim] the direction of each edit text, per image
    neutrals: list = field(default_factory=list)  # [len(edits)][N] the neutral text each direction used (or None)
    settings: EditSettings | None = None  # the arguments the edit ran with, defaults filled in


def validate_prompts(texts: Sequence[str]) -> list[str]:
    """The prompts as a list; UserInputError for none or an empty one."""
    texts = list(texts)
    if not texts:
        raise UserInputError("no prompt given")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise UserInputError("empty prompt", hint="give a non-empty text")
    return texts


def truncate(w_plus: torch.Tensor, w_avg: torch.Tensor, truncation_psi: float = 1.0,
             truncation_cutoff: int | None = None) -> torch.Tensor:
    """Pull W+ toward w_avg: w_avg + psi * (w - w_avg), on the first `truncation_cutoff` layers (all by default)."""
    if truncation_psi == 1.0:
        return w_plus
    w_avg = w_avg.to(w_plus)
    truncated = w_avg + truncation_psi * (w_plus - w_avg)
    if truncation_cutoff is None:
        return truncated
    return torch.cat([truncated[:, :truncation_cutoff], w_plus[:, truncation_cutoff:]], dim=1)


@torch.no_grad()
def synthesize(generator, w_plus: torch.Tensor, batch_size: int = 8, noise_mode: str = "const",
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """G.synthesis in batches: W+ [N, num_ws, w_dim] -> images [N, 3, R, R] in [-1, 1] on the CPU."""
    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    device = generator.w_avg.device
    chunks = []
    for start in range(0, w_plus.shape[0], batch_size):
        batch = w_plus[start:start + batch_size].to(device)
        chunks.append(generator.synthesis(batch, noise_mode=noise_mode).float().clamp(-1, 1).cpu())
        if progress is not None:
            progress(batch.shape[0])
    return torch.cat(chunks)


@torch.no_grad()
def text_latents(clip, mapper, texts: Sequence[str]) -> torch.Tensor:
    """W+ codes M(C_text(t)) of prompts, without feature noise: [len(texts), num_ws, w_dim].

    C_text(t) is moved by the mapper's stored modality gap (`Mapper.text_to_image_features`).
    """
    features = clip.encode_text(validate_prompts(texts))
    return mapper(mapper.text_to_image_features(features.to(mapper.w_offset.device))).float()


@torch.no_grad()
def prompt_latents(clip, mapper, texts: Sequence[str], prior: str | None = None, seed: int = 0) -> torch.Tensor:
    """One W+ code per prompt without feature noise: [len(texts), num_ws, w_dim].

    prior "text" (the paper): `text_latents`; "retrieval": the mapper at the bank feature that `generate`'s
    sample 0 of this seed draws (`retrieve_image_features`). Default: `mapper.config.generation_prior`.
    """
    return mapper(prior_features(clip, mapper, validate_prompts(texts), 1, seed, prior)).float()


@torch.no_grad()
def prior_features(clip, mapper, texts: Sequence[str], n: int, seed: int, prior: str | None = None) -> torch.Tensor:
    """The mapper inputs before feature noise, n per prompt: [len(texts) * n, D], prompt-major.

    The prompts' CLIP text features moved by the mapper's modality gap; with prior "retrieval" (default:
    `mapper.config.generation_prior`) replaced by bank image features drawn for them
    (`retrieve_image_features`).
    """
    prior = generation_prior(mapper, prior)
    text_features = mapper.text_to_image_features(clip.encode_text(texts).to(mapper.w_offset.device))  # [P, D]
    if prior == "retrieval":
        return retrieve_image_features(mapper, text_features, n, seed)
    return text_features.repeat_interleave(n, dim=0)


def generation_prior(mapper, prior: str | None = None) -> str:
    """The prior a prompt is mapped with: `prior` when given, else the mapper file's (`generation_prior`)."""
    prior = prior or mapper.config.generation_prior
    check_generation_prior(prior)
    return prior


def check_sizes(n: int, batch_size: int) -> None:
    """UserInputError unless `n` (images per prompt) and `batch_size` are at least 1."""
    if n < 1 or batch_size < 1:
        raise UserInputError(f"`n` and `batch_size` must be at least 1, got {n} and {batch_size}")


def invert(clip, mapper, images: torch.Tensor) -> torch.Tensor:
    """W+ = M(C_image(x)) for images [N, 3, R, R] in [-1, 1] (the paper's one-shot inversion)."""
    with torch.no_grad():
        features = clip.encode_image(images)
        return mapper(features.to(mapper.w_offset.device)).float()


def generate(generator, clip, mapper, texts: Sequence[str], n: int = 8, seed: int = 0,
             truncation_psi: float = 1.0, batch_size: int = 8, noise_mode: str = "const",
             feature_noise: tuple[str, float] | None = None, prior: str | None = None,
             progress: Callable[[int], None] | None = None) -> GenerateResult:
    """n images for each prompt: CLIP text feature -> modality-gap shift -> [retrieval prior] -> feature
    noise -> mapper -> truncation -> generator.

    The shift is the mapper's stored one (`Mapper.text_to_image_features`; none for a mapper without).

    prior (default: `mapper.config.generation_prior`): "text" maps the (shifted) text feature itself, as
    in the paper; "retrieval" maps, for sample i, an image feature from the mapper's bank drawn with
    probability softmax(cos(text, image) / T) (`retrieve_image_features`): a real image's feature that
    CLIP finds close to the prompt, so what the prompt leaves open (a background, a position) varies as in
    the data instead of being averaged.

    The feature noise is the kind the mapper was trained with (`mapper.config.noise_mode`, at
    `mapper.config.sampling_noise_strength`: the training strength unless the mapper file sets a
    generation strength; override with `feature_noise=(mode, strength)`), so one prompt gives n
    distinct images. The noise (and the retrieval draw) of sample i is row i of a CPU draw seeded
    with `seed` (`sample_noise`) and is shared by all prompts: the same arguments give the same bytes,
    and `-n 4` gives the first four images of `-n 8` (up to float rounding of the batched matrix
    products).
    """
    texts = validate_prompts(texts)
    check_sizes(n, batch_size)
    mode, strength = feature_noise or (mapper.config.noise_mode, mapper.config.sampling_noise_strength)
    with torch.no_grad():
        base = prior_features(clip, mapper, texts, n, seed, prior)                              # [P*n, D]
        noise_rows = sample_noise(n, base.shape[1], seed).to(base.device)                       # [n, D]
        features = torch.cat([perturb_clip_features(base[p * n:(p + 1) * n], mode, strength, noise=noise_rows)
                              for p in range(len(texts))])                                    # [P*n, D]
        w_plus = torch.cat([mapper(features[start:start + batch_size])
                            for start in range(0, features.shape[0], batch_size)]).float()
        w_plus = truncate(w_plus, generator.w_avg, truncation_psi).cpu()
    images = synthesize(generator, w_plus, batch_size, noise_mode, progress)
    prompt_index = torch.arange(len(texts)).repeat_interleave(n)
    sample_index = torch.arange(n).repeat(len(texts))
    return GenerateResult(images=images, w_plus=w_plus, prompt_index=prompt_index, sample_index=sample_index,
                          prior=generation_prior(mapper, prior))


@torch.no_grad()
def retrieve_image_features(mapper, text_features: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n image features from the mapper's bank for each text feature [P, D]: [P*n, D], prompt-major.

    Sample i of a prompt is the bank row where uniform u_i falls in the cumulative distribution of
    softmax(cos(text, bank) / mapper.config.retrieval_temperature). u_i depends only on (seed, i), as
    the feature noise does, and is shared by all prompts.
    """
    bank = mapper.image_feature_bank
    if bank.shape[0] == 0:
        raise UserInputError("this mapper has no image feature bank for the retrieval prior",
                             hint="use `prior` text, or a mapper file that stores a bank")
    source = torch.Generator().manual_seed((int(seed) * 1_000_003 + 17) % (1 << 63))  # apart from the noise's
    uniforms = torch.stack([torch.rand((), generator=source) for _ in range(n)]).to(bank.device)  # [n]
    scores = F.normalize(text_features.float(), dim=-1) @ bank.float().T                     # [P, K]
    cumulative = torch.softmax(scores / mapper.config.retrieval_temperature, dim=1).cumsum(dim=1)
    cumulative = cumulative / cumulative[:, -1:]
    rows = torch.searchsorted(cumulative, uniforms.expand(len(text_features), n).contiguous())
    return bank[rows.clamp_max(bank.shape[0] - 1).reshape(-1)].to(text_features.dtype)


def sample_noise(n: int, dim: int, seed: int) -> torch.Tensor:
    """Standard normal noise [n, dim] from `seed`, drawn on the CPU one row at a time.

    Row by row so that row i depends only on (seed, i): torch's CPU normal sampler uses a different
    algorithm for long tensors, so one big draw would change every row when n changes.
    """
    source = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randn(dim, generator=source, dtype=torch.float32) for _ in range(n)])


def edit_directions(clip, mapper, edits: Sequence[tuple[str, float]], neutral=None,
                    direction: str = "text", image_features: torch.Tensor | None = None) -> torch.Tensor:
    """The W+ direction of each edit text: [len(edits), N, num_ws, w_dim] (N = 1 when nothing is per image).

    "text" (the paper): n = M(C_text(t)), or M(C_text(t)) - M(C_text(neutral)) with a neutral text,
    which removes what the edit text shares with a plain description ("a face").
    "image": the mapper's response, at the image itself, to moving its CLIP feature f = C_img(x) by
    the text: n = M(f + d) - M(f) with d = C_text(t) (- C_text(neutral)); needs `image_features`
    [N, D]. For a linear mapper both agree (up to the paper form's bias); the mapper is not linear,
    and evaluating it at the image keeps it on the image's part of W+ (measured in
    docs/shapes_pack.md).
    neutral: None, one text for every edit and image, or per edit a list of one text (or None) per
    image (what `infer_neutrals` returns).
    """
    check_edit_direction(direction)
    texts = validate_prompts([text for text, _ in edits])
    if neutral is None or isinstance(neutral, str):
        table = [[neutral] for _ in texts]
    else:
        table = [list(row) for row in neutral]
        if len(table) != len(texts) or len({len(row) for row in table}) != 1:
            raise UserInputError("per-image neutrals need one list of the same length for each edit text")
    known = sorted({n for row in table for n in row if n is not None})  # the distinct neutral texts
    if known:
        validate_prompts(known)
    device = mapper.w_offset.device
    if direction == "text":
        latents = dict(zip(texts + known, text_latents(clip, mapper, texts + known)))
        return torch.stack([torch.stack([latents[text] - (latents[n] if n is not None else 0) for n in row])
                            for text, row in zip(texts, table)]).cpu()
    if image_features is None:
        raise UserInputError("image edit directions need the image's CLIP features")
    with torch.no_grad():
        encoded = dict(zip(texts + known, clip.encode_text(texts + known).to(device)))
        image_features = image_features.to(device)
        at_image = mapper(image_features).float()                                          # [N, num_ws, w_dim]
        directions = []
        for text, row in zip(texts, table):
            offsets = torch.stack([encoded[text] - (encoded[n] if n is not None else 0) for n in row])  # [1|N, D]
            directions.append(mapper(image_features + offsets).float() - at_image)
    return torch.stack(directions).cpu()


def contrast_candidates(text: str, contrast_sets: Sequence[Sequence[str]]) -> list[str]:
    """Every text made from `text` by swapping each word of a contrast set in it for each member of that set.

    Words match whole and case-insensitively; a word in two sets belongs to the first. The text itself
    (in the sets' spelling) is among the results; [text] when it holds no contrast word.
    """
    slots = []  # (start, stop, members) of each contrast word in the text
    for members in check_contrast_sets(contrast_sets):
        pattern = r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(members, key=len, reverse=True)) + r")(?!\w)"
        slots += [(m.start(), m.end(), members) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    kept, covered_to = [], -1
    for start, stop, members in sorted(slots, key=lambda slot: slot[0]):
        if start >= covered_to:  # overlaps an earlier match of another set: the earlier set keeps it
            kept.append((start, stop, members))
            covered_to = stop
    count = 1
    for _, _, members in kept:
        count *= len(members)
    if count > MAX_NEUTRAL_CANDIDATES:
        raise UserInputError(f"'{text}' holds too many contrast words to infer a neutral ({count} combinations)",
                             hint="give a `neutral` text")
    candidates = []
    for choice in itertools.product(*[members for _, _, members in kept]):
        pieces, cursor = [], 0
        for (start, stop, _), word in zip(kept, choice):
            pieces += [text[cursor:start], word]
            cursor = stop
        candidates.append("".join(pieces) + text[cursor:])
    return list(dict.fromkeys(candidates))


def describe_inferred_neutrals(edits, neutrals_used) -> list[str]:
    """One line per edit text: the neutral `neutral` auto inferred for it (what edit commands print)."""
    lines = []
    for (text, _), inferred in zip(edits, neutrals_used):
        if inferred is None:
            lines.append(f"Neutral for '{text}': none (no contrast word in the text)")
        elif inferred.lower() == text.lower():
            lines.append(f"Neutral for '{text}': the text itself (the image already matches it: no change)")
        else:
            lines.append(f"Neutral for '{text}': '{inferred}' (inferred from the image)")
    return lines


@torch.no_grad()
def infer_neutrals(clip, mapper, text: str, image_features: torch.Tensor,
                   contrast_sets: Sequence[Sequence[str]]) -> list[str | None]:
    """For each image [N, D] of CLIP features, the variant of `text` (`contrast_candidates`) CLIP finds
    closest to it: "blue" -> "red" for a red circle. None for each image when the text has no contrast word.

    Text features are moved by the mapper's modality gap first, as everywhere the mapper meets text.
    """
    candidates = contrast_candidates(text, contrast_sets)
    if len(candidates) < 2:
        return [None] * image_features.shape[0]
    device = mapper.w_offset.device
    features = torch.cat([clip.encode_text(candidates[i:i + 256]).to(device) for i in range(0, len(candidates), 256)])
    features = F.normalize(mapper.text_to_image_features(features).float(), dim=-1)
    scores = F.normalize(image_features.to(device).float(), dim=-1) @ features.T   # [N, candidates]
    return [candidates[index] for index in scores.argmax(dim=1).tolist()]


def parse_layers(spec: str) -> tuple[int | None, int | None]:
    """`START:STOP` (either end may be left out, as in a Python slice) -> (start, stop) of W+ rows."""
    start, sep, stop = spec.strip().partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = tuple(int(part) if part.strip() else None for part in (start, stop))
    except ValueError:
        raise UserInputError(f"`layers` must be START:STOP (e.g. 2: or 0:4), got '{spec}'") from None
    if any(bound is not None and bound < 0 for bound in bounds):
        raise UserInputError(f"`layers` takes row numbers >= 0, got '{spec}'")
    return bounds


def layer_mask(num_ws: int, layers: tuple[int | None, int | None] | None) -> torch.Tensor:
    """[num_ws, 1] with 1 on the W+ rows an edit moves (all when `layers` is None), 0 elsewhere."""
    mask = torch.zeros(num_ws, 1)
    if layers is None:
        return mask + 1
    start, stop = layers
    start, stop = 0 if start is None else start, num_ws if stop is None else stop
    if not 0 <= start < stop <= num_ws:
        raise UserInputError(f"`layers` {layers[0] if layers[0] is not None else ''}:"
                             f"{layers[1] if layers[1] is not None else ''} selects no rows of this generator's "
                             f"{num_ws} W+ rows", hint=f"rows run from 0 to {num_ws - 1}")
    mask[start:stop] = 1
    return mask


def refine_inversion(generator, w_plus: torch.Tensor, target: torch.Tensor, steps: int, lr: float = 0.01,
                     lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     lpips_weight: float = 1.0, noise_mode: str = "const",
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Optimise W+ so that G(W+) matches `target`: Adam on L2 (+ lpips_weight * LPIPS when given).

    `lpips(x, y)` takes images in [-1, 1] and returns a per-image distance. Returns the refined W+.
    """
    check_refine_steps(steps)
    device = generator.w_avg.device
    target = target.to(device)
    w_opt = w_plus.detach().clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            images = generator.synthesis(w_opt, noise_mode=noise_mode).float()
            loss = F.mse_loss(images, target)
            if lpips is not None:
                loss = loss + lpips_weight * lpips(images, target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress(1)
    return w_opt.detach().cpu()


def edit_settings(mapper, edits: Sequence[tuple[str, float | None]], neutral: str | None = None,
                  direction: str | None = None, layers: tuple[int | None, int | None] | None = None,
                  contrast_sets: Sequence[Sequence[str]] | None = None) -> EditSettings:
    """An edit's arguments, checked, with every one left as None filled from the mapper file (its config).

    The one place an edit's defaults are decided: a beta of None is `edit_beta` (else DEFAULT_EDIT_BETA);
    neutral None is `edit_neutral` ("none": no neutral, whatever the file says); direction None is
    `edit_direction`; layers None is `edit_layers` ((None, None): every row); with neutral "auto",
    contrast_sets None is `edit_contrast_sets`.
    """
    config = mapper.config
    default_beta = config.edit_beta if config.edit_beta is not None else DEFAULT_EDIT_BETA
    edits = [(text, default_beta if beta is None else beta) for text, beta in edits]
    for text, beta in edits:
        validate_prompts([text])
        if not isinstance(beta, (int, float)) or beta != beta:
            raise UserInputError(f"beta for '{text}' must be a number, got {beta!r}")
    neutral = config.edit_neutral if neutral is None else (None if neutral == NEUTRAL_NONE else neutral)
    if contrast_sets is not None:
        contrast_sets = check_contrast_sets(contrast_sets)
    if neutral == NEUTRAL_AUTO:
        contrast_sets = contrast_sets if contrast_sets is not None else config.edit_contrast_sets
        if not contrast_sets:
            raise UserInputError("`neutral` auto needs contrast sets and this mapper has none",
                                 hint="give `contrast_sets` or a `neutral` text")
    elif contrast_sets is not None:
        raise UserInputError("`contrast_sets` is used only with `neutral` auto")
    elif neutral is not None:
        validate_prompts([neutral])
    direction = direction or config.edit_direction
    check_edit_direction(direction)
    layers = config.edit_layers if layers is None else tuple(layers)
    return EditSettings(edits=edits, neutral=neutral, direction=direction, layers=layers, contrast_sets=contrast_sets)


def edit(generator, clip, mapper, image: torch.Tensor, edits: Sequence[tuple[str, float | None]],
         neutral: str | None = None, refine_steps: int = 0, lpips=None, w_plus: torch.Tensor | None = None,
         refine_lr: float = 0.01, noise_mode: str = "const", direction: str | None = None,
         layers: tuple[int | None, int | None] | None = None,
         contrast_sets: Sequence[Sequence[str]] | None = None,
         progress: Callable[[int], None] | None = None) -> EditResult:
    """Text edits of images: w = M(C_img(x)) (optionally refined); w' = w + sum(beta * n_text).

    image: [N, 3, R, R] in [-1, 1] at the generator's resolution (ignored for inversion when `w_plus`
    is given, e.g. from a saved latent file; still the refinement target when refine_steps > 0, and
    the point "image" directions are taken at).
    edits: (text, beta) pairs (an empty list gives just the reconstruction).
    direction: "text" (the paper) or "image" (see `edit_directions`); layers: the W+ rows
    [start, stop) the edit moves, e.g. (2, None) leaves the coarsest rows alone.
    neutral: a text, "none", or "auto": for each edit text and image, `infer_neutrals` over `contrast_sets`;
    the result's `neutrals` says what each edit used.
    Every argument left as None (a beta, neutral, direction, layers, contrast_sets) is the mapper file's
    (`edit_settings`); the result's `settings` holds what the edit ran with.
    """
    settings = edit_settings(mapper, edits, neutral, direction, layers, contrast_sets)
    check_refine_steps(refine_steps)
    mask = layer_mask(generator.num_ws, settings.layers)
    auto = settings.neutral == NEUTRAL_AUTO
    image_features = None
    if settings.direction == "image" or w_plus is None or auto:
        with torch.no_grad():
            image_features = clip.encode_image(image)
    w_plus = _start_latent(generator, mapper, image_features, w_plus)
    if refine_steps > 0:
        w_plus = refine_inversion(generator, w_plus, image, refine_steps, lr=refine_lr, lpips=lpips,
                                  noise_mode=noise_mode, progress=progress)
    count = w_plus.shape[0]
    if auto:
        neutrals = [infer_neutrals(clip, mapper, text, image_features, settings.contrast_sets)
                    for text, _ in settings.edits]
    else:
        neutrals = [[settings.neutral] * count for _ in settings.edits]
    if settings.edits:
        directions = edit_directions(clip, mapper, settings.edits, neutrals if auto else settings.neutral,
                                     settings.direction, image_features).expand(-1, count, -1, -1)
        betas = torch.tensor([float(beta) for _, beta in settings.edits]).view(-1, 1, 1, 1)
        w_plus_edited = w_plus + mask * (betas * directions).sum(0)
    else:
        directions = torch.zeros(0, count, generator.num_ws, generator.w_dim)
        w_plus_edited = w_plus.clone()
    both = synthesize(generator, torch.cat([w_plus, w_plus_edited]), noise_mode=noise_mode)
    return EditResult(w_plus=w_plus, reconstruction=both[:count], w_plus_edited=w_plus_edited,
                      edited=both[count:], directions=directions, neutrals=neutrals, settings=settings)


def _start_latent(generator, mapper, image_features: torch.Tensor | None, w_plus: torch.Tensor | None) -> torch.Tensor:
    """The W+ an edit starts from, on the CPU: the given code, else the inversion M(C_img(x))."""
    if w_plus is None:
        with torch.no_grad():
            w_plus = mapper(image_features.to(mapper.w_offset.device)).float().cpu()
    else:
        w_plus = w_plus.detach().float().cpu()
    if w_plus.shape[1:] != (generator.num_ws, generator.w_dim):
        raise UserInputError(f"latent has shape {tuple(w_plus.shape)}; this generator needs "
                             f"[N, {generator.num_ws}, {generator.w_dim}]")
    return w_plus


def interpolate(w_a: torch.Tensor, w_b: torch.Tensor, frames: int = 24, spherical: bool = False) -> torch.Tensor:
    """`frames` W+ codes from w_a to w_b inclusive: [frames, num_ws, w_dim].

    Linear by default. spherical=True interpolates each W vector's direction along the great circle
    and its length linearly (falls back to linear where the two directions are nearly parallel).
    """
    check_frames(frames)
    w_a, w_b = _single(w_a, "A"), _single(w_b, "B")
    if w_a.shape != w_b.shape:
        raise UserInputError(f"cannot interpolate W+ codes of shapes {tuple(w_a.shape)} and {tuple(w_b.shape)}")
    t = torch.linspace(0.0, 1.0, frames, dtype=torch.float32).view(-1, 1, 1)
    linear = w_a + t * (w_b - w_a)
    linear[0], linear[-1] = w_a, w_b  # exact endpoints (w_a + 1 * (w_b - w_a) is not always w_b in float)
    if not spherical:
        return linear
    norm_a, norm_b = w_a.norm(dim=-1, keepdim=True), w_b.norm(dim=-1, keepdim=True)
    unit_a, unit_b = w_a / norm_a.clamp_min(1e-8), w_b / norm_b.clamp_min(1e-8)
    omega = torch.acos((unit_a * unit_b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    slerp = (torch.sin((1 - t) * omega) * unit_a + torch.sin(t * omega) * unit_b) / sin_omega.clamp_min(1e-8)
    slerp = slerp * (norm_a + t * (norm_b - norm_a))
    result = torch.where(sin_omega < 1e-4, linear, slerp)
    result[0], result[-1] = w_a, w_b  # exact endpoints
    return result


def check_refine_steps(steps: int) -> None:
    """UserInputError for a negative number of refinement steps."""
    if steps < 0:
        raise UserInputError(f"`refine_steps` must be >= 0, got {steps}")


def check_frames(frames: int) -> None:
    """UserInputError unless an interpolation has at least its two endpoints."""
    if frames < 2:
        raise UserInputError(f"`frames` must be at least 2, got {frames}")


def _single(w: torch.Tensor, label: str) -> torch.Tensor:
    """One W+ code [num_ws, w_dim] from [1, num_ws, w_dim] or [num_ws, w_dim]."""
    if w.ndim == 3 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 2:
        raise UserInputError(f"endpoint {label} must be one W+ code [num_ws, w_dim], got {tuple(w.shape)}")
    return w.float().cpu()


def parse_beta(text: str, what: str = "`beta`") -> float:
    """A finite float from text, or UserInputError naming `what`."""
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a number, got '{text}'") from None
    if not math.isfinite(value):
        raise UserInputError(f"{what} must be a finite number, got '{text}'")
    return value


def parse_edit(spec: str) -> tuple[str, float]:
    """`TEXT:BETA` -> (text, beta); the last colon splits, so texts may contain colons."""
    text, sep, beta = spec.rpartition(":")
    if not sep or not text.strip() or not beta.strip():
        raise UserInputError(f"malformed `edit` '{spec}'", hint="expected TEXT:BETA, e.g. `edit` beard:2")
    return text.strip(), parse_beta(beta.strip(), f"beta in `edit` '{spec}'")
