"""The networks a run trains against: frozen G and CLIP, the initial critic and identity net, from a
pack or from --generator/--clip; and the local pack a finished run registers (--export-pack)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, UserInputError
from ..packs import load_models, load_pack, parse_clip_spec
from . import losses as L
from .config import TrainConfig
from .data import STREAM_D_INIT
from .reporting import stderr_line


@dataclass
class TrainModels:
    """The frozen networks (and optional initial D) a run trains the mapper against.

    `sources` describes where they came from (saved in checkpoints and mapper metadata, and used
    by --export-pack): keys generator, clip_model, clip_pretrained, clip_weights, discriminator, identity.
    """

    generator: nn.Module
    clip: nn.Module
    discriminator: nn.Module | None = None       # initial critic (the pack's D); None -> fresh
    identity: nn.Module | None = None            # facenet embedder for L_id; None -> L_id off
    perceptual: nn.Module | None = None          # L_LPIPS module; None -> built from the config
    sources: dict[str, str] = field(default_factory=dict)


def build_models(config: TrainConfig, device: torch.device) -> TrainModels:
    """G, CLIP, initial D and identity net for `config` (a pack, or --generator + --clip)."""
    want_identity = config.lambda_id > 0 and config.identity != "off"
    if config.pack:
        if config.generator or config.clip:
            raise UserInputError("give either `pack` or `generator` with `clip`, not both")
        pack = load_pack(config.pack, device=device, backend=config.backend, need_mapper=False)
        discriminator = pack.load_discriminator() if config.lambda_adv > 0 else None
        identity = pack.load_identity() if want_identity else None
        return TrainModels(pack.generator, pack.clip, discriminator, identity, sources=pack_sources(pack))
    if not (config.generator and config.clip):
        raise UserInputError("no models to train against", hint="give `pack` NAME, or `generator` SRC and `clip` MODEL:TAG")
    # The same --generator/--clip forms as generate/edit (packs.load_models), without a mapper.
    loaded = load_models(generator=config.generator, clip=config.clip, device=device, backend=config.backend,
                         need_mapper=False)
    sources = {"generator": config.generator, **parse_clip_spec(config.clip).sources()}
    discriminator = None
    if config.lambda_adv > 0:
        from ..stylegan2.convert import load_discriminator

        try:
            discriminator = load_discriminator(str(loaded.paths["generator"]), device=device, backend=config.backend)
            sources["discriminator"] = config.generator
        except CheckpointError:
            stderr_line(f"{config.generator} holds no discriminator: training a fresh critic")
    identity = None
    if want_identity and config.identity == "on":  # "auto" means off: an explicit G is not known to be a face G
        from ..weights import fetch

        identity = L.build_identity_net(fetch(L.IDENTITY_WEIGHTS))
        sources["identity"] = L.IDENTITY_WEIGHTS
    return TrainModels(loaded.generator, loaded.clip, discriminator, identity, sources=sources)


def pack_sources(pack) -> dict[str, str]:
    """The file references of a loaded pack (for --export-pack and checkpoint metadata): registry
    names where the pack names them, else the local files it was loaded from (builtin packs)."""
    sources = {"pack": pack.name}
    entry = pack.info
    for role in ("generator", "clip_model", "clip_pretrained", "clip_weights", "discriminator", "identity"):
        value = getattr(entry, role, None) if entry is not None and not getattr(entry, "builtin", False) else None
        if value:
            sources[role] = str(value)
        elif role in pack.paths:
            sources[role] = str(pack.paths[role])
    if "clip_config" in pack.paths and (entry is None or getattr(entry, "builtin", False)
                                        or str(getattr(entry, "clip_model", "")).endswith(".json")):
        sources["clip_model"] = str(pack.paths["clip_config"])  # a custom CLIP: load_pack reads the .json path
        sources["clip_pretrained"] = "local"
    return sources


def fresh_discriminator(generator: nn.Module, seed: int) -> nn.Module:
    """A new StyleGAN2 critic for G's resolution, initialised from the run's seed.

    As wide as G at each resolution (NVIDIA's configs pair G and D that way): the 512-channel default
    would make the critic of a small generator (the shapes pack's 16-64 channels) most of a step's cost.
    """
    from ..stylegan2.networks import build_discriminator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + STREAM_D_INIT)
        return build_discriminator(int(generator.img_resolution), channels=generator.config.channels_per_resolution())


def export_local_pack(name: str, mapper_path: Path, sources: dict[str, str], config: TrainConfig) -> str:
    """Register the trained mapper with its G and CLIP as local pack `name` (so `--pack name` works)."""
    from ..weights import PackEntry, register_local_pack

    missing = [key for key in ("generator", "clip_model", "clip_pretrained") if not sources.get(key)]
    if missing:
        raise UserInputError(f"`export_pack` {name}: the run's models lack {', '.join(missing)} "
                             "(a pack needs a registry/ file generator and an open_clip MODEL:TAG CLIP)")
    entry = PackEntry(name=name, generator=sources["generator"], clip_model=sources["clip_model"],
                      clip_pretrained=sources["clip_pretrained"], clip_weights=sources.get("clip_weights"),
                      mapper=str(mapper_path.resolve()), discriminator=sources.get("discriminator"),
                      identity=sources.get("identity"),
                      description=f"mapper trained by clip2gan train ({config.steps} steps, data {config.data})")
    register_local_pack(entry)
    return name
