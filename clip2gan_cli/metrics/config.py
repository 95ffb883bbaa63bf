"""What `evaluate` computes (`EvalConfig`, one field per `eval-fid` option) and its checks.

Messages name the fields in backquotes (`fid_mode`); the CLI prints each as its flag (--fid-mode)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..device import PRECISION_CHOICES
from ..errors import UserInputError
from .feature_spaces import FID_MODES

FEATURE_KINDS = ("inception", "clip", "dinov2")
GENERATION_PRIORS = ("text", "retrieval")
INCEPTION_WEIGHTS = "inception-fid"  # registry name of torch-fidelity's FID Inception
DINOV2_WEIGHTS = "dinov2-vit-l-14"   # registry name of DINOv2 ViT-L/14 (FD_DINOv2, Stein et al. 2023)
# Below this many images per set FID's bias dominates differences between models (papers use 50k).
STABLE_FID_IMAGES = 10_000


@dataclass
class EvalConfig:
    """What `evaluate` computes; one field per `eval-fid` option."""

    real: Path | None = None                    # folder of real images (statistics cached), or ...
    stats: Path | None = None                   # ... precomputed real statistics (npz: mu, sigma, mode)
    save_stats: Path | None = None              # write the real folder's statistics here
    fake: Path | None = None                    # folder of generated images, or ...
    pack: str | None = None                     # ... a pack (also the CLIP of --features clip; default shapes)
    prompts: Path | None = None                 # ... and a prompts file (one prompt per line)
    images_per_prompt: int | None = None        # -n: images generated per prompt
    prior: str | None = None                    # generation prior (text | retrieval; default: the mapper's)
    features: str = "inception"                 # inception (FID) | clip (FD_CLIP) | dinov2 (FD_DINOv2)
    fid_mode: str = "legacy"                    # legacy (NVIDIA / torch-fidelity) | clean (clean-fid)
    score_clip: str | None = None               # CLIP that scores prompts (MODEL:TAG ...); default: the pack's
    kid: bool = False                           # also compute KID
    kid_subset_size: int = 1000                 # KID subset size (each set needs at least this many images)
    kid_subsets: int = 100                      # number of KID subsets
    inception_weights: Path | None = None       # a local torch-fidelity Inception file instead of the registry's
    device: str = "auto"
    backend: str = "auto"                       # StyleGAN2 kernels for generation
    precision: str = "auto"                     # the generator's num_fp16_res blocks: auto | fp32 | fp16 | bf16
    batch_size: int = 32
    seed: int = 0                               # generation noise and KID subsets
    cache: bool = True                          # cache real-folder statistics
    progress: bool = True                       # progress bars on stderr


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read prompts file {path}: {error}") from error
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserInputError(f"prompts file {path} holds no prompt")
    return prompts


def _validate_sources(config: EvalConfig) -> None:
    if (config.real is None) == (config.stats is None):
        raise UserInputError("give either `real` DIR or `stats` FILE, not both or neither")
    if config.save_stats is not None and config.real is None:
        raise UserInputError("`save_stats` needs `real` DIR (the folder whose statistics are saved)")
    both_fakes = config.fake is not None and config.prompts is not None
    no_fake = config.fake is None and config.prompts is None
    if both_fakes or (no_fake and config.save_stats is None):
        raise UserInputError("give either `fake` DIR or `prompts` FILE (with `pack` and `images_per_prompt`), "
                             "not both or neither")
    if config.prompts is not None and config.images_per_prompt is None:
        raise UserInputError("`prompts` needs `images_per_prompt` (images generated per prompt)")
    if config.prompts is None and config.images_per_prompt is not None:
        raise UserInputError("`images_per_prompt` only applies with `prompts`")
    for value, name in ((config.score_clip, "score_clip"), (config.prior, "prior")):
        if value is not None and config.prompts is None:
            raise UserInputError(f"`{name}` only applies with `prompts`")


def _is_clip_spec(spec: str) -> bool:
    """MODEL:TAG / MODEL:FILE with both parts, a clip_config.json or a folder holding one."""
    spec = spec.strip()
    model, _, tag = spec.partition(":")
    return bool(model and tag) or spec.endswith(".json") or (bool(spec) and Path(spec).expanduser().is_dir())


def validate_config(config: EvalConfig) -> None:
    """UserInputError for contradictory or missing options (before any model is loaded)."""
    if config.features not in FEATURE_KINDS:
        raise UserInputError(f"unknown `features` '{config.features}'", hint=f"expected {', '.join(FEATURE_KINDS)}")
    if config.fid_mode not in FID_MODES:
        raise UserInputError(f"unknown `fid_mode` '{config.fid_mode}'", hint=f"expected {' or '.join(FID_MODES)}")
    if config.fid_mode != "legacy" and config.features == "clip":
        raise UserInputError("`fid_mode` clean applies to inception and dinov2 features; the CLIP space uses "
                             "the CLIP's own preprocessing")
    if config.precision not in PRECISION_CHOICES:
        raise UserInputError(f"unknown `precision` '{config.precision}'",
                             hint=f"expected {' | '.join(PRECISION_CHOICES)}")
    if config.prior is not None and config.prior not in GENERATION_PRIORS:
        raise UserInputError(f"unknown `prior` '{config.prior}'", hint=f"expected {' or '.join(GENERATION_PRIORS)}")
    if config.score_clip is not None and not _is_clip_spec(config.score_clip):
        raise UserInputError(f"malformed `score_clip` '{config.score_clip}'",
                             hint="expected MODEL:TAG (e.g. ViT-B-32-quickgelu:openai), MODEL:FILE or a clip_config.json")
    _validate_sources(config)
    if config.images_per_prompt is not None and config.images_per_prompt < 1:
        raise UserInputError(f"`images_per_prompt` must be at least 1, got {config.images_per_prompt}")
    if config.batch_size < 1:
        raise UserInputError(f"`batch_size` must be at least 1, got {config.batch_size}")
    if config.inception_weights is not None and config.features != "inception":
        raise UserInputError("`inception_weights` only applies with `features` inception")
