"""Train the shapes pack's StyleGAN2 (the project's own networks) on the procedural domain.

Plain adversarial training from scratch did not converge on 2 CPU cores (docs/shapes_pack.md).
This recipe gives the generator its structure first and lets the GAN refine it:

1. decoder: an attribute encoder E (one-hot attributes + Fourier position -> w) and the
   synthesis network are trained together to render `data.render(attrs)` from `E(attrs)`
   broadcast to W+ (L1 on pixels). The rendering task is deterministic, so it converges fast.
2. mapping: the generator's own mapping network learns z -> E(attrs(z)), where attrs(z) is
   a fixed code: shape = argmax of z[0:4], colour = argmax of z[4:10], size and background
   = signs of z[10], z[11], position = normal CDF of z[12], z[13] (all on the normalised z
   the mapping sees). Uniform over the domain's attributes by construction.
3. adversarial: the full generator (mapping + synthesis) against a StyleGAN2 discriminator:
   non-saturating logistic loss, lazy R1, EMA generator, Adam betas (0, 0.99), differentiable
   translation + cutout augmentation (no colour augmentation: colour is an attribute), plus an
   anchor term that keeps the decoder's rendering (weight `anchor_weight`).

Budgets are steps, and every step's random draws are seeded from (seed, stage, step), so a run
gives the same weights however often it was interrupted (for one thread count and torch build).
Everything is resumable: `<workdir>/gan_ckpt.pt` (every `save_every` steps) records the stage and
its progress; `<workdir>/gan_log.jsonl` gets one quality line per evaluation and `gan_grid_*.png`
sample grids. Usage:

    python -m clip2gan_cli.recipes.shapes.gan --workdir work_shapes --decoder-steps 5500 --mapping-steps 13000 \
        --adversarial-steps 1500
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...fileutil import atomic_path
from ...packs.shapes import data
from ...stylegan2.convert import estimate_w_avg, load_discriminator, load_generator, save_discriminator, save_generator
from ...stylegan2.networks import build_discriminator, build_generator
from ...train.checkpoints import sort_safetensors_header
from ...train.trainer import update_ema
from .checker import HEADS, load_or_train_checker

STAGES = ("decoder", "mapping", "adversarial")
W_AVG_SAMPLES, W_AVG_SEED = 4096, 99  # the truncation centre every exported generator carries
ADVERSARIAL_TRAINS = ("all", "mapping", "synthesis", "discriminator")


@dataclass
class GanRecipe:
    """Architecture and optimisation settings (stored in the checkpoint and the exported metadata)."""

    z_dim: int = 32  # latent size (the first 14 dims carry the attribute code)
    w_dim: int = 128  # intermediate latent size
    mapping_layers: int = 4  # enough depth for the argmax-like steps of the attribute code
    # Small tables: per-sample modulation/demodulation costs channels^2 and dominated the step
    # time at 128 channels on the shared 2-core machine; 16 channels at 32 px suffice for flat shapes.
    g_channels: dict = field(default_factory=lambda: {4: 64, 8: 64, 16: 32, 32: 16})
    d_channels: dict = field(default_factory=lambda: {4: 64, 8: 64, 16: 32, 32: 16})
    batch: int = 32  # adversarial stage
    decoder_batch: int = 16  # a deterministic regression: more, smaller steps converge faster per image
    edge_weight: float = 2.0  # L1 on pixel differences: outlines are few pixels but all of the shape
    # The first decoder steps: plain L1 at batch 32 places colours and positions before the edge term
    # sharpens outlines (measured: docs/shapes_pack.md)
    decoder_warmup_steps: int = 500
    decoder_warmup_batch: int = 32
    decoder_lr: float = 0.003
    mapping_lr: float = 0.001
    g_lr: float = 0.0005  # adversarial stage: the generator is already structured, so step gently
    d_lr: float = 0.001  # a faster D won and dragged the synthesis off the decoder
    r1_gamma: float = 1.0
    r1_interval: int = 16
    ema_half_life_images: float = 10_000.0
    # L1 decoder anchor in the adversarial stage: holds the decoder's rendering while D still sharpens
    anchor_weight: float = 10.0
    # The anchor of a mapping-only adversarial stage: MSE between the mapping network's w and that of a
    # frozen copy taken when the stage began (a trust region), so D can sharpen the blends between
    # attribute codes but not drag the code away (unanchored, D won). 0 = unanchored. Needs no
    # attribute encoder: works from a pack's files alone.
    mapping_anchor_weight: float = 0.0
    # What the adversarial stage trains: "all" (mapping + synthesis + E, with the anchor), "mapping"
    # (synthesis frozen: the pack's CLIP mapper, trained against this synthesis network, stays valid) or
    # "synthesis" (+ E, with the anchor; the mapping network's uniform attribute code stays as trained,
    # so D can sharpen what the synthesis renders between attribute clusters but cannot drop modes), or
    # "discriminator" (G frozen: D alone learns this G's samples against the data, the pack's critic)
    adversarial_trains: str = "synthesis"
    translate_px: int = 3  # DiffAugment translation (pixels)
    cutout: float = 0.25  # DiffAugment cutout side as a fraction of the image


# ----------------------------------------------------------------------------------------------
# The attribute code of z and the attribute encoder


def normalize_z(z: torch.Tensor) -> torch.Tensor:
    """The mapping network's own input normalisation (normalize_2nd_moment in MappingNetwork.forward)."""
    return z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


def attributes_from_z(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fixed attribute code: indices per attribute and centre (x, y) in pixels."""
    zn = normalize_z(z)
    n_shape, n_color = len(data.SHAPES), len(data.COLORS)
    centre = data.RESOLUTION / 2.0
    normal_cdf = 0.5 * (1 + torch.erf(zn[:, 12:14] / math.sqrt(2)))
    return {
        "shape": zn[:, 0:n_shape].argmax(1),
        "color": zn[:, n_shape:n_shape + n_color].argmax(1),
        "size": (zn[:, 10] > 0).long(),
        "background": (zn[:, 11] > 0).long(),
        "position": centre + data.JITTER * (2 * normal_cdf - 1),
    }


def render_codes(codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ground-truth images [N, 3, 32, 32] in [-1, 1] for attribute codes."""
    position = codes["position"].numpy()
    images = data.render_batch(codes["shape"].numpy(), codes["color"].numpy(), codes["size"].numpy(),
                               codes["background"].numpy(), position[:, 0], position[:, 1])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_codes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform attribute codes (what attributes_from_z gives for z ~ N(0, I))."""
    return {
        "shape": torch.randint(len(data.SHAPES), (n,), generator=generator),
        "color": torch.randint(len(data.COLORS), (n,), generator=generator),
        "size": torch.randint(len(data.SIZES), (n,), generator=generator),
        "background": torch.randint(len(data.BACKGROUNDS), (n,), generator=generator),
        "position": data.RESOLUTION / 2.0 + data.JITTER * (2 * torch.rand(n, 2, generator=generator) - 1),
    }


class AttributeEncoder(nn.Module):
    """Attributes -> w: one-hot codes and Fourier features of the position through a 3-layer MLP."""

    def __init__(self, w_dim: int, frequencies: int = 4):
        super().__init__()
        self.frequencies = frequencies
        in_features = len(data.SHAPES) + len(data.COLORS) + len(data.SIZES) + len(data.BACKGROUNDS) \
            + 2 + 4 * frequencies
        self.net = nn.Sequential(nn.Linear(in_features, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256),
                                 nn.LeakyReLU(0.2), nn.Linear(256, w_dim))

    def forward(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        offset = (codes["position"] - data.RESOLUTION / 2.0) / data.JITTER  # [-1, 1]
        bands = torch.arange(1, self.frequencies + 1, dtype=offset.dtype) * math.pi / 2
        angles = (offset[:, :, None] * bands).flatten(1)
        parts = [F.one_hot(codes["shape"], len(data.SHAPES)), F.one_hot(codes["color"], len(data.COLORS)),
                 F.one_hot(codes["size"], len(data.SIZES)), F.one_hot(codes["background"], len(data.BACKGROUNDS))]
        features = torch.cat([p.float() for p in parts] + [offset, angles.sin(), angles.cos()], dim=1)
        return self.net(features)


# ----------------------------------------------------------------------------------------------
# Losses and augmentation


def diff_augment(images: torch.Tensor, translate_px: int, cutout: float) -> torch.Tensor:
    """DiffAugment translation (zero padding) and cutout; differentiable, no colour changes."""
    n, _, h, w = images.shape
    if translate_px > 0:
        shift = torch.randint(-translate_px, translate_px + 1, (2,)).tolist()  # one shift per batch: cheap
        padded = F.pad(images, [translate_px] * 4)
        top, left = translate_px + shift[0], translate_px + shift[1]
        images = padded[:, :, top:top + h, left:left + w]
    if cutout > 0:
        side = max(1, int(h * cutout))
        cy = torch.randint(0, h, (n, 1, 1))
        cx = torch.randint(0, w, (n, 1, 1))
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        keep = ~(((ys - cy).abs() <= side // 2) & ((xs - cx).abs() <= side // 2))
        images = images * keep.unsqueeze(1).to(images.dtype)
    return images


def broadcast_w(w: torch.Tensor, num_ws: int) -> torch.Tensor:
    return w.unsqueeze(1).repeat(1, num_ws, 1)


# ----------------------------------------------------------------------------------------------
# The trainer


class ShapesGanTrainer:
    """Holds the networks, optimisers and progress of all three stages; checkpoints and evaluates."""

    def __init__(self, workdir: Path, recipe: GanRecipe, seed: int = 0, log=print):
        self.workdir, self.recipe, self.log = workdir, recipe, log
        torch.manual_seed(seed)
        self.G = build_generator(data.RESOLUTION, z_dim=recipe.z_dim, w_dim=recipe.w_dim,
                                 mapping_layers=recipe.mapping_layers, mapping_lr_mul=1.0,
                                 channels=recipe.g_channels, backend="reference")
        self.D = build_discriminator(data.RESOLUTION, channels=recipe.d_channels, backend="reference")
        self.E = AttributeEncoder(recipe.w_dim)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_decoder = torch.optim.Adam(list(self.G.synthesis.parameters()) + list(self.E.parameters()),
                                            lr=recipe.decoder_lr, betas=(0.9, 0.99))
        self.opt_mapping = torch.optim.Adam(self.G.mapping.parameters(), lr=recipe.mapping_lr)
        mb = recipe.r1_interval / (recipe.r1_interval + 1)  # lazy-regularisation correction for D
        adversarial_params = {
            "mapping": list(self.G.mapping.parameters()),
            "synthesis": list(self.G.synthesis.parameters()) + list(self.E.parameters()),
            "all": list(self.G.parameters()) + list(self.E.parameters()),
            "discriminator": [],
        }[recipe.adversarial_trains]
        self.opt_g = (torch.optim.Adam(adversarial_params, lr=recipe.g_lr, betas=(0.0, 0.99))
                      if adversarial_params else None)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=recipe.d_lr * mb, betas=(0.0, 0.99 ** mb))
        self.progress = {stage: {"seconds": 0.0, "images": 0, "steps": 0} for stage in STAGES}
        self.seed = seed
        self.rng = torch.Generator().manual_seed(seed + 1)  # reseeded at every step (seed_step)
        self.fixed_z = torch.randn(64, recipe.z_dim, generator=torch.Generator().manual_seed(1234))
        self.checker = None
        self.mapping_start = None  # the mapping network when the adversarial stage began (mapping_drift)
        self.path = workdir / "gan_ckpt.pt"
        if self.path.exists():
            self._load()

    # --- persistence ---
    def _load(self) -> None:
        ckpt = torch.load(self.path, weights_only=True)
        saved_trains = json.loads(ckpt.get("recipe", "{}")).get("adversarial_trains", "all")
        for name in ("G", "D", "E", "G_ema", "opt_decoder", "opt_mapping", "opt_g", "opt_d"):
            if name == "opt_g" and (saved_trains != self.recipe.adversarial_trains or self.opt_g is None
                                    or ckpt.get("opt_g") is None):
                if self.opt_g is not None:
                    self.log(f"adversarial stage now trains '{self.recipe.adversarial_trains}': fresh generator optimiser")
                continue
            getattr(self, name).load_state_dict(ckpt[name])
        if ckpt.get("mapping_start") is not None:
            self.mapping_start = copy.deepcopy(self.G.mapping).requires_grad_(False)
            self.mapping_start.load_state_dict(ckpt["mapping_start"])
        self.progress = json.loads(ckpt["progress"])
        self.log(f"resumed: {json.dumps(self.progress)}")

    def load_pack_files(self, pack_dir: Path) -> None:
        """Start from a pack's generator.safetensors and discriminator.safetensors (G, G_ema and D)."""
        generator = load_generator(pack_dir / "generator.safetensors", device="cpu", backend="reference")
        self.G.load_state_dict(generator.state_dict())
        self.G_ema.load_state_dict(generator.state_dict())
        self.D.load_state_dict(load_discriminator(pack_dir / "discriminator.safetensors", device="cpu",
                                                  backend="reference").state_dict())

    def save(self) -> None:
        state = {name: getattr(self, name).state_dict() if getattr(self, name) is not None else None
                 for name in ("G", "D", "E", "G_ema", "opt_decoder", "opt_mapping", "opt_g", "opt_d")}
        state["mapping_start"] = self.mapping_start.state_dict() if self.mapping_start is not None else None
        state["progress"] = json.dumps(self.progress)
        state["recipe"] = json.dumps(asdict(self.recipe))
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    # --- stage steps ---
    def seed_step(self, stage: str, step: int) -> None:
        """Seed every random draw of one step (codes, z, noise inputs, augmentation) from the step."""
        step_seed = (self.seed * 1_000_003 + STAGES.index(stage) * 10_000_019 + step) % (1 << 31)
        self.rng.manual_seed(step_seed)
        torch.manual_seed(step_seed)

    def decoder_batch(self, step: int | None) -> tuple[int, float]:
        """(batch size, edge weight) of decoder step `step`: the plain-L1 warm-up, then (or for None) the recipe's."""
        if step is not None and step < self.recipe.decoder_warmup_steps:
            return self.recipe.decoder_warmup_batch, 0.0
        return self.recipe.decoder_batch, self.recipe.edge_weight

    def decoder_step(self, step: int | None = None) -> float:
        batch, edge_weight = self.decoder_batch(step)
        loss = self.decoder_loss(random_codes(batch, self.rng), edge_weight)
        self.opt_decoder.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_decoder.step()
        return loss.item()

    def decoder_loss(self, codes: dict[str, torch.Tensor], edge_weight: float | None = None) -> torch.Tensor:
        """L1 between synthesis(E(attrs)) and the rendered image, plus L1 between their edges."""
        edge_weight = self.recipe.edge_weight if edge_weight is None else edge_weight
        target = render_codes(codes)
        decoded = self.G.synthesis(broadcast_w(self.E(codes), self.G.num_ws), noise_mode="random")
        loss = (decoded - target).abs().mean()
        if edge_weight > 0:
            for dim in (2, 3):
                loss = loss + edge_weight * (decoded.diff(dim=dim) - target.diff(dim=dim)).abs().mean()
        return loss

    def mapping_loss(self, z: torch.Tensor) -> torch.Tensor:
        """MSE between the mapping network's w and E(attrs(z)), the attribute code's target."""
        with torch.no_grad():
            target = self.E(attributes_from_z(z))
        return F.mse_loss(self.G.mapping(z)[:, 0], target)

    def mapping_drift(self, z: torch.Tensor) -> torch.Tensor:
        """MSE between the mapping network's w and that of its copy from the adversarial stage's start."""
        if self.mapping_start is None:
            self.mapping_start = copy.deepcopy(self.G.mapping).requires_grad_(False)
        with torch.no_grad():
            target = self.mapping_start(z)[:, 0]
        return F.mse_loss(self.G.mapping(z)[:, 0], target)

    def mapping_step(self) -> float:
        loss = self.mapping_loss(torch.randn(256, self.recipe.z_dim, generator=self.rng))
        self.opt_mapping.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_mapping.step()
        return loss.item()

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The recipe's DiffAugment (translation + cutout), applied to everything D sees."""
        return diff_augment(images, self.recipe.translate_px, self.recipe.cutout)

    def adversarial_step(self, step: int) -> dict:
        r, n = self.recipe, self.recipe.batch
        if r.adversarial_trains == "discriminator":
            with torch.no_grad():  # G frozen: its EMA weights (what ships) are the fakes D learns
                fake = self.G_ema(torch.randn(n, r.z_dim, generator=self.rng), noise_mode="random")
            return {**self.discriminator_step(step, fake), "g": 0.0, "anchor": 0.0}
        # Generator: fool D, and keep rendering E(attrs) faithfully (anchor).
        self.D.requires_grad_(False)
        mapping_only = r.adversarial_trains == "mapping"
        self.G.synthesis.requires_grad_(not mapping_only)  # frozen parts: no weight gradients to compute
        self.G.mapping.requires_grad_(r.adversarial_trains != "synthesis")
        z = torch.randn(n, r.z_dim, generator=self.rng)
        fake = self.G(z, noise_mode="random")
        g_loss = F.softplus(-self.D(self.augment(fake))).mean()
        anchor, anchor_weight = torch.zeros(()), 0.0
        if mapping_only and r.mapping_anchor_weight > 0:
            anchor, anchor_weight = self.mapping_drift(torch.randn(256, r.z_dim, generator=self.rng)), r.mapping_anchor_weight
        elif r.anchor_weight > 0 and not mapping_only:
            anchor, anchor_weight = self.decoder_loss(random_codes(n // 2, self.rng)), r.anchor_weight
        self.opt_g.zero_grad(set_to_none=True)
        (g_loss + anchor_weight * anchor).backward()
        self.opt_g.step()
        self.D.requires_grad_(True)
        losses = self.discriminator_step(step, fake.detach())
        self._update_ema()
        return {"g": g_loss.item(), **losses, "anchor": anchor.item()}

    def discriminator_step(self, step: int, fake: torch.Tensor) -> dict:
        """Logistic loss on real vs `fake` (detached), lazy R1 on reals."""
        r, n = self.recipe, self.recipe.batch
        real = render_codes(random_codes(n, self.rng))
        d_loss = F.softplus(self.D(self.augment(fake))).mean() + F.softplus(-self.D(self.augment(real))).mean()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        r1 = torch.zeros(())
        if step % r.r1_interval == 0:
            real = real.detach().requires_grad_(True)
            logits = self.D(self.augment(real))
            (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
            r1 = grad.square().sum([1, 2, 3]).mean()
            self.opt_d.zero_grad(set_to_none=True)
            (r1 * (r.r1_gamma / 2) * r.r1_interval).backward()
            self.opt_d.step()
        return {"d": d_loss.item(), "r1": r1.item()}

    def _update_ema(self) -> None:
        update_ema(self.G_ema, self.G, self.ema_decay())

    def ema_decay(self) -> float:
        """Per-step EMA decay of the recipe's half-life in images, rounded to float32 (the weights' precision:
        1 - decay is then exact, as in the lerp the shipped weights were made with)."""
        beta = 0.5 ** (self.recipe.batch / self.recipe.ema_half_life_images)
        return float(torch.tensor(beta, dtype=torch.float32))

    @torch.no_grad()
    def _sync_ema(self) -> None:
        self.G_ema.load_state_dict(self.G.state_dict())

    @torch.no_grad()
    def _set_w_avg(self, G) -> None:
        estimate_w_avg(G, samples=W_AVG_SAMPLES, seed=W_AVG_SEED)

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self, tag: str, n: int = 256, via_encoder: bool = False) -> dict:
        """Checker verdicts on EMA samples: agreement with the z code, confidence, combo coverage.

        via_encoder: render synthesis(E(attrs(z))) instead of G_ema(z) (the decoder stage, before
        the mapping network has learnt the code).
        """
        z = torch.randn(n, self.recipe.z_dim, generator=torch.Generator().manual_seed(4321))
        self.G_ema.eval()
        if via_encoder:
            ws = broadcast_w(self.E(attributes_from_z(z)), self.G_ema.num_ws)
            images = torch.cat([self.G_ema.synthesis(ws[i:i + 128]) for i in range(0, n, 128)])
        else:
            images = torch.cat([self.G_ema(z[i:i + 128]) for i in range(0, n, 128)])
        self._save_grid(images[:64], self.workdir / f"gan_grid_{tag}.png")
        self._save_grid(images[:64], self.workdir / "gan_grid_latest.png")
        result = {"tag": tag, "time": time.strftime("%H:%M:%S"), **{s: dict(p) for s, p in self.progress.items()}}
        if self.checker is None and (self.workdir / "checker.pt").exists():  # trained by its own job
            self.checker = load_or_train_checker(self.workdir / "checker.pt", log=self.log)
        if self.checker is None:
            self.log(f"eval {tag}: grid written; no checker.pt yet, no quality numbers")
            return result
        logits = self.checker(images.clamp(-1, 1))
        codes = attributes_from_z(z)
        confident = torch.ones(n, dtype=torch.bool)
        for key in HEADS:
            probs = logits[key].softmax(1)
            result[f"z_agree_{key}"] = float((probs.argmax(1) == codes[key]).float().mean())
            confident &= probs.max(1).values > 0.9
        result["clean"] = float(confident.float().mean())
        combo = logits["shape"].argmax(1) * len(data.COLORS) + logits["color"].argmax(1)
        counts = torch.bincount(combo, minlength=len(data.SHAPES) * len(data.COLORS)).float() / n
        result["combos_covered"] = int((counts >= 0.25 / counts.numel()).sum())
        result["position_error_px"] = float((logits["position"] - codes["position"]).abs().mean())
        with open(self.workdir / "gan_log.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")
        self.log("eval " + json.dumps({k: v for k, v in result.items() if k not in STAGES}))
        return result

    @staticmethod
    def _save_grid(images: torch.Tensor, path: Path) -> None:
        from PIL import Image

        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rows = int(math.sqrt(len(pixels)))
        grid = pixels[: rows * rows].reshape(rows, rows, 32, 32, 3).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * 32, rows * 32, 3)
        with atomic_path(path) as tmp:
            Image.fromarray(grid).resize((rows * 64, rows * 64), Image.NEAREST).save(tmp, format="PNG")

    # --- the loop ---
    def run_stage(self, stage: str, steps: int, eval_every: int = 1000, save_every: int = 500) -> None:
        """Run one stage until its (cumulative, resumable) step budget is spent."""
        progress = self.progress[stage]
        if progress["steps"] >= steps:
            return
        if stage == "adversarial" and progress["steps"] == 0:
            self._set_w_avg(self.G)
            self._sync_ema()
        self.log(f"stage {stage}: {progress['steps']} of {steps} steps done")
        start = time.time() - progress["seconds"]
        while progress["steps"] < steps:
            step = progress["steps"]
            self.seed_step(stage, step)
            if stage == "decoder":
                metrics = {"loss": self.decoder_step(step)}
                progress["images"] += self.decoder_batch(step)[0]
            elif stage == "mapping":
                metrics = {"mse": self.mapping_step()}
                progress["images"] += 256
            else:
                metrics = self.adversarial_step(step)
                progress["images"] += self.recipe.batch
            progress["steps"] = step + 1
            progress["seconds"] = time.time() - start
            if progress["steps"] % 100 == 0:
                rate = progress["images"] / max(progress["seconds"], 1e-6) * 60
                self.log(f"{stage} step {progress['steps']}/{steps} "
                         f"{json.dumps({k: round(v, 4) for k, v in metrics.items()})}"
                         f" {rate:.0f} img/min {progress['seconds'] / 60:.1f} min")
            if progress["steps"] % save_every == 0 and progress["steps"] < steps:
                self._finish_interval(stage)
                self.save()
            if progress["steps"] % eval_every == 0 and progress["steps"] < steps:
                self._finish_interval(stage)
                self.evaluate(f"{stage}_{progress['steps']:06d}", via_encoder=stage == "decoder")
        self._finish_interval(stage)
        self.save()
        self.evaluate(f"{stage}_end", via_encoder=stage == "decoder")

    def _finish_interval(self, stage: str) -> None:
        """Before saving/evaluating: keep G_ema meaningful in the non-adversarial stages."""
        if stage in ("decoder", "mapping"):
            self._set_w_avg(self.G)
            self._sync_ema()

    def export(self, out_dir: Path) -> tuple[Path, Path]:
        """Write the EMA generator and the discriminator with the project's safetensors writers."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self._set_w_avg(self.G_ema)
        meta = {"recipe": asdict(self.recipe), "progress": self.progress}
        g_path = save_generator(self.G_ema, out_dir / "generator.safetensors", extra_metadata=meta)
        d_path = save_discriminator(self.D, out_dir / "discriminator.safetensors", extra_metadata=meta)
        return sort_safetensors_header(g_path), sort_safetensors_header(d_path)  # same weights, same header bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes pack's StyleGAN2 (resumable).")
    parser.add_argument("--workdir", type=Path, default=Path("work_shapes"))
    parser.add_argument("--decoder-steps", type=int, default=5500)
    parser.add_argument("--mapping-steps", type=int, default=13000)
    parser.add_argument("--adversarial-steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=1000, help="checker evaluation and sample grid every N steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adversarial-trains", choices=ADVERSARIAL_TRAINS, default="synthesis",
                        help="what the adversarial stage trains (mapping: synthesis frozen; synthesis: mapping "
                             "frozen; discriminator: G frozen)")
    parser.add_argument("--mapping-anchor", type=float, default=0.0,
                        help="weight of the anchor of a mapping-only adversarial stage (MSE to the mapping "
                             "network the stage started from)")
    parser.add_argument("--export", type=Path, default=None, help="write generator/discriminator here at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = GanRecipe(adversarial_trains=args.adversarial_trains, mapping_anchor_weight=args.mapping_anchor)
    trainer = ShapesGanTrainer(args.workdir, recipe, seed=args.seed)
    for stage, steps in zip(STAGES, (args.decoder_steps, args.mapping_steps, args.adversarial_steps)):
        trainer.run_stage(stage, steps, eval_every=args.eval_every)
    if args.export is not None:
        for path in trainer.export(args.export):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
