"""Activation checkpointing of the synthesis and discriminator blocks (`checkpoint_blocks`): exact.

Recomputing a block in backward must give the same outputs and gradients as keeping its
activations, with random noise redrawn identically (torch.utils.checkpoint restores the RNG state).
On the whole batch (checkpoint_chunk None) that is bit for bit; in chunks of samples (the default,
1) the convolutions see smaller batches, so values agree to float32 rounding (1e-6 relative).
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


def assert_close_relative(name, actual, expected, rel=1e-6):
    error, bound = (actual - expected).abs().max().item(), rel * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", ["reference", "eager"])
@pytest.mark.parametrize("noise_mode", ["const", "random"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("chunk", [None, 1, 2], ids=["whole-batch", "chunk1", "chunk2"])
def test_checkpointed_synthesis_gives_the_same_images_and_gradients(backend, noise_mode, train_mode, chunk):
    G = tiny_generator(backend).train(train_mode)
    mapper = torch.nn.Linear(8, 16)
    features = torch.randn([3, 8], generator=torch.Generator().manual_seed(1))
    images, grad = mapper_input_gradient(G, mapper, features, noise_mode)
    G.synthesis.checkpoint_blocks, G.synthesis.checkpoint_chunk = True, chunk
    images_ckpt, grad_ckpt = mapper_input_gradient(G, mapper, features, noise_mode)
    if chunk is None:
        assert torch.equal(images, images_ckpt)
    assert_close_relative("images", images_ckpt, images)
    assert_close_relative("d loss / d mapper input", grad_ckpt, grad)
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
    assert_close_relative("mapper weight gradient", grads[1], grads[0])


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

    G.synthesis.checkpoint_blocks, G.synthesis.checkpoint_chunk = True, None  # the layers draw inside the recompute
    torch.utils.checkpoint.checkpoint = without_rng
    try:
        _, grad_unpreserved = mapper_input_gradient(G, mapper, features, "random")
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert not torch.allclose(grad, grad_unpreserved)


@pytest.mark.parametrize("chunk, calls_per_block", [(None, 1), (1, 3), (2, 2), (5, 1)])
def test_no_checkpointing_without_gradients_and_chunks_of_the_batch(chunk, calls_per_block):
    G = tiny_generator("reference")
    G.synthesis.checkpoint_blocks, G.synthesis.checkpoint_chunk = True, chunk
    ws = torch.randn([3, G.num_ws, 16])
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            G.synthesis(ws)
        assert calls == []
        G.synthesis(ws.requires_grad_(True))
        heavy = [res for res in G.synthesis.block_resolutions if getattr(G.synthesis, f"b{res}").activation_heavy]
        assert heavy == [16]  # b4 and b8 hold more weights than activations: kept, not recomputed
        assert len(calls) == calls_per_block * len(heavy)
    finally:
        torch.utils.checkpoint.checkpoint = original


@pytest.mark.parametrize("backend", ["reference", "eager"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_checkpointed_discriminator_gives_the_same_logits_gradients_and_gradient_penalty(backend, chunk):
    """D in the trainer: L_G (grads to the image) and WGAN-GP (double backward through D)."""
    results = []
    for checkpointed in (False, True):
        D = build_discriminator(16, channel_base=256, channel_max=16, conv_clamp=256, backend=backend, seed=1).train()
        D.checkpoint_blocks, D.checkpoint_chunk = checkpointed, chunk
        images = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        logits = D(images)
        (grad_images,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
        penalty = grad_images.flatten(1).norm(dim=1).sub(1).square().mean()
        penalty.backward()
        results.append((logits.detach(), grad_images.detach(), [p.grad for p in D.parameters()]))
    (logits, grad_images, param_grads), (logits_c, grad_images_c, param_grads_c) = results
    if chunk is None:
        assert torch.equal(logits, logits_c)
    assert_close_relative("logits", logits_c, logits)
    assert_close_relative("d logits / d images", grad_images_c, grad_images)
    assert [a is None for a in param_grads] == [b is None for b in param_grads_c]  # out.bias: no GP gradient
    for a, b in zip(param_grads, param_grads_c):
        if a is not None:
            assert_close_relative("parameter gradient", b, a)


def test_checkpointing_works_with_float16_blocks():
    G = build_generator(16, **TINY, backend="reference", seed=0, num_fp16_res=2, precision="fp16")
    G.requires_grad_(False)
    ws = torch.randn([2, G.num_ws, 16])
    grads = []
    for checkpointed in (False, True):
        G.synthesis.checkpoint_blocks, G.synthesis.checkpoint_chunk = checkpointed, None
        w = ws.clone().requires_grad_(True)
        G.synthesis(w).square().sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


def test_only_blocks_whose_maps_outweigh_their_weights_are_checkpointed_at_full_size():
    """config-f 1024: the 128-1024 px blocks hold ~all the activation memory; 4-64 px are weight-bound."""
    G = build_generator(1024, seed=0)
    D = build_discriminator(1024, seed=0)
    assert [res for res in G.synthesis.block_resolutions if getattr(G.synthesis, f"b{res}").activation_heavy] \
        == [128, 256, 512, 1024]
    assert [res for res in D.block_resolutions if getattr(D, f"b{res}").activation_heavy] == [1024, 512, 256, 128]
