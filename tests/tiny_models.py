"""Tiny random-weight models for tests: an open_clip CLIP, a StyleGAN2 generator/discriminator, a mapper.

Everything is small enough to build in well under a second on one CPU thread (after open_clip's
import) and is written to a directory laid out like a builtin pack, so any command or loader can
use it:

    from tiny_models import make_tiny_pack, register_tiny_pack
    paths = make_tiny_pack(tmp_path)                 # files on disk
    paths.cli_args()                                 # ["--mapper", ..., "--generator", ..., "--clip", ...]
    register_tiny_pack(paths, "tiny")                # `--pack tiny` (in the test's $CLIP2GAN_HOME)
    models = load_tiny_models(paths)                 # clip2gan_cli.packs.Pack, models in memory

Fixtures (conftest.py): `tiny_pack` (one pack per test session, read-only: copy it before changing
files) and `tiny_models` (that pack loaded once).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TINY_RESOLUTION = 16          # generator output: 16 x 16 (num_ws = 6)
TINY_W_DIM = 32
TINY_CLIP_DIM = 32
TINY_WORDS = ("a", "an", "photo", "of", "red", "green", "blue", "yellow", "white", "black", "circle", "square",
              "triangle", "cross", "star", "small", "large", "on", "background", "face", "smiling", "woman",
              "man", "with", "beard", "blond", "hair", "glasses", "person", "old", "young")


def tiny_clip_config(words=TINY_WORDS, context_length: int = 16) -> dict:
    """A pack clip_config.json dict (the shapes pack's layout): open_clip config + word vocabulary."""
    from clip2gan_cli.tokenizer import VocabTokenizer

    tokenizer = VocabTokenizer(words, context_length=context_length)
    return {
        "model_name": "tiny-clip",
        "model_cfg": {
            "embed_dim": TINY_CLIP_DIM,
            "vision_cfg": {"image_size": TINY_RESOLUTION, "patch_size": 8, "layers": 1, "width": 32,
                           "head_width": 16},
            "text_cfg": {"context_length": context_length, "vocab_size": tokenizer.vocab_size, "width": 32,
                         "heads": 2, "layers": 1},
        },
        "tokenizer": tokenizer.to_dict(),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def make_tiny_generator(seed: int = 0):
    """A random StyleGAN2 generator at 16 px (w_avg estimated, so truncation has a centre)."""
    from clip2gan_cli.stylegan2.convert import estimate_w_avg
    from clip2gan_cli.stylegan2.networks import build_generator

    generator = build_generator(TINY_RESOLUTION, z_dim=TINY_W_DIM, w_dim=TINY_W_DIM, channel_base=256,
                                channel_max=16, mapping_layers=2, backend="reference", seed=seed)
    generator.eval().requires_grad_(False)
    estimate_w_avg(generator, samples=256)
    return generator


def make_tiny_discriminator(seed: int = 0):
    from clip2gan_cli.stylegan2.networks import build_discriminator

    return build_discriminator(TINY_RESOLUTION, channel_base=256, channel_max=16, backend="reference", seed=seed)


def make_tiny_clip(seed: int = 0, config: dict | None = None):
    """A frozen ClipModel with random weights from `tiny_clip_config()`."""
    import torch

    from clip2gan_cli.clip import load_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_clip("tiny-clip", pretrained=None, config=config or tiny_clip_config(), device="cpu")


def make_tiny_mapper(generator, clip_dim: int = TINY_CLIP_DIM, seed: int = 0, **config):
    """A random 12-layer mapper for `generator`, centred on its w_avg.

    output_gain 3 (instead of 0.1) so that different features give visibly different images.
    """
    import torch

    from clip2gan_cli.mapper import Mapper

    config = {"hidden_dim": 32, "output_gain": 3.0, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = Mapper(clip_dim=clip_dim, num_ws=generator.num_ws, w_dim=generator.w_dim, **config)
    mapper.set_w_offset(generator.w_avg)
    return mapper.eval().requires_grad_(False)


@dataclass
class TinyPackPaths:
    """Files of a tiny pack written by `make_tiny_pack`."""

    directory: Path
    generator: Path
    discriminator: Path
    clip_config: Path
    clip_weights: Path
    mapper: Path | None

    def cli_args(self) -> list[str]:
        """--mapper/--generator/--clip flags selecting these models."""
        args = ["--generator", str(self.generator), "--clip", str(self.clip_config)]
        return (["--mapper", str(self.mapper)] if self.mapper else []) + args


def make_tiny_pack(directory: str | Path, seed: int = 0, with_mapper: bool = True) -> TinyPackPaths:
    """Write a loadable tiny pack (builtin layout) into `directory` and return its paths."""
    from safetensors.torch import save_file

    from clip2gan_cli.mapper import save_mapper
    from clip2gan_cli.stylegan2.convert import save_discriminator, save_generator

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = make_tiny_generator(seed)
    config = tiny_clip_config()
    clip = make_tiny_clip(seed, config)
    paths = TinyPackPaths(directory, directory / "generator.safetensors", directory / "discriminator.safetensors",
                          directory / "clip_config.json", directory / "clip.safetensors",
                          directory / "mapper.safetensors" if with_mapper else None)
    save_generator(generator, paths.generator)
    save_discriminator(make_tiny_discriminator(seed), paths.discriminator)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(paths.clip_weights))
    paths.clip_config.write_text(json.dumps(config, indent=2))
    if with_mapper:
        save_mapper(make_tiny_mapper(generator, seed=seed), paths.mapper)
    return paths


def register_tiny_pack(paths: TinyPackPaths, name: str = "tiny", identity: str | None = None) -> str:
    """Register the tiny pack as a local pack in $CLIP2GAN_HOME so `--pack NAME` finds it."""
    from clip2gan_cli.weights import PackEntry, register_local_pack

    register_local_pack(PackEntry(
        name=name, generator=str(paths.generator), discriminator=str(paths.discriminator),
        clip_model=str(paths.clip_config.resolve()), clip_pretrained="custom", clip_weights=str(paths.clip_weights),
        mapper=str(paths.mapper) if paths.mapper else None, identity=identity,
        description="tiny random test pack"))
    return name


def load_tiny_models(paths: TinyPackPaths, device: str = "cpu"):
    """The tiny pack's models through the same loader as --mapper/--generator/--clip."""
    from clip2gan_cli.packs import load_models

    return load_models(mapper=paths.mapper, generator=str(paths.generator), clip=str(paths.clip_config),
                       device=device, need_mapper=paths.mapper is not None)
