"""The five CLIP2GAN training losses. Each returns a scalar tensor; frozen nets get no gradients.

x: real (or G-sampled) images, x_rec = G(M(CLIP(x))): reconstructions, both [N, 3, R, R] in [-1, 1].
- L_rec    = mean (x - x_rec)^2
- L_LPIPS  = LPIPS(x, x_rec) (lpips package; trunk weights from the clip2gan registry)
- L_G      = -D(x_rec) (WGAN), with D trained by `critic_loss` (WGAN-GP)
- L_id     = 1 - cos(E(x), E(x_rec)), E = facenet InceptionResnetV1 (face packs)
- L_div    = d_f(f, f1) / d_I(G(M(f)), G(M(f1))) with L1 distances (mode seeking)
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsNotFoundError

if TYPE_CHECKING:
    from pathlib import Path

# LPIPS trunk -> registry file holding the torchvision ImageNet weights it is built from.
LPIPS_BACKBONE_WEIGHTS = {"alex": "torchvision-alexnet", "vgg": "torchvision-vgg16"}
IDENTITY_WEIGHTS = "facenet-vggface2"
# Smallest side LPIPS sees; smaller images are upsampled (alexnet/vgg strides need room).
LPIPS_MIN_RESOLUTION = 32
# facenet's InceptionResnetV1 was trained on 160x160 aligned crops.
IDENTITY_RESOLUTION = 160


def reconstruction_loss(real: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """L_rec: mean squared error between the images."""
    return F.mse_loss(reconstructed.float(), real.float())


class PerceptualLoss(nn.Module):
    """L_LPIPS: the lpips package's metric with a trunk whose weights clip2gan provides.

    lpips is built with `pnet_rand=True` so it never downloads torchvision weights itself; the
    linear calibration layers ship inside the lpips wheel (`pretrained=True` reads them locally).
    The trunk is then filled from a torchvision state dict (registry file) or left random (seeded).
    """

    def __init__(self, net: str = "alex", backbone_state: dict[str, torch.Tensor] | None = None,
                 calibrated: bool = True):
        super().__init__()
        import lpips

        self.net_name = net
        with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' pretrained=False
            warnings.simplefilter("ignore", UserWarning)
            self.metric = lpips.LPIPS(net=net, pretrained=calibrated, pnet_rand=True, verbose=False)
        if backbone_state is not None:
            load_torchvision_trunk(self.metric.net, backbone_state)
        self.metric.eval().requires_grad_(False)

    def forward(self, real: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance; inputs in [-1, 1] (lpips' own convention)."""
        real, reconstructed = real.float(), reconstructed.float()
        if real.shape[-1] < LPIPS_MIN_RESOLUTION:  # the trunks' strides need at least this many pixels
            size = (LPIPS_MIN_RESOLUTION, LPIPS_MIN_RESOLUTION)
            real = F.interpolate(real, size=size, mode="bilinear", align_corners=False)
            reconstructed = F.interpolate(reconstructed, size=size, mode="bilinear", align_corners=False)
        return self.metric(reconstructed, real).mean()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Always eval: the lpips dropout must stay off so the loss is deterministic.
        return super().train(False)


def load_torchvision_trunk(trunk: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy torchvision `features.<i>.*` weights into lpips' slice modules (same layer indices)."""
    slice_of_layer = {}
    for slice_name, slice_module in trunk.named_children():
        for layer_index, _ in slice_module.named_children():
            slice_of_layer[layer_index] = slice_name
    mapped = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of_layer:
            mapped[f"{slice_of_layer[parts[1]]}.{parts[1]}.{parts[2]}"] = tensor
    expected = set(trunk.state_dict())
    missing = expected - set(mapped)
    if missing:
        raise WeightsNotFoundError(f"LPIPS trunk weights lack {len(missing)} tensors (e.g. {sorted(missing)[0]})",
                                   hint="the registry file does not match the chosen lpips_net")
    trunk.load_state_dict(mapped, strict=True)


def build_perceptual_loss(net: str, backbone: str, seed: int = 0) -> PerceptualLoss | None:
    """L_LPIPS for a config: None when net == 'none'; trunk from the registry or random (seeded)."""
    if net == "none":
        return None
    if backbone == "random":
        with torch.random.fork_rng(devices=[]):  # a seeded random trunk that leaves the global RNG alone
            torch.manual_seed(seed)
            return PerceptualLoss(net)
    from ..errors import DownloadError
    from ..weights import fetch

    try:
        path = fetch(LPIPS_BACKBONE_WEIGHTS[net])
    except (WeightsNotFoundError, DownloadError) as error:
        raise type(error)(f"LPIPS trunk weights unavailable: {error}",
                          hint=f"{error.hint + '; or ' if error.hint else ''}set lpips_backbone = 'random' "
                               "(the offline substitute) or lpips_net = 'none'") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    return PerceptualLoss(net, backbone_state=state)


def critic_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                mix_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """WGAN-GP critic loss: D(fake) - D(real) + gp_weight * (||grad D(x_hat)|| - 1)^2, as one graph.

    x_hat mixes real and fake with a per-sample uniform weight drawn from `mix_generator` (CPU).
    `fake` is detached here: the critic step never trains the mapper.
    Returns the loss and its parts (wasserstein estimate, penalty) for logging.
    """
    score_real, score_fake = critic_scores(discriminator, real, fake)
    penalty = gradient_penalty(discriminator, real, fake, mix_generator)
    loss = score_fake - score_real + gp_weight * penalty
    return loss, {"d_wasserstein": (score_real - score_fake).detach(), "d_gp": penalty.detach()}


def critic_backward(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                    mix_generator: torch.Generator | None = None,
                    accumulation: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward of `critic_loss(...) / accumulation` into D's gradients, the two terms one after the other, so the
    WGAN term's graph is freed before the penalty's double-backward graph is built (the peak holds one).

    Same math as `critic_loss` (gradients accumulate; the sum's order differs only by float rounding);
    returns the same detached loss and parts.
    """
    score_real, score_fake = critic_scores(discriminator, real, fake)
    ((score_fake - score_real) / accumulation).backward()
    penalty = gradient_penalty(discriminator, real, fake, mix_generator)
    (gp_weight * penalty / accumulation).backward()
    score_real, score_fake, penalty = score_real.detach(), score_fake.detach(), penalty.detach()
    return score_fake - score_real + gp_weight * penalty, {"d_wasserstein": score_real - score_fake, "d_gp": penalty}


def critic_scores(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean D(real) and mean D(fake) (both detached from whatever made them)."""
    score_real = discriminator(real.detach().float()).float().mean()
    score_fake = discriminator(fake.detach().float()).float().mean()
    return score_real, score_fake


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     mix_generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP's mean (||grad D(x_hat)|| - 1)^2 with x_hat = alpha * real + (1 - alpha) * fake, alpha ~ U(0, 1)
    per sample from `mix_generator` (CPU); differentiable in D's parameters (double backward)."""
    real, fake = real.detach().float(), fake.detach().float()
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=mix_generator).to(real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score_mixed = discriminator(mixed).float()
    (gradients,) = torch.autograd.grad(score_mixed.sum(), mixed, create_graph=True)
    return ((gradients.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def adversarial_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """L_G (WGAN generator side): -mean D(fake). D's parameters must be frozen by the caller."""
    return -discriminator(fake).float().mean()


class IdentityLoss(nn.Module):
    """L_id: 1 - cosine similarity of face embeddings of x and x_rec (facenet InceptionResnetV1)."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder.eval().requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """512-d L2-normalised embeddings; images in [-1, 1] (facenet's fixed_image_standardization
        maps [0, 255] to (x - 127.5) / 128, i.e. about [-1, 1]), resized to 160x160."""
        images = images.float()
        if images.shape[-1] != IDENTITY_RESOLUTION:
            images = F.interpolate(images, size=(IDENTITY_RESOLUTION, IDENTITY_RESOLUTION),
                                   mode="bilinear", align_corners=False, antialias=images.shape[-1] > IDENTITY_RESOLUTION)
        return F.normalize(self.embedder(images), dim=1)

    def forward(self, real: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.embed(real)
        return (1 - (self.embed(reconstructed) * target).sum(dim=1)).mean()

    def train(self, mode: bool = True) -> "IdentityLoss":
        return super().train(False)  # batch norm must keep its trained statistics


def build_identity_net(weights_path: "str | Path | None" = None) -> nn.Module:
    """facenet InceptionResnetV1 (pretrained=None: never downloads) filled from a registry file."""
    from facenet_pytorch import InceptionResnetV1

    net = InceptionResnetV1(pretrained=None, classify=False)
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # The vggface2 file also holds the classifier head (logits.*), unused for embeddings.
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def diversity_loss(features: torch.Tensor, perturbed_features: torch.Tensor, images: torch.Tensor,
                   perturbed_images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """L_div (mode seeking): mean_i  L1(f_i, f1_i) / (L1(G(M(f_i)), G(M(f1_i))) + eps).

    Minimising it makes images move apart when their features differ. L1 distances are per-element
    means, so the ratio does not depend on the feature size or the image resolution.
    """
    feature_distance = (features.float() - perturbed_features.float()).abs().flatten(1).mean(dim=1)
    image_distance = (images.float() - perturbed_images.float()).abs().flatten(1).mean(dim=1)
    return (feature_distance / (image_distance + eps)).mean()
