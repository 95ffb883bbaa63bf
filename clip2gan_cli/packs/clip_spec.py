"""The one parser of a `--clip` spec (generate, edit, interpolate and train take the same forms).

    ViT-B-16:openai            MODEL:TAG   weights found through the registry's packs
    ViT-B-16:/path/model.pt    MODEL:FILE  a local open_clip checkpoint
    path/clip_config.json      a local CLIP (weights in clip.safetensors beside it), or the directory holding both
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError, WeightsNotFoundError

CLIP_SPEC_HINT = "expected MODEL:TAG (e.g. ViT-B-16:openai), MODEL:FILE or a clip_config.json"


@dataclass(frozen=True)
class ClipSpec:
    """A parsed --clip: which open_clip model, which weights, and where they are."""

    kind: str                   # "registry" (MODEL:TAG), "file" (MODEL:FILE) or "config" (clip_config.json)
    model: str                  # open_clip model name ("" for a local clip_config.json)
    tag: str                    # open_clip pretrained tag; "local" for a clip_config.json; the file for MODEL:FILE
    weights: str                # registry file name (MODEL:TAG) or local weights path
    config: Path | None = None  # the clip_config.json of a local CLIP

    def sources(self) -> dict[str, str]:
        """How this CLIP is recorded in a pack entry (a local CLIP: its config path, tag "local")."""
        if self.kind == "config":
            config = self.config.resolve()
            return {"clip_model": str(config), "clip_pretrained": "local",
                    "clip_weights": str(config.with_name("clip.safetensors"))}
        if self.kind == "registry":
            return {"clip_model": self.model, "clip_pretrained": self.tag, "clip_weights": self.weights}
        weights = str(Path(self.weights).resolve())
        return {"clip_model": self.model, "clip_pretrained": weights, "clip_weights": weights}


def parse_clip_spec(spec: str, registry=None) -> ClipSpec:
    """ClipSpec of `spec` (see the module docstring); UserInputError / WeightsNotFoundError when it names nothing."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    if spec and path.is_dir():
        path = path / "clip_config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise UserInputError(f"`clip` {spec}: {path} does not exist", hint=CLIP_SPEC_HINT)
        return ClipSpec("config", "", "local", str(path.with_name("clip.safetensors")), config=path)
    model, _, tag = spec.partition(":")
    if not model or not tag:
        raise UserInputError(f"malformed `clip` '{spec}'", hint=CLIP_SPEC_HINT)
    if Path(tag).expanduser().is_file():
        weights = str(Path(tag).expanduser())
        return ClipSpec("file", model, weights, weights)
    return ClipSpec("registry", model, tag, _registry_clip_weights(model, tag, registry))


def _registry_clip_weights(model: str, tag: str, registry=None) -> str:
    """The registry file a pack uses for CLIP `model:tag` (model names compared without -quickgelu)."""
    from ..weights import load_registry

    registry = registry or load_registry()
    base = model.removesuffix("-quickgelu").lower()
    for pack in registry.packs.values():
        if pack.clip_weights and pack.clip_pretrained == tag and \
                (pack.clip_model or "").removesuffix("-quickgelu").lower() == base:
            return pack.clip_weights
    raise WeightsNotFoundError(f"no registry weights for CLIP {model}:{tag}",
                               hint="pass MODEL:/path/to/weights, or a clip_config.json")


def load_clip_spec(spec: str, device, text_only: bool = False):
    """A ClipModel and its files {role: path} for `spec`; registry weights are fetched into the cache."""
    from ..clip import load_clip, load_clip_from_config_file
    from ..weights import fetch

    parsed = parse_clip_spec(spec)
    if parsed.kind == "config":
        weights = Path(parsed.weights)
        clip = load_clip_from_config_file(parsed.config, weights, device=device, text_only=text_only)
        return clip, {"clip_config": parsed.config, "clip_weights": weights}
    if parsed.kind == "registry":
        weights = fetch(parsed.weights)
        return load_clip(parsed.model, parsed.tag, weights_path=weights, device=device), {"clip_weights": weights}
    weights = Path(parsed.weights)
    return load_clip(parsed.model, pretrained=None, weights_path=weights, device=device), {"clip_weights": weights}
