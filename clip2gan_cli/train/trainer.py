"""The CLIP2GAN training loop: text-free training of the mapper M with a frozen CLIP and a frozen G.

    image x -> f = CLIP(x) -> M(f) = W+ -> G -> x'      (and f1 = perturb(f) -> G(M(f1)) for L_div)

Read `run_training` top to bottom: set-up, resume, then one loop of
  1. critic steps (WGAN-GP) on real x vs detached x',
  2. one mapper step on lambda_rec*L_rec + lambda_lpips*L_LPIPS + lambda_adv*L_G + lambda_id*L_id
     + lambda_div*L_div, accumulated over `grad_accum` micro-batches,
  3. EMA update, logging, sample sheets, checkpoints.

Reproducibility: every random draw of a step (batch, synthetic z, feature noise, GP mixing) comes
from a CPU generator seeded by (seed, step, rank), so a run resumed from a checkpoint takes exactly
the steps the uninterrupted run would have taken. Multi-process runs (torchrun) wrap the mapper in
DistributedDataParallel; only rank 0 writes files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..device import place_model, resolve_device, resolve_dtype, seed_everything
from ..errors import CheckpointError, OutputError, TrainingError, UserInputError, first_line
from ..fileutil import atomic_path, atomic_write_text, ensure_writable_dir
from ..mapper import Mapper, check_compatible, perturb_clip_features, save_mapper
from . import losses as L
from .config import TrainConfig, learning_rate
from .data import STREAM_D_INIT, STREAM_GP, STREAM_NOISE, SyntheticSource, build_batches, step_generator

CHECKPOINT_FORMAT = "clip2gan-train-v1"
CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")
LOSS_NAMES = ("rec", "lpips", "adv", "id", "div")


# --------------------------------------------------------------------------------------------
# What the loop trains against
# --------------------------------------------------------------------------------------------

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


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    mapper_path: Path
    final_losses: dict[str, float]
    steps_per_second: float
    exported_pack: str | None = None
    mapper: nn.Module | None = None       # the trained mapper (raw weights; every rank has one)
    mapper_ema: nn.Module | None = None   # its EMA copy (what mapper.safetensors holds)
    rank: int = 0                         # this process's rank (only rank 0 reports and writes)


@dataclass
class DistributedContext:
    """Rank layout of this process (world_size 1 when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run_training(config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 models: TrainModels | None = None, export_pack: str | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume training) a mapper into `run_dir`; see the module docstring.

    `models` injects ready networks (tests, scripts); otherwise they are built from the config's
    pack or generator + clip. Raises UserInputError / OutputError for a bad run directory,
    CheckpointError for an incompatible resume, TrainingError for a non-finite loss.
    """
    log = log or _stderr
    config = config.validate()
    run_dir = Path(run_dir)
    dist_ctx = init_distributed(config.device)
    try:
        return _run(config, run_dir, resume, models, export_pack, progress, log, dist_ctx)
    finally:
        if dist_ctx.initialised_here:
            torch.distributed.destroy_process_group()


def _run(config: TrainConfig, run_dir: Path, resume: bool, models: TrainModels | None,
         export_pack: str | None, progress: bool, log: Callable[[str], None],
         dist_ctx: DistributedContext) -> TrainResult:
    # --- where, with what precision -------------------------------------------------------------
    device = _device_for(config.device, dist_ctx)
    amp_dtype = resolve_dtype(config.precision, device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if dist_ctx.is_main:
        check_run_dir(run_dir, resume)  # before minutes of model loading
    _barrier(dist_ctx)

    # --- frozen networks ------------------------------------------------------------------------
    models = models or build_models(config, device)
    generator = place_model(models.generator, device)
    clip = place_model(models.clip, device)
    identity = None
    if config.lambda_id > 0 and config.identity != "off":
        if models.identity is None and config.identity == "on":
            raise UserInputError("identity = 'on' but this pack has no identity network",
                                 hint="set identity = 'off' (non-face packs) or use a face pack")
        identity = L.IdentityLoss(place_model(models.identity, device)) if models.identity is not None else None
    perceptual = None
    if config.lambda_lpips > 0 and config.lpips_net != "none":
        perceptual = models.perceptual or L.build_perceptual_loss(config.lpips_net, config.lpips_backbone, config.seed)
        perceptual = place_model(perceptual, device)

    # --- trainable networks: mapper (+ EMA) and critic, seeded so every rank starts equal --------
    seed_everything(config.seed)
    mapper = Mapper(clip_dim=int(clip.embed_dim), num_ws=int(generator.num_ws), w_dim=int(generator.w_dim),
                    noise_mode=config.div_mode, noise_strength=config.div_std,
                    **({"hidden_dim": config.mapper_hidden_dim} if config.mapper_hidden_dim else {}))
    mapper.set_w_offset(generator.w_avg)
    mapper = place_model(mapper, device, trainable=True).train()
    mapper_ema = place_model(copy.deepcopy(mapper), device)  # frozen copy, updated by lerp
    use_adversarial = config.lambda_adv > 0
    discriminator = None
    if use_adversarial:
        discriminator = models.discriminator
        if discriminator is None:
            discriminator = _fresh_discriminator(generator, config.seed)
        discriminator = place_model(discriminator, device, dtype=torch.float32, trainable=True).train()
        discriminator.requires_grad_(True)
    opt_m = torch.optim.Adam(mapper.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
    opt_d = (torch.optim.Adam(discriminator.parameters(), lr=config.d_lr, betas=(config.d_beta1, config.d_beta2))
             if discriminator is not None else None)

    # --- resume ---------------------------------------------------------------------------------
    start_step = 0
    if resume:
        checkpoint = load_latest_checkpoint(run_dir)
        try:  # a readable file whose contents do not fit (edited, foreign, damaged) is a one-line error
            _check_resume_compatible(checkpoint, mapper, generator, clip, discriminator)
            mapper.load_state_dict(checkpoint["mapper"])
            mapper_ema.load_state_dict(checkpoint["mapper_ema"])
            opt_m.load_state_dict(checkpoint["opt_m"])
            if discriminator is not None:
                discriminator.load_state_dict(checkpoint["discriminator"])
                opt_d.load_state_dict(checkpoint["opt_d"])
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            restore_rng_state(checkpoint["rng"])
            start_step = int(checkpoint["step"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"the newest checkpoint in {run_dir / 'checkpoints'} (step "
                                  f"{checkpoint.get('step')!r}) does not fit this run: {first_line(error, 160)}",
                                  hint="resume with the config the run was started with, or remove that file") \
                from error
        if dist_ctx.is_main:
            log(f"Resuming {run_dir} from step {start_step} (to {config.steps}).")
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        if start_step >= config.steps:
            raise UserInputError(f"{run_dir} is already at step {start_step}; --steps {config.steps} has nothing to do",
                                 hint="raise --steps to continue training")
    if dist_ctx.is_main:
        prepare_run_dir(run_dir)
        atomic_write_text(run_dir / "config.toml", config.to_toml())

    # --- distributed wrappers and compile -------------------------------------------------------
    mapper_forward: nn.Module = mapper
    if dist_ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        mapper_forward = DistributedDataParallel(mapper, device_ids=[device.index] if device.type == "cuda" else None)
        if discriminator is not None:
            _broadcast_parameters(discriminator)
    if config.compile:
        mapper_forward = torch.compile(mapper_forward)

    # --- data -------------------------------------------------------------------------------------
    synthetic = SyntheticSource(generator, config.synthetic_truncation, device)
    batches, scan = build_batches(config.data, resolution=int(generator.img_resolution), batch_size=config.batch_size,
                                  seed=config.seed, synthetic=synthetic, synthetic_ratio=config.synthetic_ratio,
                                  rank=dist_ctx.rank, world_size=dist_ctx.world_size,
                                  num_workers=config.num_workers, align=config.align_faces,
                                  held_out=config.num_sample_images)
    if scan is not None and dist_ctx.is_main:
        log(f"Data: {len(scan.paths)} images in {config.data}" +
            (f" ({len(scan.skipped)} unreadable files skipped)" if scan.skipped else ""))
    critic_batches = config.d_steps_per_m_step if use_adversarial else 0
    micro_per_step = config.grad_accum * (1 + critic_batches)  # fixed, so step -> data is a pure function
    stream = batches.iterate(start_step * micro_per_step, device)

    if config.feature_bank_size and dist_ctx.is_main and mapper_ema.image_feature_bank.shape[0] == 0:
        # resumed runs already hold it (mapper_ema's state); the images are fixed, so it is the same bank
        mapper_ema.set_image_feature_bank(feature_bank(batches, clip, config.feature_bank_size,
                                                       config.batch_size, device))
        log(f"Feature bank: CLIP features of {mapper_ema.image_feature_bank.shape[0]} training images "
            "(generate --prior retrieval).")

    # --- outputs (rank 0) -------------------------------------------------------------------------
    writer = _MetricsWriter(run_dir, enabled=dist_ctx.is_main)
    held_out = batches.held_out(config.num_sample_images, device) if dist_ctx.is_main else None
    bar = _progress_bar(config.steps, start_step, enabled=progress and dist_ctx.is_main)

    # --- the loop -----------------------------------------------------------------------------------
    running: dict[str, float] = {}
    running_count = 0
    last_losses: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        step_number = step + 1  # steps completed after this iteration (what logs and files say)

        # 1. critic (WGAN-GP): real x against detached reconstructions
        critic_parts: dict[str, torch.Tensor] = {}
        if discriminator is not None:
            for critic_index in range(config.d_steps_per_m_step):
                opt_d.zero_grad(set_to_none=True)
                for micro in range(config.grad_accum):
                    real = next(stream)
                    with torch.no_grad(), autocast:
                        fake = generator.synthesis(mapper(clip.encode_image(real)), noise_mode="const")
                    mix = step_generator(config.seed, STREAM_GP, (step * config.d_steps_per_m_step + critic_index)
                                         * config.grad_accum + micro, dist_ctx.rank)
                    d_loss, critic_parts = L.critic_loss(discriminator, real, fake.float(), config.gp_weight, mix)
                    (d_loss / config.grad_accum).backward()
                _all_reduce_gradients(discriminator, dist_ctx)
                opt_d.step()
            critic_parts = {"d_loss": d_loss.detach(), **critic_parts}

        # 2. mapper step
        opt_m.zero_grad(set_to_none=True)
        if discriminator is not None:
            discriminator.requires_grad_(False)  # L_G trains M only
        for micro in range(config.grad_accum):
            real = next(stream)
            sync = (dist_ctx.enabled and micro < config.grad_accum - 1)
            with (mapper_forward.no_sync() if sync and hasattr(mapper_forward, "no_sync") else nullcontext()):
                noise = step_generator(config.seed, STREAM_NOISE, step * config.grad_accum + micro, dist_ctx.rank)
                parts = mapper_losses(config, real, clip, mapper_forward, generator, autocast, noise,
                                      perceptual, discriminator, identity)
                total = sum(LOSS_WEIGHTS[name](config) * value for name, value in parts.items())
                scaled = total / config.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if discriminator is not None:
            discriminator.requires_grad_(True)

        # Non-finite check on every rank (an all-reduce also averages the logged values).
        values = _reduce_for_logging({**parts, "total": total.detach(), **critic_parts}, dist_ctx)
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            bar.close()
            writer.close()
            raise TrainingError(f"loss {bad[0]} is {values[bad[0]]} at step {step_number}; stopped",
                                hint=f"the last good checkpoint in {run_dir / 'checkpoints'} is kept; "
                                     "lower lr or check the data")
        if scaler is not None:
            scaler.unscale_(opt_m)  # clip (and measure) the true gradient, not the scaled one
        grad_norm = float(torch.nn.utils.clip_grad_norm_(mapper.parameters(), config.max_grad_norm or math.inf))
        for group in opt_m.param_groups:
            group["lr"] = learning_rate(config, step)
        if scaler is not None:
            scaler.step(opt_m)
            scaler.update()
        else:
            opt_m.step()
        update_ema(mapper_ema, mapper, config.ema_decay)
        if math.isfinite(grad_norm):  # fp16 overflow steps (skipped by the scaler) are not logged
            values["grad_norm"] = grad_norm

        # 3. bookkeeping
        for name, value in values.items():
            running[name] = running.get(name, 0.0) + value
        running_count += 1
        bar.update(1)
        if step_number % config.log_every == 0 or step_number == config.steps:
            last_losses = {name: total_value / running_count for name, total_value in running.items()}
            elapsed = time.perf_counter() - started
            speed = (step_number - start_step) / max(elapsed, 1e-9)
            writer.write(step_number, last_losses, speed)
            bar.set_postfix({name: f"{value:.4g}" for name, value in last_losses.items() if name in LOSS_NAMES + ("total",)})
            running, running_count = {}, 0
        if dist_ctx.is_main and (step_number % config.sample_every == 0 or step_number == config.steps):
            write_sample_sheet(run_dir / "samples" / f"step-{step_number:08d}.png", held_out,
                               config.sample_prompts, clip, mapper_ema, generator)
        if step_number % config.checkpoint_every == 0 or step_number == config.steps:
            if dist_ctx.is_main:
                save_checkpoint(run_dir, step_number, config, mapper, mapper_ema, discriminator, opt_m, opt_d,
                                scaler, models.sources)
            _barrier(dist_ctx)
    bar.close()
    writer.close()
    elapsed = time.perf_counter() - started
    steps_per_second = (config.steps - start_step) / max(elapsed, 1e-9)

    exported = None
    if export_pack and dist_ctx.is_main:
        exported = export_local_pack(export_pack, run_dir / "mapper.safetensors", models.sources, config)
        log(f"Registered local pack '{exported}': use --pack {exported}.")
    return TrainResult(run_dir, config.steps, run_dir / "mapper.safetensors", last_losses, steps_per_second, exported,
                       mapper=mapper, mapper_ema=mapper_ema, rank=dist_ctx.rank)


# Loss name -> its weight in the config (a table, so the sum and the logs agree).
LOSS_WEIGHTS: dict[str, Callable[[TrainConfig], float]] = {
    "rec": lambda c: c.lambda_rec,
    "lpips": lambda c: c.lambda_lpips,
    "adv": lambda c: c.lambda_adv,
    "id": lambda c: c.lambda_id,
    "div": lambda c: c.lambda_div,
}


def mapper_losses(config: TrainConfig, real: torch.Tensor, clip: nn.Module, mapper: nn.Module,
                  generator: nn.Module, autocast, noise: torch.Generator, perceptual: nn.Module | None,
                  discriminator: nn.Module | None, identity: nn.Module | None) -> dict[str, torch.Tensor]:
    """The switched-on mapper losses (unweighted) of one micro-batch.

    f and its perturbation f1 go through M and G as one batch, so one forward serves L_div too.
    """
    with torch.no_grad():
        features = clip.encode_image(real)
    use_div = config.lambda_div > 0
    if use_div:
        perturbed = perturb_clip_features(features, config.div_mode, config.div_std, noise)
        features_in = torch.cat([features, perturbed])
    else:
        features_in = features
    with autocast:
        images = generator.synthesis(mapper(features_in), noise_mode="const")
    images = images.float()
    reconstructed = images[: real.shape[0]]
    parts: dict[str, torch.Tensor] = {}
    if config.lambda_rec > 0:
        parts["rec"] = L.reconstruction_loss(real, reconstructed)
    if perceptual is not None:
        parts["lpips"] = perceptual(real, reconstructed)
    if discriminator is not None:
        parts["adv"] = L.adversarial_loss(discriminator, reconstructed)
    if identity is not None:
        parts["id"] = identity(real, reconstructed)
    if use_div:
        parts["div"] = L.diversity_loss(features, perturbed, reconstructed, images[real.shape[0]:], config.div_eps)
    if not parts:
        raise UserInputError("every loss weight is 0: nothing to train", hint="set lambda_rec > 0")
    return parts


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers copied, but for the image feature
    bank, which only the EMA mapper (the one saved) holds."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, buffer in model.named_buffers():
        if name != "image_feature_bank":
            ema_buffers[name].copy_(buffer)


@torch.no_grad()
def feature_bank(batches, clip: nn.Module, count: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """CLIP image features [<= count, D] of the run's fixed bank images (`TrainingBatches.bank_images`)."""
    return torch.cat([clip.encode_image(images).float() for images in batches.bank_images(count, batch_size, device)])


# --------------------------------------------------------------------------------------------
# Building the frozen networks from a pack or from explicit sources
# --------------------------------------------------------------------------------------------

def build_models(config: TrainConfig, device: torch.device) -> TrainModels:
    """G, CLIP, initial D and identity net for `config` (a pack, or --generator + --clip)."""
    want_identity = config.lambda_id > 0 and config.identity != "off"
    if config.pack:
        if config.generator or config.clip:
            raise UserInputError("give either --pack or --generator with --clip, not both")
        from ..packs import load_pack

        pack = load_pack(config.pack, device=device, backend=config.backend, need_mapper=False)
        discriminator = pack.load_discriminator() if config.lambda_adv > 0 else None
        identity = pack.load_identity() if want_identity and hasattr(pack, "load_identity") else None
        return TrainModels(pack.generator, pack.clip, discriminator, identity, sources=_pack_sources(pack))
    if not (config.generator and config.clip):
        raise UserInputError("no models to train against", hint="give --pack NAME, or --generator SRC and --clip MODEL:TAG")
    from ..packs import load_models

    # The same --generator/--clip forms as generate/edit (packs.load_models), without a mapper.
    loaded = load_models(generator=config.generator, clip=config.clip, device=device, backend=config.backend,
                         need_mapper=False)
    sources = {"generator": config.generator, **clip_sources(config.clip)}
    discriminator = None
    if config.lambda_adv > 0:
        from ..stylegan2.convert import load_discriminator

        try:
            discriminator = load_discriminator(str(loaded.paths["generator"]), device=device, backend=config.backend)
            sources["discriminator"] = config.generator
        except CheckpointError:
            _stderr(f"{config.generator} holds no discriminator: training a fresh critic")
    identity = None
    if want_identity and config.identity == "on":  # "auto" means off: an explicit G is not known to be a face G
        from ..weights import fetch

        identity = L.build_identity_net(fetch(L.IDENTITY_WEIGHTS))
        sources["identity"] = L.IDENTITY_WEIGHTS
    return TrainModels(loaded.generator, loaded.clip, discriminator, identity, sources=sources)


def clip_sources(spec: str) -> dict[str, str]:
    """How a --clip spec is written into a pack entry (clip_model, clip_pretrained, clip_weights).

    A local CLIP (clip_config.json) is recorded as its config path with tag "local" (packs.load_pack
    reads clip_model ending in .json as such); MODEL:FILE records the file as both tag and weights.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "clip_config.json"
    if path.suffix == ".json":
        return {"clip_model": str(path.resolve()), "clip_pretrained": "local",
                "clip_weights": str(path.resolve().with_name("clip.safetensors"))}
    model, _, tag = spec.partition(":")
    if Path(tag).expanduser().is_file():
        weights = str(Path(tag).expanduser().resolve())
        return {"clip_model": model, "clip_pretrained": weights, "clip_weights": weights}
    from ..weights import load_registry

    return {"clip_model": model, "clip_pretrained": tag,
            "clip_weights": _registry_clip_weights(load_registry(), model, tag)}


def _registry_clip_weights(registry, model_name: str, tag: str) -> str:
    """The registry file a pack uses for CLIP `model_name:tag` (model names compared without -quickgelu)."""
    def base(name: str) -> str:
        return name.removesuffix("-quickgelu").lower()

    for pack in registry.packs.values():
        if pack.clip_weights and pack.clip_pretrained == tag and base(pack.clip_model or "") == base(model_name):
            return pack.clip_weights
    raise UserInputError(f"--clip {model_name}:{tag}: no weights file for it in the registry",
                         hint="use MODEL:FILE with a local open_clip checkpoint")


def _pack_sources(pack) -> dict[str, str]:
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


def _fresh_discriminator(generator: nn.Module, seed: int) -> nn.Module:
    """A new StyleGAN2 critic for G's resolution, initialised from the run's seed.

    As wide as G at each resolution (NVIDIA's configs pair G and D that way): the 512-channel default
    would make the critic of a small generator (the shapes pack's 16-64 channels) most of a step's cost.
    """
    from ..stylegan2.networks import build_discriminator

    config = getattr(generator, "config", None)
    channels = config.channels_per_resolution() if hasattr(config, "channels_per_resolution") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + STREAM_D_INIT)
        return build_discriminator(int(generator.img_resolution), channels=channels)


def export_local_pack(name: str, mapper_path: Path, sources: dict[str, str], config: TrainConfig) -> str:
    """Register the trained mapper with its G and CLIP as local pack `name` (so `--pack name` works)."""
    from ..weights import PackEntry, register_local_pack

    missing = [key for key in ("generator", "clip_model", "clip_pretrained") if not sources.get(key)]
    if missing:
        raise UserInputError(f"--export-pack {name}: the run's models lack {', '.join(missing)} "
                             "(a pack needs a registry/ file generator and an open_clip MODEL:TAG CLIP)")
    entry = PackEntry(name=name, generator=sources["generator"], clip_model=sources["clip_model"],
                      clip_pretrained=sources["clip_pretrained"], clip_weights=sources.get("clip_weights"),
                      mapper=str(mapper_path.resolve()), discriminator=sources.get("discriminator"),
                      identity=sources.get("identity"),
                      description=f"mapper trained by clip2gan train ({config.steps} steps, data {config.data})")
    register_local_pack(entry)
    return name


# --------------------------------------------------------------------------------------------
# Run directory, checkpoints, RNG
# --------------------------------------------------------------------------------------------

def check_run_dir(run_dir: Path, resume: bool) -> None:
    """New run: the directory must be absent or empty; resume: it must hold checkpoints. Writable either way.

    Only `run_dir` itself is created here, so a run that fails while loading models leaves an empty
    directory that the same command accepts again.
    """
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise UserInputError(f"--resume {run_dir}: no checkpoints/ folder there (not a training run)")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserInputError(f"run directory {run_dir} already exists; refusing to overwrite it",
                             hint=f"use --resume {run_dir} to continue it, or another --out")
    ensure_writable_dir(run_dir)


def prepare_run_dir(run_dir: Path) -> None:
    """Create checkpoints/ and samples/, and remove temp files of a save that was killed half-way."""
    ensure_writable_dir(run_dir / "checkpoints")
    ensure_writable_dir(run_dir / "samples")
    for leftover in (run_dir / "checkpoints").glob(".step-*.tmp"):
        leftover.unlink(missing_ok=True)


def checkpoint_paths(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in a run, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, config: TrainConfig, mapper: Mapper, mapper_ema: Mapper,
                    discriminator: nn.Module | None, opt_m, opt_d, scaler, sources: dict[str, str]) -> Path:
    """Write checkpoints/step-N.pt and mapper.safetensors atomically; prune old checkpoints after.

    Each file appears under its final name only once complete (temp file + fsync + rename), so a
    kill at any moment leaves the previous checkpoint intact.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config.to_dict(),
        "sources": dict(sources),
        "mapper_config": mapper.config.to_dict(),
        "mapper": mapper.state_dict(),
        "mapper_ema": mapper_ema.state_dict(),
        "discriminator": discriminator.state_dict() if discriminator is not None else None,
        "opt_m": opt_m.state_dict(),
        "opt_d": opt_d.state_dict() if opt_d is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
    }
    target = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    with atomic_path(target) as tmp:
        write_checkpoint_file(state, tmp)
    metadata = {"clip2gan.train_step": str(step),
                **{f"clip2gan.source.{key}": value for key, value in sorted(sources.items())}}
    save_mapper_reproducibly(mapper_ema, run_dir / "mapper.safetensors", metadata)
    for _, old in checkpoint_paths(run_dir)[:-config.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return target


def save_mapper_reproducibly(mapper: Mapper, path: Path, metadata: dict[str, str]) -> Path:
    """save_mapper, then rewrite the safetensors JSON header with sorted keys.

    safetensors stores the metadata through a Rust HashMap whose iteration order changes from
    call to call, so the same weights would give different bytes; sorting the header (same length,
    same tensor offsets) makes equal weights give byte-identical files, as resume promises.
    """
    import struct

    save_mapper(mapper, path, metadata=metadata)
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) <= header_size:  # always true (same entries); padded with spaces as safetensors pads
        with atomic_path(path) as tmp:
            tmp.write_bytes(data[:8] + text + b" " * (header_size - len(text)) + data[8 + header_size:])
    return path


def write_checkpoint_file(state: dict[str, Any], path: Path) -> None:
    """Serialise a checkpoint dict (the one place that writes bytes; tests inject failures here)."""
    try:
        torch.save(state, path)
    except RuntimeError as error:  # torch reports a failed write (a full disk: "unexpected pos") this way
        free_mib = shutil.disk_usage(path.parent).free / 2**20
        raise OutputError(f"cannot write a checkpoint in {path.parent} ({free_mib:.1f} MiB free on that disk): "
                          f"{first_line(error, 120)}", hint="free some space and resume with --resume") from error


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest readable checkpoint of a run (an unreadable newest one falls back to the previous)."""
    candidates = checkpoint_paths(run_dir)
    if not candidates:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    errors = []
    for step, path in reversed(candidates):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or foreign file: try the one before
            errors.append(f"{path.name}: {first_line(error, 120)}")
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            errors.append(f"{path.name}: not a clip2gan training checkpoint")
            continue
        if errors:
            _stderr(f"Skipped unreadable checkpoint(s): {'; '.join(errors)}")
        return state
    raise CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}: {'; '.join(errors)}")


def _check_resume_compatible(checkpoint: dict[str, Any], mapper: Mapper, generator: nn.Module, clip: nn.Module,
                             discriminator: nn.Module | None) -> None:
    """CheckpointError when the G/CLIP pair of this run does not fit the mapper being resumed."""
    saved = Mapper(config=type(mapper.config).from_dict(checkpoint["mapper_config"]))
    check_compatible(saved, generator, clip)
    if saved.config != mapper.config:
        raise CheckpointError(f"the checkpoint's mapper ({saved.extra_repr()}) differs from this run's "
                              f"({mapper.extra_repr()})", hint="resume with the config the run was started with")
    if (discriminator is None) != (checkpoint.get("discriminator") is None):
        raise CheckpointError("the checkpoint and this run disagree on the adversarial loss (lambda_adv) being on")
    if discriminator is not None:
        expected = {k: tuple(v.shape) for k, v in discriminator.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in checkpoint["discriminator"].items()}
        if expected != found:
            raise CheckpointError("the checkpoint's discriminator does not fit this generator's resolution")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (pickle-free types only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    random.setstate(_to_tuples(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Logging and samples
# --------------------------------------------------------------------------------------------

class _MetricsWriter:
    """metrics.jsonl (always) and TensorBoard events (when tensorboard is installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tensorboard = None

    def write(self, step: int, losses: dict[str, float], steps_per_second: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"loss/{k}": v for k, v in losses.items()}, "steps_per_s": steps_per_second}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from error
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint being resumed (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@torch.no_grad()
def write_sample_sheet(path: Path, held_out: torch.Tensor | None, prompts: list[str], clip: nn.Module,
                       mapper: nn.Module, generator: nn.Module) -> Path | None:
    """PNG grid: row 1 held-out images, row 2 their reconstructions, then one image per prompt (the prompt
    row alone without held-out images; nothing without either)."""
    from ..imageio import make_grid, save_png

    tiles = []
    if held_out is not None and held_out.shape[0]:
        reconstructed = generator.synthesis(mapper(clip.encode_image(held_out)), noise_mode="const").float()
        tiles = [held_out.float(), reconstructed]
    elif not prompts:
        return None
    columns = held_out.shape[0] if tiles else len(prompts)
    if prompts:
        generated = generator.synthesis(mapper(clip.encode_text(prompts)), noise_mode="const").float()
        padding = (-generated.shape[0]) % columns
        if padding:  # fill the last row with mid-grey
            generated = torch.cat([generated, generated.new_zeros(padding, *generated.shape[1:])])
        tiles.append(generated)
    grid = make_grid(torch.cat(tiles).clamp(-1, 1).cpu(), columns=columns)
    return save_png(path, grid, metadata={"clip2gan.prompts": list(prompts)})


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, values) -> None: ...
    def close(self) -> None: ...


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------

def init_distributed(device_spec: str) -> DistributedContext:
    """Join the process group torchrun set up (env://); nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistributedContext(rank, world_size, local_rank, initialised_here=False)
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, initialised_here=True)


def _device_for(device_spec: str, dist_ctx: DistributedContext) -> torch.device:
    device = resolve_device(device_spec)
    if dist_ctx.enabled and device.type == "cuda":
        return torch.device("cuda", dist_ctx.local_rank)  # one GPU per process
    return device


def _barrier(dist_ctx: DistributedContext) -> None:
    if dist_ctx.enabled:
        torch.distributed.barrier()


def _broadcast_parameters(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(tensor.data, src=0)


def _all_reduce_gradients(module: nn.Module, dist_ctx: DistributedContext) -> None:
    """Average gradients across ranks. The critic is not wrapped in DDP because its gradient
    penalty differentiates D's output with respect to its input (autograd.grad with create_graph),
    which DDP's reducer does not support; stylegan2-ada syncs its networks the same manual way."""
    if not dist_ctx.enabled:
        return
    for param in module.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad.div_(dist_ctx.world_size)


def _reduce_for_logging(values: dict[str, torch.Tensor], dist_ctx: DistributedContext) -> dict[str, float]:
    """Scalars as floats, averaged over ranks (one all-reduce; a NaN on any rank shows on all)."""
    names = list(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    if dist_ctx.enabled:
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
        stacked /= dist_ctx.world_size
    return dict(zip(names, stacked.tolist()))


__all__ = ["TrainModels", "TrainResult", "run_training", "build_models", "clip_sources", "save_checkpoint",
           "load_latest_checkpoint", "write_sample_sheet", "update_ema", "mapper_losses", "export_local_pack"]
