"""`TrainConfig`: every knob of `clip2gan train` as one data object (TOML in, TOML out).

Loaded from a TOML file plus `--set key=value` style overrides; unknown keys are rejected by
name; the resolved config is written to `<run>/config.toml` so a run can be read back and resumed.
No torch here: `--dry-run` and `--help` stay fast.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import tomlio
from ..device import PRECISION_CHOICES
from ..errors import UserInputError

DIV_MODES = ("multiplicative", "additive")
LPIPS_NETS = ("alex", "vgg", "none")
LPIPS_BACKBONES = ("registry", "random")
IDENTITY_CHOICES = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_BLOCKS_CHOICES = ("auto", "on", "off")
# `checkpoint_blocks = "auto"` checkpoints from this resolution up: there it costs < 35 % step time (docs/training.md).
CHECKPOINT_BLOCKS_AUTO_RESOLUTION = 512


def learning_rate(config: "TrainConfig", step: int) -> float:
    """The mapper's learning rate for optimiser step `step` (0-based) under `config.lr_schedule`."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return config.lr


def checkpointing_enabled(setting: str, resolution: int) -> bool:
    """Whether `checkpoint_blocks` ("auto" | "on" | "off") checkpoints the blocks of a `resolution`-px G and D."""
    if setting == "auto":
        return resolution >= CHECKPOINT_BLOCKS_AUTO_RESOLUTION
    return setting == "on"


@dataclass
class TrainConfig:
    """The whole training recipe. Each default carries the reason it was chosen."""

    # --- models -------------------------------------------------------------------------------
    # A pack name (registry or local) gives G, D, CLIP and identity in one go; empty when
    # `generator` + `clip` are given instead (how the shapes pack itself is trained).
    pack: str = ""
    # Generator source (registry name, .pkl/.pt/.safetensors path) when no pack is named.
    generator: str = ""
    # CLIP as "MODEL:TAG" (open_clip), a registry name or a local CLIP file, when no pack is named.
    clip: str = ""
    # StyleGAN2 ops: "auto" is eager on the CPU; on CUDA per op the faster of eager and triton (measured, cached).
    backend: str = "auto"
    # Mapper hidden width; 0 keeps the mapper module's own default (the paper's 512-wide MLP).
    mapper_hidden_dim: int = 0

    # --- data ---------------------------------------------------------------------------------
    # "synthetic" (images sampled from the frozen G: needs no dataset) or a folder of images.
    data: str = "synthetic"
    # Fraction of each batch drawn from G when `data` is a folder (0 = real images only);
    # a little synthetic data covers G's range even where the real set is thin.
    synthetic_ratio: float = 0.0
    # Truncation psi for synthetic images: 0.7 keeps samples on the well-trained part of W
    # (StyleGAN2's own default for curated samples) while staying diverse.
    synthetic_truncation: float = 0.7
    # Align faces with MTCNN before cropping (face packs fed unaligned photos).
    align_faces: bool = False
    # DataLoader worker processes for folder data; 2 keeps decoding off the training thread
    # without oversubscribing small machines.
    num_workers: int = 2

    # --- schedule -----------------------------------------------------------------------------
    # Total optimiser steps of the run (a resumed run continues up to this number).
    steps: int = 100_000
    # Images per optimiser step per process; 8 fits a 1024px G on a 24 GB GPU with all losses.
    batch_size: int = 8
    # Micro-batches accumulated per optimiser step (effective batch = batch_size * grad_accum).
    grad_accum: int = 1
    # Mapper Adam: lr 1e-4 with the usual (0.9, 0.999) betas is stable for a 12-layer MLP
    # regressing W+ (larger rates overshoot the narrow W+ manifold).
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    # Learning-rate schedule over `steps`: "constant" (the paper states none) or "cosine" (decays to 0
    # at the last step, so the weights that ship are not a snapshot of full-rate noise).
    lr_schedule: str = "constant"
    # Clip the mapper's gradient to this global L2 norm before each step (0 = off). L_div is a ratio
    # whose denominator, an image distance, can come near 0 for one sample: the resulting gradient
    # spike knocked a shapes-pack run from L_rec 0.065 to 0.23 in one step (docs/shapes_pack.md).
    max_grad_norm: float = 0.0
    # Discriminator Adam: WGAN-GP recommends beta1=0, beta2=0.9 (Gulrajani et al. 2017).
    d_lr: float = 1e-4
    d_beta1: float = 0.0
    d_beta2: float = 0.9
    # Critic updates per mapper update; 1 because D starts from the pack's trained D (5 is
    # the WGAN-GP default for a critic trained from scratch: raise it when D is fresh).
    d_steps_per_m_step: int = 1
    # Gradient-penalty weight: 10 as in WGAN-GP.
    gp_weight: float = 10.0
    # EMA of the mapper weights (what mapper.safetensors holds): 0.999 averages over ~1k steps,
    # smoothing the adversarial noise without lagging a long run.
    ema_decay: float = 0.999

    # --- losses -------------------------------------------------------------------------------
    # L2 reconstruction: the main signal that ties M(f) to the image; weight 1 sets the scale.
    lambda_rec: float = 1.0
    # LPIPS: 0.8 as in pSp/e4e encoders, which balance L2 and LPIPS about equally in magnitude.
    lambda_lpips: float = 0.8
    # WGAN-GP adversarial term: small (0.1) so it sharpens details without fighting L_rec.
    lambda_adv: float = 0.1
    # Identity (face packs only): 0.1 as in pSp's ID loss weight for FFHQ encoders.
    lambda_id: float = 0.1
    # Diversity (mode seeking): 0.1 keeps noise-perturbed features from collapsing onto one image
    # without dominating reconstruction.
    lambda_div: float = 0.1
    # Feature perturbation for L_div and for generate at inference (see mapper.perturb_clip_features):
    # "multiplicative" = f * N(1, std^2) per dimension then re-normalise (the paper's "mean 1,
    # variance 0.36" read as a multiplicative factor); "additive" = f + std/sqrt(d) * N(0, 1).
    div_mode: str = "multiplicative"
    # 0.6 = sqrt(0.36), the paper's variance.
    div_std: float = 0.6
    # Epsilon in the ratio's denominator so identical images do not divide by zero.
    div_eps: float = 1e-5
    # LPIPS trunk: "alex" is the LPIPS authors' recommended forward metric and 4x cheaper than vgg;
    # "none" switches L_LPIPS off.
    lpips_net: str = "alex"
    # Where the LPIPS trunk weights come from: "registry" (torchvision-alexnet / torchvision-vgg16,
    # fetched by clip2gan, never by lpips) or "random" (seeded random trunk: the substitute for
    # offline packs such as shapes, whose images are flat colours; random conv features still
    # compare local edges and colours, which is what a perceptual term adds over L2 there).
    lpips_backbone: str = "registry"
    # Identity loss: "auto" = on when the pack names an identity network (face packs), else off.
    identity: str = "auto"

    # --- engine -------------------------------------------------------------------------------
    # What G's and D's num_fp16_res blocks run in (NVIDIA's mixed precision; the mapper, its optimiser and
    # the losses stay float32): fp32 default (exact and reproducible); "auto" = device.resolve_precision
    # (fp16 on CUDA, fp32 elsewhere); fp16 turns on the gradient scaler.
    precision: str = "fp32"
    # Recompute G's and D's activation-heavy blocks in backward: "auto" = on at >= 512 px (< 35 % step time there).
    checkpoint_blocks: str = "auto"
    # torch.compile the mapper (worth it only on long GPU runs; compile time is minutes).
    compile: bool = False
    # Seed for every random draw (data order, synthetic z, noise, D init, GP mixing).
    seed: int = 0
    # Device spec as everywhere else: auto | cpu | cuda | cuda:N | mps.
    device: str = "auto"

    # --- outputs ------------------------------------------------------------------------------
    # Checkpoint every N steps (and always at the end): 1000 steps is minutes on a GPU, so a
    # crash loses little while checkpoint I/O stays negligible.
    checkpoint_every: int = 1000
    # Keep this many newest checkpoints (older ones are removed after a newer one is safe).
    keep_checkpoints: int = 3
    # Sample sheet every N steps: frequent enough to watch, rare enough to cost < 1% of time.
    sample_every: int = 500
    # Metrics line (JSONL, TensorBoard, progress bar postfix) every N steps.
    log_every: int = 50
    # Held-out images (and their reconstructions) shown in each sample sheet.
    num_sample_images: int = 8
    # CLIP image features of this many training images stored in mapper.safetensors, for
    # `generate --prior retrieval` (0 = none, the paper). Fixed images (an even stride over the folder, or
    # G samples of a seed no step uses), encoded once when the run starts: 4,096 x 512 floats is 8 MB.
    feature_bank_size: int = 0
    # Fixed prompts whose generations are shown in each sample sheet.
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a smiling woman with blond hair", "an old man with a beard",
        "a red circle on a white background", "a small blue square",
    ])

    def validate(self) -> "TrainConfig":
        """Check value ranges and choices; raise UserInputError naming the first bad key."""
        positive_ints = ("steps", "batch_size", "grad_accum", "d_steps_per_m_step", "checkpoint_every",
                         "sample_every", "log_every", "keep_checkpoints")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise UserInputError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "num_sample_images", "mapper_hidden_dim", "feature_bank_size"):
            if getattr(self, name) < 0:
                raise UserInputError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "d_lr", "div_eps", "div_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserInputError(f"config: {name} must be a positive number, got {value}")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise UserInputError(f"config: max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        for name in ("lambda_rec", "lambda_lpips", "lambda_adv", "lambda_id", "lambda_div", "gp_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserInputError(f"config: {name} must be >= 0, got {value}")
        for name in ("beta1", "beta2", "d_beta1", "d_beta2", "ema_decay", "synthetic_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserInputError(f"config: {name} must be in [0, 1], got {value}")
        if not 0.0 < self.synthetic_truncation <= 2.0:
            raise UserInputError(f"config: synthetic_truncation must be in (0, 2], got {self.synthetic_truncation}")
        choices = {"div_mode": DIV_MODES, "lpips_net": LPIPS_NETS, "lpips_backbone": LPIPS_BACKBONES,
                   "identity": IDENTITY_CHOICES, "precision": PRECISION_CHOICES,
                   "lr_schedule": LR_SCHEDULES, "checkpoint_blocks": CHECKPOINT_BLOCKS_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"config: {name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if not self.data:
            raise UserInputError("config: data is empty", hint="give `data` DIR or `data` synthetic")
        if self.data == "synthetic" and self.synthetic_ratio not in (0.0, 1.0):
            raise UserInputError("config: synthetic_ratio mixes a folder with G samples; it needs `data` DIR")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (lists copied)."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text (flat keys, in declaration order)."""
        lines = ["# clip2gan train config (resolved; every key of TrainConfig)"]
        for item in fields(self):
            lines.append(f"{item.name} = {_toml_value(getattr(self, item.name), item.name)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict, rejecting unknown keys and wrongly typed values by name."""
        config = cls()
        return config.updated(values, source)

    def updated(self, values: dict[str, Any], source: str = "override") -> "TrainConfig":
        """A copy with `values` applied (same checks as from_dict), validated."""
        known = {item.name: item for item in fields(self)}
        current = self.to_dict()
        for key, value in values.items():
            if key not in known:
                raise UserInputError(f"{source}: unknown key '{key}'",
                                     hint="see `clip2gan train --dry-run` for every key")
            current[key] = _coerce(key, value, type(current[key]) if current[key] is not None else str, source)
        return TrainConfig(**current).validate()


def _coerce(key: str, value: Any, expected: type, source: str) -> Any:
    """Check a TOML value against the field's type (ints are accepted where floats are)."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    elif expected is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise UserInputError(f"{source}: key '{key}' expects {expected.__name__}, got {value!r}")


def _toml_value(value: Any, key: str) -> str:
    try:
        return tomlio.toml_value(value, key)
    except ValueError as error:  # a non-finite float
        raise UserInputError(f"config: {error}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as TOML (falling back to a string)."""
    if "=" not in text:
        raise UserInputError(f"`overrides` {text!r}: expected key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomlio.loads(f"v = {raw}")["v"]
    except tomlio.TOMLDecodeError:
        value = raw  # bare words such as vgg or multiplicative
    return key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (UserInputError when missing or malformed)."""
    path = Path(path)
    try:
        return tomlio.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"config file {path} cannot be read: {error}") from None
    except tomlio.TOMLDecodeError as error:
        raise UserInputError(f"config file {path} is not valid TOML: {error}") from None


def load_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`) <- TOML file <- overrides, validated; unknown keys rejected by name."""
    config = base or TrainConfig()
    if config_file is not None:
        config = config.updated(read_toml(config_file), source=str(config_file))
    if overrides:
        config = config.updated(overrides, source="command line")
    return config.validate()


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was started with (`<run>/config.toml`), for --resume."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserInputError(f"`resume` {run_dir}: no config.toml there (not a training run)")
    return TrainConfig.from_dict(read_toml(path), source=str(path))
