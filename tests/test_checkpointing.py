"""Activation checkpointing of the synthesis and discriminator blocks (`checkpoint_blocks`): exact.

Recomputing a block in backward must give the same outputs and gradients as keeping its
activations, with random noise redrawn identically (torch.utils.checkpoint restores the RNG state).
"""
from __future__ import annotations

import pytest
import torch

from clip2gan_cli.stylegan2.networks import build_discriminator, build_generator

TINY = dict(z_dim=16, w_dim=16, channel_base=256, channel_max=16, conv_clamp=256)


def tiny_generator(backend: str):
    G = build_generator(16, **TINY, backend=backend, seed=0)
    with torch.no_grad():  # noise strengths start at 0: make the noise paths count
        for name, parameter in G.named_parameters():
            if name.endswith("noise_strength"):
                parameter.fill_(0.7)
    return G.requires_grad_(False)


def mapper_input_gradient(G, mapper, features, noise_mode, seed=0):
    """Image and d(loss)/d(mapper input) through a trainable mapper and the frozen synthesis."""
    features = features.clone().requires_grad_(True)
    torch.manual_seed(seed)  # random noise draws from the global RNG
    images = G.synthesis(mapper(features).unsqueeze(1).repeat(1, G.num_ws, 1), noise_mode=noise_mode)
    loss = (images * torch.linspace(-1, 1, images.numel()).reshape(images.shape)).sum()
    (grad_features,) = torch.autograd.grad(loss, features)
    return images.detach(), grad_features


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("noise_mode", ["const", "random"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_checkpointed_synthesis_gives_the_same_images_and_gradients(backend, noise_mode, train_mode):
    G = tiny_generator(backend).train(train_mode)
    mapper = torch.nn.Linear(8, 16)
    features = torch.randn([3, 8], generator=torch.Generator().manual_seed(1))
    images, grad = mapper_input_gradient(G, mapper, features, noise_mode)
    G.synthesis.checkpoint_blocks = True
    images_ckpt, grad_ckpt = mapper_input_gradient(G, mapper, features, noise_mode)
    assert torch.equal(images, images_ckpt)
    assert (grad - grad_ckpt).abs().max().item() <= 1e-6 * max(1.0, grad.abs().max().item())
    assert grad.abs().max() > 0


def test_checkpointing_trains_the_mapper_parameters_identically():
    G = tiny_generator("reference").train()
    features = torch.randn([2, 8], generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointed in (False, True):
        G.synthesis.checkpoint_blocks = checkpointed
        mapper = torch.nn.Linear(8, 16)
        torch.nn.init.constant_(mapper.weight, 0.1), torch.nn.init.constant_(mapper.bias, 0.2)
        torch.manual_seed(3)
        images = G.synthesis(mapper(features).unsqueeze(1).repeat(1, G.num_ws, 1), noise_mode="random")
        images.square().mean().backward()
        grads.append(mapper.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6 * max(1.0, grads[0].abs().max().item())


def test_random_noise_really_is_redrawn_inside_the_checkpointed_blocks():
    """Without RNG preservation the recomputed noise would differ: checkpointing with
    preserve_rng_state=False must change the gradient, so the equality above is not vacuous."""
    G = tiny_generator("reference").train()
    mapper = torch.nn.Linear(8, 16)
    features = torch.randn([2, 8], generator=torch.Generator().manual_seed(4))
    _, grad = mapper_input_gradient(G, mapper, features, "random")
    original = torch.utils.checkpoint.checkpoint

    def without_rng(*args, **kwargs):
        return original(*args, preserve_rng_state=False, **kwargs)

    G.synthesis.checkpoint_blocks = True
    torch.utils.checkpoint.checkpoint = without_rng
    try:
        _, grad_unpreserved = mapper_input_gradient(G, mapper, features, "random")
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert not torch.allclose(grad, grad_unpreserved)


def test_no_checkpointing_without_gradients():
    G = tiny_generator("reference")
    G.synthesis.checkpoint_blocks = True
    ws = torch.randn([2, G.num_ws, 16])
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            G.synthesis(ws)
        assert calls == []
        G.synthesis(ws.requires_grad_(True))
        assert len(calls) == len(G.synthesis.block_resolutions)
    finally:
        torch.utils.checkpoint.checkpoint = original


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_checkpointed_discriminator_gives_the_same_logits_gradients_and_gradient_penalty(backend):
    """D in the trainer: L_G (grads to the image) and WGAN-GP (double backward through D)."""
    results = []
    for checkpointed in (False, True):
        D = build_discriminator(16, channel_base=256, channel_max=16, conv_clamp=256, backend=backend, seed=1).train()
        D.checkpoint_blocks = checkpointed
        images = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        logits = D(images)
        (grad_images,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
        penalty = grad_images.flatten(1).norm(dim=1).sub(1).square().mean()
        penalty.backward()
        results.append((logits.detach(), grad_images.detach(), [p.grad for p in D.parameters()]))
    (logits, grad_images, param_grads), (logits_c, grad_images_c, param_grads_c) = results
    assert torch.equal(logits, logits_c)
    assert (grad_images - grad_images_c).abs().max().item() <= 1e-6 * max(1.0, grad_images.abs().max().item())
    assert [a is None for a in param_grads] == [b is None for b in param_grads_c]  # out.bias: no GP gradient
    for a, b in zip(param_grads, param_grads_c):
        if a is not None:
            assert (a - b).abs().max().item() <= 1e-6 * max(1.0, a.abs().max().item())


def test_checkpointing_works_with_float16_blocks():
    G = build_generator(16, **TINY, backend="reference", seed=0, num_fp16_res=2, precision="fp16")
    G.requires_grad_(False)
    ws = torch.randn([2, G.num_ws, 16])
    grads = []
    for checkpointed in (False, True):
        G.synthesis.checkpoint_blocks = checkpointed
        w = ws.clone().requires_grad_(True)
        G.synthesis(w).square().sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])
