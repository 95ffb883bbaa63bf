"""Frozen CLIP: an open_clip model plus its tokenizer behind two calls, `encode_text` and `encode_image`.

Weights only ever come from a local file (the registry cache or a pack directory); open_clip's own
downloader is never called. OpenAI's CLIP weights were trained with QuickGELU activations, while
open_clip's plain configs (`ViT-B-16`) use nn.GELU: `load_clip` switches QuickGELU on whenever the
requested pretrained tag was trained with it, so the features match the original model.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import text_tower
from .device import place_model, resolve_device
from .errors import CheckpointError, UserInputError, WeightsNotFoundError, first_line

# CLIP's own normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD); used unless a config says otherwise.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "openai"


class ClipModel(torch.nn.Module):
    """A frozen open_clip model with its tokenizer and image preprocessing.

    `encode_text(list[str])` and `encode_image(images)` both return L2-normalised float32
    features `[N, embed_dim]`. `encode_image` takes generator output (`[N, 3, H, W]` in [-1, 1],
    any size) and is differentiable, so training can backpropagate through it.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, name: str, image_size: int,
                 context_length: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD):
        super().__init__()
        self.model = model                      # open_clip CLIP / CustomTextCLIP
        self.tokenizer = tokenizer              # callable: list[str] -> LongTensor [N, context_length]
        self.name = name                        # "ViT-B-16:openai", "shapes-clip", ...
        self.image_size = int(image_size)       # side of the square image the vision tower takes
        self.context_length = int(context_length)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Size of the joint text/image feature space."""
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[-1])
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def extra_repr(self) -> str:
        return f"name={self.name}, embed_dim={self.embed_dim}, image_size={self.image_size}, " \
               f"context_length={self.context_length}"

    # --- text ---
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids `[N, context_length]`; prompts that do not fit are truncated with one warning."""
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise UserInputError("empty prompt", hint="give a non-empty text")
        unknown = self.tokenizer.unknown_words(texts) if hasattr(self.tokenizer, "unknown_words") else []
        if unknown:
            # Compact-vocabulary CLIPs (the shapes pack) map unknown words to <unk>: say so, and what they know.
            known = ", ".join(getattr(self.tokenizer, "words", ())[:60])
            warnings.warn(f"{self.name} does not know the word(s) {', '.join(unknown)}; it knows: {known}",
                          UserWarning, stacklevel=3)
        too_long = [text for text in texts if _token_count(self.tokenizer, text) > self.context_length]
        if too_long:
            # One warning for the whole call, however many prompts were cut.
            warnings.warn(f"{len(too_long)} prompt(s) longer than {self.name}'s context of "
                          f"{self.context_length} tokens were truncated (first: {too_long[0][:60]!r})",
                          UserWarning, stacklevel=3)
        return self.tokenizer(texts)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features `[len(texts), embed_dim]` (float32)."""
        tokens = self.tokenize(texts).to(self.device)
        features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    # --- images ---
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable: images in [-1, 1] of any size -> CLIP input (square, resized, mean/std).

        Non-square inputs are centre-cropped; resizing uses bicubic interpolation with antialiasing
        (downscaling a 1024 px generator image to 224 px without it aliases badly).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserInputError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height != width:
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            images = images[:, :, top:top + side, left:left + side]
        images = images.float()
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        unit = (images + 1.0) * 0.5  # [-1, 1] -> [0, 1]; not clamped so gradients flow at the edges
        return (unit - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features `[N, embed_dim]` of generator-range images (differentiable)."""
        pixels = self.preprocess(images.to(self.device))
        dtype = next(self.model.parameters()).dtype
        features = self.model.encode_image(pixels.to(dtype))
        return F.normalize(features.float(), dim=-1)


def _token_count(tokenizer: Callable, text: str) -> int:
    """Number of tokens `text` needs including start/end tokens (0 when the tokenizer cannot say)."""
    if hasattr(tokenizer, "count_tokens"):
        return int(tokenizer.count_tokens(text))
    if hasattr(tokenizer, "split") and hasattr(tokenizer, "stoi"):  # VocabTokenizer: one token per word
        return len(tokenizer.split(text)) + 2
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text)) + 2  # + start and end of text
    return 0


def pretrained_needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """True when open_clip's table says `pretrained` weights for `model_name` were trained with QuickGELU."""
    if not pretrained or Path(str(pretrained)).suffix:
        return model_name.endswith("-quickgelu")
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    # "openai" weights are QuickGELU for every architecture that has them.
    return pretrained.lower() == "openai" or model_name.endswith("-quickgelu")


def resolve_clip_config(model_name: str, pretrained: str | None = None,
                        config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) to build.

    `config` (a dict, e.g. from a pack's clip_config.json) wins over the built-in name. QuickGELU is
    forced on when the pretrained tag needs it.
    """
    if config is not None:
        model_cfg = copy.deepcopy(config.get("model_cfg", config))
    else:
        if ":" in model_name and model_name.split(":", 1)[0] in ("hf-hub", "local-dir"):
            raise UserInputError(f"CLIP model '{model_name}': hub/local-dir schemas are not supported",
                                 hint="give an open_clip model name and a local weights file")
        import open_clip

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise UserInputError(f"unknown CLIP model '{model_name}'",
                                 hint="use an open_clip name such as ViT-B-16 or ViT-B-32 "
                                      "(open_clip.list_models() lists them all)")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise CheckpointError(f"CLIP config for '{model_name}' lacks '{key}'")
    if "hf_model_name" in model_cfg["text_cfg"] or "hf_tokenizer_name" in model_cfg["text_cfg"]:
        raise UserInputError(f"CLIP model '{model_name}' needs a Hugging Face text tower, "
                             "which would be downloaded; not supported")
    if pretrained_needs_quick_gelu(model_name, pretrained):
        model_cfg["quick_gelu"] = True
    return model_cfg


def build_clip_module(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """Instantiate an open_clip model (random weights) from a resolved config; nothing is downloaded."""
    import open_clip

    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.pop("preprocess_cfg", None)
    vision_cfg = model_cfg["vision_cfg"]
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # never let timm fetch its own weights
    custom_text = model_cfg.pop("custom_text", False)
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return model_class(**model_cfg)


def _default_tokenizer(model_name: str | None, model_cfg: dict[str, Any],
                       config: dict[str, Any] | None = None) -> Callable:
    """The config's own tokenizer (a pack's compact vocabulary) or open_clip's BPE one (no download)."""
    tokenizer_cfg = (config or {}).get("tokenizer")
    if tokenizer_cfg:
        if tokenizer_cfg.get("type") != "vocab":
            raise CheckpointError(f"CLIP config for '{model_name}': unknown tokenizer type {tokenizer_cfg.get('type')!r}")
        from .tokenizer import VocabTokenizer

        return VocabTokenizer.from_dict(tokenizer_cfg)
    from open_clip.tokenizer import SimpleTokenizer

    text_cfg = model_cfg["text_cfg"]
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77), **kwargs)


def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
              weights_path: str | Path | None = None, config: dict[str, Any] | None = None,
              tokenizer: Callable | None = None, device="auto", dtype: torch.dtype | None = None,
              text_only: bool = False) -> ClipModel:
    """Build a frozen ClipModel from local files only.

    model_name: an open_clip architecture name (ViT-B-16, ViT-B-32-quickgelu, ...) or a label for
        `config`. pretrained: the tag the weights were trained as ("openai", "laion2b_s34b_b88k"; it
        decides QuickGELU) or a local weights path. weights_path: the local weights file (from
        `weights.fetch`); None with a tag is an error, None without a tag gives random weights
        (tests, or a CLIP about to be trained). config: an open_clip model config dict for custom
        architectures: either the model config itself or a pack's clip_config.json dict
        ({"model_cfg", "tokenizer", "image_mean", "image_std"}). tokenizer: a callable
        list[str] -> LongTensor (default: open_clip's BPE tokenizer). text_only: the caller only
        encodes text; a config with its own tokenizer and safetensors weights then loads just the
        text tower without importing open_clip (`text_tower`), which saves seconds per command.
    """
    if weights_path is None and pretrained and Path(str(pretrained)).is_file():
        weights_path, pretrained = pretrained, None
    if weights_path is None and pretrained:
        raise WeightsNotFoundError(f"no local weights file for CLIP {model_name}:{pretrained}",
                                   hint="run `clip2gan download-weights` for it, or pass a weights file")
    model_cfg = resolve_clip_config(model_name, pretrained, config)
    if text_only and tokenizer is None and (config or {}).get("tokenizer") and weights_path is not None \
            and Path(weights_path).suffix == ".safetensors" and text_tower.supports(model_cfg):
        model = _load_text_tower(model_cfg, Path(weights_path), model_name)
    else:
        model = build_clip_module(model_cfg)
        if weights_path is not None:
            _load_clip_weights(model, Path(weights_path), model_name)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    image_size = vision_cfg.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    preprocess = model_cfg.get("preprocess_cfg", {})
    mean = (config or {}).get("image_mean", preprocess.get("mean", OPENAI_MEAN))
    std = (config or {}).get("image_std", preprocess.get("std", OPENAI_STD))
    clip = ClipModel(
        model,
        tokenizer if tokenizer is not None else _default_tokenizer(model_name, model_cfg, config),
        name=f"{model_name}:{pretrained}" if pretrained else model_name,
        image_size=image_size,
        context_length=text_cfg.get("context_length", 77),
        mean=tuple(mean),
        std=tuple(std),
    )
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    return place_model(clip, torch_device, dtype)


def _load_clip_weights(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Load a local open_clip / OpenAI state dict (safetensors or weights-only torch file)."""
    import open_clip

    if not path.is_file():
        raise WeightsNotFoundError(f"CLIP weights file not found: {path}")
    try:
        if _is_torchscript_archive(path):
            # OpenAI's own ViT-B-16.pt is a TorchScript archive: torch.load(weights_only=True) refuses it.
            # torch.jit.load deserialises TorchScript (no Python pickle code runs); only its tensors are kept.
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            non_persistent = set(dict(model.named_buffers())) - set(model.state_dict())  # e.g. attn_mask
            for key in ("input_resolution", "context_length", "vocab_size", *non_persistent):
                state.pop(key, None)
            if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
                state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as error:  # corrupt file, wrong architecture, unsafe pickle: all one message
        raise CheckpointError(f"cannot load CLIP weights {path.name} into {model_name}: {first_line(error)}") \
            from error


def _load_text_tower(model_cfg: dict[str, Any], path: Path, model_name: str) -> torch.nn.Module:
    """text_tower.load_text_tower with load_clip's errors."""
    if not path.is_file():
        raise WeightsNotFoundError(f"CLIP weights file not found: {path}")
    try:
        return text_tower.load_text_tower(model_cfg, path)
    except Exception as error:  # corrupt file or wrong architecture: one message, as _load_clip_weights
        raise CheckpointError(f"cannot load CLIP weights {path.name} into {model_name}: {first_line(error)}") \
            from error


def _is_torchscript_archive(path: Path) -> bool:
    """True for a zip written by torch.jit.save (it holds code/ and constants.pkl)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_clip_from_config_file(config_path: str | Path, weights_path: str | Path | None = None,
                               device="auto", text_only: bool = False) -> ClipModel:
    """A custom CLIP from a clip_config.json; weights default to clip.safetensors beside it."""
    config_path = Path(config_path)
    config = load_clip_config_file(config_path)
    weights_path = Path(weights_path) if weights_path is not None else config_path.with_name("clip.safetensors")
    return load_clip(config.get("model_name", config_path.stem), pretrained=None, weights_path=weights_path,
                     config=config, device=device, text_only=text_only)


def load_clip_config_file(path: str | Path) -> dict[str, Any]:
    """Read a clip_config.json (an open_clip model config, optionally with tokenizer settings)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise WeightsNotFoundError(f"CLIP config not found: {path}") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read CLIP config {path}: {error}") from error
