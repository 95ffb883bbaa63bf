"""The CLIP2GAN training loop: text-free training of the mapper M with a frozen CLIP and a frozen G.

    image x -> f = CLIP(x) -> M(f) = W+ -> G -> x'      (and f1 = perturb(f) -> G(M(f1)) for L_div)

Read `run_training` top to bottom: `setup`, `resume_from_checkpoint`, `setup_data`, then `train_loop`,
whose every step is
  1. `critic_step`: critic updates (WGAN-GP) on real x vs detached x',
  2. `mapper_gradients` of lambda_rec*L_rec + lambda_lpips*L_LPIPS + lambda_adv*L_G + lambda_id*L_id
     + lambda_div*L_div, accumulated over `grad_accum` micro-batches, then `mapper_update` (optimiser, EMA),
  3. logging, sample sheets, checkpoints.
Beside it: `models` (what a run trains against), `checkpoints` (run directory, save/load, RNG),
`distributed` (torchrun helpers), `reporting` (metrics, sample sheets, progress bar).

Reproducibility: every random draw of a step (batch, synthetic z, feature noise, GP mixing) comes
from a CPU generator seeded by (seed, step, rank), so a run resumed from a checkpoint takes exactly
the steps the uninterrupted run would have taken. Multi-process runs (torchrun) wrap the mapper in
DistributedDataParallel; only rank 0 writes files.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..device import place_model, resolve_precision, seed_everything
from ..errors import CheckpointError, TrainingError, UserInputError, first_line
from ..fileutil import atomic_write_text
from ..mapper import Mapper, perturb_clip_features
from . import losses as L
from .checkpoints import (check_resume_compatible, check_run_dir, load_latest_checkpoint, prepare_run_dir,
                          restore_rng_state, save_checkpoint)
from .config import TrainConfig, checkpointing_enabled, learning_rate
from .data import STREAM_GP, STREAM_NOISE, SyntheticSource, TrainingBatches, build_batches, step_generator
from .distributed import (DistributedContext, all_reduce_gradients, barrier, broadcast_parameters,
                          close_distributed, device_for, init_distributed, reduce_for_logging, wrap_data_parallel)
from .models import TrainModels, build_models, export_local_pack, fresh_discriminator
from .reporting import MetricsWriter, RunningMeans, progress_bar, stderr_line, truncate_metrics, write_sample_sheet

LOSS_NAMES = ("rec", "lpips", "adv", "id", "div")


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
class TrainState:
    """The networks, optimisers and precision tools the loop uses, built by `setup`."""

    generator: nn.Module                      # frozen
    clip: nn.Module                           # frozen
    mapper: Mapper                            # trained
    mapper_ema: Mapper                        # its EMA (what is saved)
    opt_m: torch.optim.Optimizer
    scaler: torch.amp.GradScaler              # enabled for fp16 only; a no-op otherwise
    discriminator: nn.Module | None = None    # the critic (lambda_adv > 0)
    opt_d: torch.optim.Optimizer | None = None
    identity: nn.Module | None = None         # L_id module
    perceptual: nn.Module | None = None       # L_LPIPS module
    mapper_forward: nn.Module | None = None   # the mapper as the losses call it (DDP and/or compiled)
    start_step: int = 0                       # steps already done (resume)


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
    log = log or stderr_line
    config = config.validate()
    run_dir = Path(run_dir)
    dist_ctx = init_distributed(config.device)
    try:
        device = device_for(config.device, dist_ctx)
        block_precision, scaler = precision(config.precision, device)
        if dist_ctx.is_main:
            check_run_dir(run_dir, resume)  # before minutes of model loading
        barrier(dist_ctx)
        models = models or build_models(config, device)
        state = setup(config, models, device, block_precision, scaler)
        if resume:
            resume_from_checkpoint(state, config, run_dir, dist_ctx, log)
        if dist_ctx.is_main:
            prepare_run_dir(run_dir)
            atomic_write_text(run_dir / "config.toml", config.to_toml())
        state.mapper_forward = wrap_for_training(state, config, device, dist_ctx)
        batches, stream = setup_data(state, config, device, dist_ctx, log)
        last_losses, steps_per_second = train_loop(state, config, run_dir, device, batches, stream,
                                                   models.sources, dist_ctx, progress)
        exported = None
        if export_pack and dist_ctx.is_main:
            exported = export_local_pack(export_pack, run_dir / "mapper.safetensors", models.sources, config)
            log(f"Registered local pack '{exported}': use --pack {exported}.")
        return TrainResult(run_dir, config.steps, run_dir / "mapper.safetensors", last_losses, steps_per_second,
                           exported, mapper=state.mapper, mapper_ema=state.mapper_ema, rank=dist_ctx.rank)
    finally:
        close_distributed(dist_ctx)


def train_loop(state: TrainState, config: TrainConfig, run_dir: Path, device: torch.device,
               batches: TrainingBatches, stream: Iterator[torch.Tensor], sources: dict[str, str],
               dist_ctx: DistributedContext, progress: bool) -> tuple[dict[str, float], float]:
    """Steps start_step..steps; returns the last logged mean losses and the steps per second."""
    writer = MetricsWriter(run_dir, enabled=dist_ctx.is_main)
    held_out = batches.held_out(config.num_sample_images, device) if dist_ctx.is_main else None
    bar = progress_bar(config.steps, state.start_step, enabled=progress and dist_ctx.is_main)
    running, last_losses = RunningMeans(), {}
    started = time.perf_counter()
    try:
        for step in range(state.start_step, config.steps):
            step_number = step + 1  # steps completed after this iteration (what logs and files say)

            # 1. critic (WGAN-GP): real x against detached reconstructions
            critic_values = critic_step(state, config, stream, step, dist_ctx)

            # 2. mapper: gradients of the weighted losses, a finite check on every rank, one update + EMA
            values = mapper_gradients(state, config, stream, step, dist_ctx, critic_values)
            stop_if_not_finite(values, step_number, run_dir)
            grad_norm = mapper_update(state, config, step)
            if math.isfinite(grad_norm):  # fp16 overflow steps (skipped by the scaler) are not logged
                values["grad_norm"] = grad_norm

            # 3. bookkeeping
            running.add(values)
            bar.update(1)
            if is_due(step_number, config.log_every, config.steps):
                last_losses = running.means()
                speed = (step_number - state.start_step) / max(time.perf_counter() - started, 1e-9)
                writer.write(step_number, last_losses, speed)
                bar.set_postfix({name: f"{value:.4g}" for name, value in last_losses.items()
                                 if name in LOSS_NAMES + ("total",)})
            if dist_ctx.is_main and is_due(step_number, config.sample_every, config.steps):
                write_sample_sheet(run_dir / "samples" / f"step-{step_number:08d}.png", held_out,
                                   config.sample_prompts, state.clip, state.mapper_ema, state.generator)
            if is_due(step_number, config.checkpoint_every, config.steps):
                if dist_ctx.is_main:
                    save_checkpoint(run_dir, step_number, config, state.mapper, state.mapper_ema,
                                    state.discriminator, state.opt_m, state.opt_d, state.scaler, sources)
                barrier(dist_ctx)
    finally:
        bar.close()
        writer.close()
    return last_losses, (config.steps - state.start_step) / max(time.perf_counter() - started, 1e-9)


# --------------------------------------------------------------------------------------------
# Set-up and resume
# --------------------------------------------------------------------------------------------

def precision(name: str, device: torch.device) -> tuple[str, torch.amp.GradScaler]:
    """What G's and D's marked blocks run in ("fp32" | "fp16" | "bf16"; "auto" decided by
    device.resolve_precision) and the gradient scaler of the mapper's loss (enabled for fp16 only)."""
    block_precision = resolve_precision(name, device)
    return block_precision, torch.amp.GradScaler(device.type, enabled=block_precision == "fp16")


def prepare_networks(generator: nn.Module, discriminator: nn.Module | None, config: TrainConfig,
                     block_precision: str) -> None:
    """NVIDIA's mixed precision (the num_fp16_res blocks in `block_precision`, all else float32) and
    `checkpoint_blocks` on the placed G (synthesis) and critic."""
    checkpointed = checkpointing_enabled(config.checkpoint_blocks, int(generator.img_resolution))
    generator.set_precision(block_precision)
    generator.synthesis.checkpoint_blocks = checkpointed
    if discriminator is not None:
        discriminator.set_precision(block_precision)
        discriminator.checkpoint_blocks = checkpointed


def setup(config: TrainConfig, models: TrainModels, device: torch.device, block_precision: str,
          scaler: torch.amp.GradScaler) -> TrainState:
    """Frozen networks on `device`, the loss modules, and the trainable mapper (+ EMA) and critic with
    their optimisers, seeded so every rank starts equal; weights float32, G's and D's marked blocks in
    `block_precision`."""
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

    seed_everything(config.seed)
    mapper = Mapper(clip_dim=int(clip.embed_dim), num_ws=int(generator.num_ws), w_dim=int(generator.w_dim),
                    noise_mode=config.div_mode, noise_strength=config.div_std,
                    **({"hidden_dim": config.mapper_hidden_dim} if config.mapper_hidden_dim else {}))
    mapper.set_w_offset(generator.w_avg)
    mapper = place_model(mapper, device, trainable=True).train()
    mapper_ema = place_model(copy.deepcopy(mapper), device)  # frozen copy, updated by lerp
    discriminator = opt_d = None
    if config.lambda_adv > 0:
        discriminator = models.discriminator
        if discriminator is None:
            discriminator = fresh_discriminator(generator, config.seed)
        discriminator = place_model(discriminator, device, dtype=torch.float32, trainable=True).train()
        discriminator.requires_grad_(True)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.d_lr, betas=(config.d_beta1, config.d_beta2))
    prepare_networks(generator, discriminator, config, block_precision)
    opt_m = torch.optim.Adam(mapper.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
    return TrainState(generator, clip, mapper, mapper_ema, opt_m, scaler, discriminator, opt_d, identity, perceptual)


def resume_from_checkpoint(state: TrainState, config: TrainConfig, run_dir: Path, dist_ctx: DistributedContext,
                           log: Callable[[str], None]) -> None:
    """Load the newest checkpoint into `state` (weights, optimisers, scaler, RNG, start_step)."""
    checkpoint = load_latest_checkpoint(run_dir)
    try:  # a readable file whose contents do not fit (edited, foreign, damaged) is a one-line error
        check_resume_compatible(checkpoint, state.mapper, state.generator, state.clip, state.discriminator)
        state.mapper.load_state_dict(checkpoint["mapper"])
        state.mapper_ema.load_state_dict(checkpoint["mapper_ema"])
        state.opt_m.load_state_dict(checkpoint["opt_m"])
        if state.discriminator is not None:
            state.discriminator.load_state_dict(checkpoint["discriminator"])
            state.opt_d.load_state_dict(checkpoint["opt_d"])
        if checkpoint.get("scaler"):  # saved by fp16 runs only
            state.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        state.start_step = int(checkpoint["step"])
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"the newest checkpoint in {run_dir / 'checkpoints'} (step "
                              f"{checkpoint.get('step')!r}) does not fit this run: {first_line(error, 160)}",
                              hint="resume with the config the run was started with, or remove that file") \
            from error
    if dist_ctx.is_main:
        log(f"Resuming {run_dir} from step {state.start_step} (to {config.steps}).")
        truncate_metrics(run_dir / "metrics.jsonl", state.start_step)
    if state.start_step >= config.steps:
        raise UserInputError(f"{run_dir} is already at step {state.start_step}; `steps` {config.steps} has "
                             "nothing to do", hint="raise `steps` to continue training")


def wrap_for_training(state: TrainState, config: TrainConfig, device: torch.device,
                      dist_ctx: DistributedContext) -> nn.Module:
    """The mapper as the losses call it: in DDP under torchrun (critic weights broadcast), compiled on request."""
    mapper_forward = wrap_data_parallel(state.mapper, device, dist_ctx)
    if dist_ctx.enabled and state.discriminator is not None:
        broadcast_parameters(state.discriminator)
    if config.compile:
        mapper_forward = torch.compile(mapper_forward)
    return mapper_forward


def setup_data(state: TrainState, config: TrainConfig, device: torch.device, dist_ctx: DistributedContext,
               log: Callable[[str], None]) -> tuple[TrainingBatches, Iterator[torch.Tensor]]:
    """The run's batches and the stream of micro-batches from start_step on; the feature bank when asked."""
    synthetic = SyntheticSource(state.generator, config.synthetic_truncation, device)
    batches, scan = build_batches(config.data, resolution=int(state.generator.img_resolution),
                                  batch_size=config.batch_size, seed=config.seed, synthetic=synthetic,
                                  synthetic_ratio=config.synthetic_ratio, rank=dist_ctx.rank,
                                  world_size=dist_ctx.world_size, num_workers=config.num_workers,
                                  align=config.align_faces, held_out=config.num_sample_images)
    if scan is not None and dist_ctx.is_main:
        log(f"Data: {len(scan.paths)} images in {config.data}" +
            (f" ({len(scan.skipped)} unreadable files skipped)" if scan.skipped else ""))
    critic_batches = config.d_steps_per_m_step if state.discriminator is not None else 0
    micro_per_step = config.grad_accum * (1 + critic_batches)  # fixed, so step -> data is a pure function
    stream = batches.iterate(state.start_step * micro_per_step, device)
    if config.feature_bank_size and dist_ctx.is_main and state.mapper_ema.image_feature_bank.shape[0] == 0:
        # resumed runs already hold it (mapper_ema's state); the images are fixed, so it is the same bank
        state.mapper_ema.set_image_feature_bank(feature_bank(batches, state.clip, config.feature_bank_size,
                                                             config.batch_size, device))
        log(f"Feature bank: CLIP features of {state.mapper_ema.image_feature_bank.shape[0]} training images "
            "(generate --prior retrieval).")
    return batches, stream


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------

def critic_step(state: TrainState, config: TrainConfig, stream: Iterator[torch.Tensor], step: int,
                dist_ctx: DistributedContext) -> dict[str, torch.Tensor]:
    """`d_steps_per_m_step` WGAN-GP updates of the critic; its losses of the last micro-batch ({} without one)."""
    discriminator = state.discriminator
    if discriminator is None:
        return {}
    for critic_index in range(config.d_steps_per_m_step):
        state.opt_d.zero_grad(set_to_none=True)
        for micro in range(config.grad_accum):
            real = next(stream)
            with torch.no_grad():
                fake = state.generator.synthesis(state.mapper(state.clip.encode_image(real)), noise_mode="const")
            mix = step_generator(config.seed, STREAM_GP, (step * config.d_steps_per_m_step + critic_index)
                                 * config.grad_accum + micro, dist_ctx.rank)
            # the WGAN term's graph is freed before the penalty's double-backward graph is built
            d_loss, parts = L.critic_backward(discriminator, real, fake, config.gp_weight, mix,
                                              accumulation=config.grad_accum)
            del real, fake
        all_reduce_gradients(discriminator, dist_ctx)
        state.opt_d.step()
    return {"d_loss": d_loss, **parts}


def mapper_gradients(state: TrainState, config: TrainConfig, stream: Iterator[torch.Tensor], step: int,
                     dist_ctx: DistributedContext, critic_values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Backward of the weighted mapper losses over `grad_accum` micro-batches (scaled by the scaler);
    returns the last micro-batch's losses and total, with `critic_values`, averaged over ranks."""
    state.opt_m.zero_grad(set_to_none=True)
    if state.discriminator is not None:
        state.discriminator.requires_grad_(False)  # L_G trains M only
    for micro in range(config.grad_accum):
        real = next(stream)
        skip_sync = dist_ctx.enabled and micro < config.grad_accum - 1  # DDP syncs on the last micro-batch
        with state.mapper_forward.no_sync() if skip_sync else nullcontext():
            noise = step_generator(config.seed, STREAM_NOISE, step * config.grad_accum + micro, dist_ctx.rank)
            parts = mapper_losses(config, real, state.clip, state.mapper_forward, state.generator, noise,
                                  state.perceptual, state.discriminator, state.identity)
            total = sum(LOSS_WEIGHTS[name](config) * value for name, value in parts.items())
            state.scaler.scale(total / config.grad_accum).backward()
            parts, total = {name: value.detach() for name, value in parts.items()}, total.detach()  # no graph kept
    if state.discriminator is not None:
        state.discriminator.requires_grad_(True)
    return reduce_for_logging({**parts, "total": total, **critic_values}, dist_ctx)


def stop_if_not_finite(values: dict[str, float], step_number: int, run_dir: Path) -> None:
    """TrainingError naming the first non-finite loss (every rank sees the same averaged values)."""
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise TrainingError(f"loss {bad[0]} is {values[bad[0]]} at step {step_number}; stopped",
                            hint=f"the last good checkpoint in {run_dir / 'checkpoints'} is kept; "
                                 "lower lr or check the data")


def mapper_update(state: TrainState, config: TrainConfig, step: int) -> float:
    """Clip the gradient, set this step's learning rate, step the optimiser (through the scaler), update
    the EMA; returns the gradient norm (not finite on an fp16 step the scaler skips)."""
    state.scaler.unscale_(state.opt_m)  # clip (and measure) the true gradient, not the scaled one
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.mapper.parameters(), config.max_grad_norm or math.inf))
    for group in state.opt_m.param_groups:
        group["lr"] = learning_rate(config, step)
    state.scaler.step(state.opt_m)
    state.scaler.update()
    update_ema(state.mapper_ema, state.mapper, config.ema_decay)
    return grad_norm


def is_due(step_number: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, sample, checkpoint) runs after `step_number`: every N steps and at the end."""
    return step_number % every == 0 or step_number == last


# Loss name -> its weight in the config (a table, so the sum and the logs agree).
LOSS_WEIGHTS: dict[str, Callable[[TrainConfig], float]] = {
    "rec": lambda c: c.lambda_rec,
    "lpips": lambda c: c.lambda_lpips,
    "adv": lambda c: c.lambda_adv,
    "id": lambda c: c.lambda_id,
    "div": lambda c: c.lambda_div,
}


def mapper_losses(config: TrainConfig, real: torch.Tensor, clip: nn.Module, mapper: nn.Module,
                  generator: nn.Module, noise: torch.Generator, perceptual: nn.Module | None,
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
    images = generator.synthesis(mapper(features_in), noise_mode="const")  # float32 at any block precision
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


__all__ = ["LOSS_WEIGHTS", "TrainModels", "TrainResult", "TrainState", "build_models", "critic_step",
           "feature_bank", "mapper_gradients", "mapper_losses", "mapper_update", "run_training", "setup",
           "train_loop", "update_ema"]
