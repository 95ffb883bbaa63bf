"""The CLIP2GAN mapping network M: a CLIP feature -> a W+ code of a frozen StyleGAN2 generator.

Paper: 12 fully connected layers, each followed by LeakyReLU(0.2). Output parametrisation (our
choice, written down here because the paper does not say): W-space values are signed and centred on
the generator's average latent `w_avg`, so the network predicts an offset from `w_avg` and adds it:

    W+ = w_offset + reshape(LeakyReLU(FC_12(... LeakyReLU(FC_1(sqrt(D) * f)) ...)), [num_ws, w_dim])

- `w_offset` is a buffer holding the generator's `w_avg` (set by `set_w_offset`; zeros until then),
  saved with the weights. An untrained mapper therefore already yields the average image.
- The LeakyReLU after the last layer is kept by default (`final_activation=True`, the paper); with
  the offset it only makes negative offsets 5x "cheaper", never unreachable. Set it False for a
  linear last layer.
- CLIP features are unit length, so each component is ~1/sqrt(D); they are scaled by sqrt(D) so the
  first layer sees unit-variance inputs. Hidden layers use He init for LeakyReLU(0.2); the last layer
  is scaled by `output_gain` (0.1) so the initial offsets are small.

`MapperConfig` (sizes, activation and the L_div noise settings) is saved as JSON in the safetensors
metadata, so `load_mapper(path)` rebuilds the network without flags and `generate` uses the same
feature perturbation that training used.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, OutputError, UserInputError, first_line
from .fileutil import atomic_path

CONFIG_METADATA_KEY = "clip2gan.mapper_config"
FORMAT_METADATA_KEY = "clip2gan.format"
FORMAT_NAME = "clip2gan-mapper-v1"
NOISE_MODES = ("multiplicative", "additive", "none")
EDIT_DIRECTIONS = ("text", "image")  # see pipeline.edit_directions
GENERATION_PRIORS = ("text", "retrieval")  # see pipeline.generate
NEUTRAL_AUTO = "auto"  # edit's neutral text inferred from the image over contrast sets (pipeline.infer_neutrals)


def check_generation_prior(prior: str) -> None:
    """UserInputError unless `prior` is one of GENERATION_PRIORS."""
    if prior not in GENERATION_PRIORS:
        raise UserInputError(f"unknown generation prior '{prior}'", hint=f"expected {' or '.join(GENERATION_PRIORS)}")


def check_contrast_sets(contrast_sets) -> list[list[str]]:
    """Contrast sets as lists of stripped words; UserInputError unless each holds >= 2 distinct non-empty texts."""
    checked = []
    for members in contrast_sets:
        if isinstance(members, str) or not all(isinstance(word, str) for word in members):
            raise UserInputError(f"a contrast set must be a list of words, got {members!r}")
        words = [word.strip() for word in members]
        if any(not word for word in words) or len({word.lower() for word in words}) != len(words) or len(words) < 2:
            raise UserInputError(f"a contrast set needs at least two distinct non-empty words, got {members!r}")
        checked.append(words)
    return checked


def check_edit_direction(direction: str) -> None:
    """UserInputError unless `direction` is one of EDIT_DIRECTIONS."""
    if direction not in EDIT_DIRECTIONS:
        raise UserInputError(f"unknown edit direction '{direction}'", hint=f"expected {', '.join(EDIT_DIRECTIONS)}")


@dataclass
class MapperConfig:
    """Everything needed to rebuild a Mapper, plus the feature noise it was trained with."""

    clip_dim: int                          # size of the CLIP feature (embed_dim)
    num_ws: int                            # number of W vectors in W+ (generator.num_ws)
    w_dim: int                             # size of one W vector (generator.w_dim)
    hidden_dim: int = 512                  # width of the hidden layers
    num_layers: int = 12                   # fully connected layers in all (paper: 12)
    negative_slope: float = 0.2            # LeakyReLU slope (paper: 0.2)
    final_activation: bool = True          # LeakyReLU after the last layer too (paper)
    output_gain: float = 0.1               # init scale of the last layer (small initial offsets)
    noise_mode: str = "multiplicative"     # feature perturbation of L_div and generate (NOISE_MODES)
    noise_strength: float = 0.6            # its standard deviation (paper: variance 0.36)
    # generate's noise strength; None = the training strength. A pack may set it lower: training with
    # strong noise makes the mapper robust to the text/image feature gap, sampling with it blurs attributes
    generation_noise_strength: float | None = None
    # generate's input feature: "text" (the paper: the text feature) or "retrieval" (an image feature from the
    # mapper's bank, drawn with probability softmax(cos(text, image) / retrieval_temperature)); not in the paper
    generation_prior: str = "text"
    retrieval_temperature: float = 0.01
    # edit's defaults for this mapper (the CLI's --direction/--layers/--beta override them). The paper's
    # form is "text" on every W+ row with beta 2; a pack stores what it measured to work best.
    edit_direction: str = "text"
    edit_layers: tuple[int | None, int | None] | None = None  # W+ rows [start, stop) an edit moves; None = all
    edit_beta: float | None = None
    # edit's default neutral: None (none: the paper) or "auto" (the text with its contrast-set words swapped
    # for those that best describe the image, e.g. "blue" -> "red" for a red circle)
    edit_neutral: str | None = None
    # interchangeable words for "auto" (e.g. the colours of a domain); the CLI's --contrast overrides them
    edit_contrast_sets: list[list[str]] | None = None

    def __post_init__(self):
        if min(self.clip_dim, self.num_ws, self.w_dim, self.hidden_dim) < 1 or self.num_layers < 1:
            raise UserInputError(f"invalid mapper sizes: {self}")
        if self.noise_mode not in NOISE_MODES:
            raise UserInputError(f"unknown noise mode '{self.noise_mode}'", hint=f"expected {', '.join(NOISE_MODES)}")
        if not self.noise_strength >= 0:
            raise UserInputError(f"noise strength must be >= 0, got {self.noise_strength}")
        if self.generation_noise_strength is not None and not self.generation_noise_strength >= 0:
            raise UserInputError(f"generation noise strength must be >= 0, got {self.generation_noise_strength}")
        check_generation_prior(self.generation_prior)
        if not (math.isfinite(self.retrieval_temperature) and self.retrieval_temperature > 0):
            raise UserInputError(f"retrieval temperature must be a positive number, got {self.retrieval_temperature}")
        check_edit_direction(self.edit_direction)
        if self.edit_layers is not None:
            if len(self.edit_layers) != 2 or not all(v is None or isinstance(v, int) for v in self.edit_layers):
                raise UserInputError(f"edit layers must be [start, stop] (ints or null), got {self.edit_layers}")
            self.edit_layers = tuple(self.edit_layers)  # JSON gives a list
        if self.edit_beta is not None and not math.isfinite(self.edit_beta):
            raise UserInputError(f"edit beta must be a finite number, got {self.edit_beta}")
        if self.edit_neutral not in (None, NEUTRAL_AUTO):
            raise UserInputError(f"edit neutral must be null or '{NEUTRAL_AUTO}', got {self.edit_neutral!r}")
        if self.edit_contrast_sets is not None:
            if isinstance(self.edit_contrast_sets, str):
                raise UserInputError(f"edit contrast sets must be a list of word lists, got {self.edit_contrast_sets!r}")
            self.edit_contrast_sets = check_contrast_sets(self.edit_contrast_sets)

    @property
    def sampling_noise_strength(self) -> float:
        """The feature-noise strength generate uses (the training strength unless the pack set another)."""
        return self.noise_strength if self.generation_noise_strength is None else self.generation_noise_strength

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MapperConfig":
        """Rebuild from a dict; unknown keys are rejected by name (a file from a newer version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"mapper config has unknown key(s): {', '.join(unknown)}")
        return cls(**data)


class Mapper(nn.Module):
    """CLIP feature `[N, clip_dim]` -> W+ `[N, num_ws, w_dim]` (see the module docstring)."""

    def __init__(self, clip_dim: int | None = None, num_ws: int | None = None, w_dim: int | None = None,
                 hidden_dim: int = 512, num_layers: int = 12, negative_slope: float = 0.2,
                 final_activation: bool = True, output_gain: float = 0.1,
                 noise_mode: str = "multiplicative", noise_strength: float = 0.6,
                 config: MapperConfig | None = None):
        super().__init__()
        if config is None:
            if clip_dim is None or num_ws is None or w_dim is None:
                raise UserInputError("Mapper needs clip_dim, num_ws and w_dim (or a MapperConfig)")
            config = MapperConfig(clip_dim, num_ws, w_dim, hidden_dim, num_layers, negative_slope,
                                  final_activation, output_gain, noise_mode, noise_strength)
        self.config = config
        widths = [config.clip_dim] + [config.hidden_dim] * (config.num_layers - 1) + [config.num_ws * config.w_dim]
        self.layers = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.register_buffer("w_offset", torch.zeros(config.w_dim))
        # CLIP's modality gap for this mapper: mean image feature - mean text feature of captioned
        # images (zeros: none known, the paper's behaviour); see `text_to_image_features`
        self.register_buffer("text_feature_shift", torch.zeros(config.clip_dim))
        # unit CLIP image features of the mapper's domain for the retrieval prior ([0, D]: none)
        self.register_buffer("image_feature_bank", torch.zeros(0, config.clip_dim))
        self.reset_parameters()

    # The paper's symbols, as on the generator.
    @property
    def clip_dim(self) -> int:
        return self.config.clip_dim

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    @property
    def w_dim(self) -> int:
        return self.config.w_dim

    def reset_parameters(self) -> None:
        """He init for LeakyReLU in hidden layers; the last layer scaled down by `output_gain`."""
        gain = math.sqrt(2.0 / (1.0 + self.config.negative_slope ** 2))
        for index, layer in enumerate(self.layers):
            std = gain / math.sqrt(layer.in_features)
            if index == len(self.layers) - 1:
                std *= self.config.output_gain
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def set_w_offset(self, w_avg: torch.Tensor) -> None:
        """Centre the output on the generator's average latent (call once before training)."""
        self.w_offset.copy_(w_avg.detach().reshape(-1).to(self.w_offset))

    @torch.no_grad()
    def set_text_feature_shift(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """Store the modality gap measured on paired data: mean(image_features) - mean(text_features).

        `image_features[i]` and `text_features[i]` are CLIP features of an image and of its caption.
        """
        if image_features.shape != text_features.shape or image_features.shape[-1] != self.config.clip_dim:
            raise UserInputError(f"paired features must both be [N, {self.config.clip_dim}], got "
                                 f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        shift = image_features.float().mean(0) - text_features.float().mean(0)
        self.text_feature_shift.copy_(shift.to(self.text_feature_shift))

    def text_to_image_features(self, text_features: torch.Tensor) -> torch.Tensor:
        """Text features moved by the stored modality gap and re-normalised (unchanged when none is stored).

        The mapper is trained on image features only; CLIP's text features of the same content sit
        apart from them by a nearly constant offset (Liang et al. 2022, "Mind the Gap"). Moving a text
        feature by the mean offset puts it where the mapper was trained (measured in docs/shapes_pack.md).
        """
        if not bool(self.text_feature_shift.any()):
            return text_features
        shifted = text_features + self.text_feature_shift.to(device=text_features.device, dtype=text_features.dtype)
        return F.normalize(shifted, dim=-1)

    @torch.no_grad()
    def set_image_feature_bank(self, image_features: torch.Tensor) -> None:
        """Store CLIP image features [K, clip_dim] of the domain (unit length) for the retrieval prior."""
        if image_features.ndim != 2 or image_features.shape[1] != self.config.clip_dim or len(image_features) < 1:
            raise UserInputError(f"an image feature bank must be [K >= 1, {self.config.clip_dim}], "
                                 f"got {tuple(image_features.shape)}")
        if not bool(torch.isfinite(image_features).all()):
            raise UserInputError("an image feature bank must be finite")
        self.image_feature_bank = F.normalize(image_features.detach().float(), dim=-1).to(self.w_offset)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files and checkpoints written before the shift existed: no shift (the paper's behaviour).
        state_dict.setdefault(prefix + "text_feature_shift", torch.zeros_like(self.text_feature_shift))
        # ... and before the bank existed: an empty one. Its row count is the file's.
        bank = state_dict.setdefault(prefix + "image_feature_bank", torch.zeros(0, self.config.clip_dim))
        if bank.ndim == 2 and bank.shape[1] == self.config.clip_dim:
            self.image_feature_bank = torch.zeros_like(bank, dtype=self.w_offset.dtype, device=self.w_offset.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        """W+ codes `[N, num_ws, w_dim]` for CLIP features `[N, clip_dim]`."""
        if clip_features.ndim != 2 or clip_features.shape[1] != self.config.clip_dim:
            raise UserInputError(f"mapper expects CLIP features [N, {self.config.clip_dim}], "
                                 f"got {tuple(clip_features.shape)}")
        x = clip_features.to(self.w_offset.dtype) * math.sqrt(self.config.clip_dim)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last or self.config.final_activation:
                x = F.leaky_relu(x, self.config.negative_slope)
        return x.view(-1, self.config.num_ws, self.config.w_dim) + self.w_offset

    def extra_repr(self) -> str:
        c = self.config
        return (f"clip_dim={c.clip_dim}, num_ws={c.num_ws}, w_dim={c.w_dim}, hidden_dim={c.hidden_dim}, "
                f"num_layers={c.num_layers}, noise={c.noise_mode}:{c.noise_strength}")


def perturb_clip_features(features: torch.Tensor, mode: str = "multiplicative", strength: float = 0.6,
                          generator: torch.Generator | None = None, noise: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """The feature noise of L_div (training) and of `generate` (one prompt -> many images).

    The paper adds "Gaussian noise with mean 1 and variance 0.36" to the CLIP feature. Adding a
    mean-1 offset would shift every feature by the same vector, so we read it as:
    - "multiplicative" (default): f1 = normalize(f * e), e ~ N(1, strength^2) per dimension;
    - "additive": f1 = normalize(f + strength * e / sqrt(D)), e ~ N(0, 1): noise at the scale of one
      component of a unit vector;
    - "none": f unchanged.
    The noise e is drawn on the CPU from `generator` (reproducible across devices) unless given
    as `noise` (standard normal, same shape as `features`); the result is L2-normalised like every
    CLIP feature.
    """
    if mode == "none" or strength == 0:
        return features
    if mode not in NOISE_MODES:
        raise UserInputError(f"unknown noise mode '{mode}'", hint=f"expected {', '.join(NOISE_MODES)}")
    if noise is None:
        noise = torch.randn(features.shape, generator=generator, dtype=torch.float32)
    elif noise.shape != features.shape:
        raise UserInputError(f"noise shape {tuple(noise.shape)} differs from features {tuple(features.shape)}")
    noise = noise.to(device=features.device, dtype=features.dtype)
    if mode == "multiplicative":
        perturbed = features * (1.0 + strength * noise)
    else:
        perturbed = features + strength * noise / math.sqrt(features.shape[-1])
    return F.normalize(perturbed, dim=-1)


def save_mapper(mapper: Mapper, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write weights + config (JSON in the safetensors metadata) atomically; returns the path."""
    from safetensors.torch import save_file

    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[FORMAT_METADATA_KEY] = FORMAT_NAME
    header[CONFIG_METADATA_KEY] = json.dumps(mapper.config.to_dict(), sort_keys=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in mapper.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except Exception as error:  # safetensors reports a full disk as its own error type
            raise OutputError(f"cannot write {path}: {first_line(error)}") from error
    return Path(path)


def read_mapper_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a mapper file (config JSON and anything the trainer stored)."""
    from safetensors import safe_open

    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read mapper {path}: {first_line(error)}") from error


def load_mapper(path: str | Path, device: torch.device | str | None = None) -> Mapper:
    """Rebuild a Mapper from a file written by `save_mapper` (no flags needed)."""
    from safetensors.torch import load_file

    path = _existing_file(path)
    metadata = read_mapper_metadata(path)
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a clip2gan mapper (no mapper config in its metadata)")
    try:
        config = MapperConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    except (ValueError, TypeError, UserInputError) as error:
        raise CheckpointError(f"mapper {path} has an invalid config: {first_line(error)}") from error
    try:
        state = load_file(str(path), device="cpu")
    except Exception as error:
        raise CheckpointError(f"cannot read mapper {path}: {first_line(error)}") from error
    mapper = Mapper(config=config)
    try:
        mapper.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"mapper {path} does not match its own config: {first_line(error)}") from error
    return mapper.to(device) if device is not None else mapper


def check_compatible(mapper: Mapper, generator: nn.Module, clip: nn.Module | None = None) -> None:
    """CheckpointError unless the mapper's input/output shapes fit this CLIP and generator."""
    expected = (int(generator.num_ws), int(generator.w_dim))
    if (mapper.num_ws, mapper.w_dim) != expected:
        raise CheckpointError(
            f"mapper for another generator: it makes W+ of {mapper.num_ws}x{mapper.w_dim}, "
            f"this generator takes {expected[0]}x{expected[1]}",
            hint="train a mapper for this generator with `clip2gan train`")
    if clip is not None and mapper.clip_dim != int(clip.embed_dim):
        raise CheckpointError(
            f"mapper for another CLIP model: it takes {mapper.clip_dim}-d features, "
            f"this CLIP gives {int(clip.embed_dim)}-d")


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"mapper file not found: {path}")
    return path

