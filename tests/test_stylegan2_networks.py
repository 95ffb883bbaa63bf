"""Behaviour of the StyleGAN2 networks, the reference ops and the backend dispatch (tiny models)."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from clip2gan_cli.errors import DeviceError, UserInputError
from clip2gan_cli.stylegan2 import ops as ops_pkg
from clip2gan_cli.stylegan2.networks import (
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    MinibatchStdLayer,
    build_discriminator,
    build_generator,
)
from clip2gan_cli.stylegan2.ops import reference as ref
from parity_helpers import assert_close

TINY = dict(z_dim=16, w_dim=16, channel_base=256, channel_max=16)


def tiny_generator(resolution=16, seed=0, **kwargs):
    return build_generator(resolution, **{**TINY, **kwargs}, backend="reference", seed=seed)


def tiny_discriminator(resolution=16, **kwargs):
    args = dict(channel_base=256, channel_max=16, backend="reference", seed=1)
    return build_discriminator(resolution, **{**args, **kwargs})


def randomize_noise_strengths(G, seed=0):
    """Noise strengths start at zero; make them non-zero so the noise paths show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(torch.rand([], generator=gen) + 0.5)


# ---- configs ----------------------------------------------------------------------------------

def test_generator_config_round_trips_through_json():
    config = GeneratorConfig(img_resolution=32, z_dim=8, w_dim=8, channels={4: 8, 8: 8, 16: 4, 32: 4},
                             conv_clamp=256.0)
    again = GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.channels_per_resolution() == {4: 8, 8: 8, 16: 4, 32: 4}


def test_discriminator_config_round_trips_through_json():
    config = DiscriminatorConfig(img_resolution=64, channel_base=1024, mbstd_group_size=None)
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_rejects_unknown_fields_and_bad_resolutions():
    with pytest.raises(UserInputError, match="unknown GeneratorConfig field"):
        GeneratorConfig.from_dict({"img_resolution": 32, "bogus": 1})
    with pytest.raises(UserInputError, match="power of two"):
        GeneratorConfig(img_resolution=48)
    with pytest.raises(UserInputError, match="lacks resolution"):
        GeneratorConfig(img_resolution=16, channels={4: 8, 8: 8})
    with pytest.raises(UserInputError, match="architecture"):
        DiscriminatorConfig(img_resolution=16, architecture="orig")


def test_channel_table_follows_channel_base_and_max():
    assert GeneratorConfig(img_resolution=1024).channels_per_resolution() == {
        4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


# ---- generator shapes and API -----------------------------------------------------------------

@pytest.mark.parametrize("resolution", [4, 8, 32])
def test_generator_renders_every_resolution(resolution):
    G = tiny_generator(resolution).eval()
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    with torch.no_grad():
        ws = G.mapping(torch.randn(2, G.z_dim))
        img = G.synthesis(ws)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    assert img.shape == (2, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()


def test_generator_exposes_the_contract_attributes():
    G = tiny_generator(16)
    assert (G.z_dim, G.w_dim, G.img_resolution, G.img_channels, G.num_ws) == (16, 16, 16, 3, 6)
    assert G.w_avg is G.mapping.w_avg and G.w_avg.shape == (16,)
    assert G.backend == "reference" and G.config.img_resolution == 16
    assert "backend=reference" in repr(G) and "up=2" in repr(G)


def test_seeded_build_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    G1, G2 = tiny_generator(seed=7), tiny_generator(seed=7)
    assert torch.rand(1).item() == expected_next.item()
    for (name, a), b in zip(G1.state_dict().items(), G2.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(tiny_generator(seed=8).synthesis.b4.const, G1.synthesis.b4.const)


def test_wrong_latent_shapes_are_user_errors():
    G = tiny_generator(8)
    with pytest.raises(UserInputError, match=r"z must have shape \[N, 16\]"):
        G.mapping(torch.randn(2, 17))
    with pytest.raises(UserInputError, match=r"ws must have shape \[N, 4, 16\]"):
        G.synthesis(torch.randn(2, 5, 16))
    with pytest.raises(UserInputError, match="noise_mode"):
        G.synthesis(torch.randn(2, 4, 16), noise_mode="fresh")


# ---- truncation and w_avg ---------------------------------------------------------------------

def test_truncation_lerps_towards_w_avg_only_below_the_cutoff():
    G = tiny_generator(16).eval()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        z = torch.randn(3, G.z_dim)
        ws = G.mapping(z)
        ws0 = G.mapping(z, truncation_psi=0.0)
        ws_half_cut = G.mapping(z, truncation_psi=0.5, truncation_cutoff=2)
    assert torch.allclose(ws0, G.w_avg.expand_as(ws0))
    assert torch.allclose(ws_half_cut[:, :2], G.w_avg + 0.5 * (ws[:, :2] - G.w_avg), atol=1e-6)
    assert torch.equal(ws_half_cut[:, 2:], ws[:, 2:])


def test_update_emas_tracks_w_avg_with_beta_0995():
    G = tiny_generator(8)
    before = G.w_avg.clone()
    z = torch.randn(5, G.z_dim)
    ws = G.mapping(z, update_emas=True)
    expected = ws[:, 0].detach().mean(dim=0).lerp(before, 0.995)
    assert torch.allclose(G.w_avg, expected, atol=1e-6)
    G.mapping(z)  # without update_emas nothing changes
    assert torch.allclose(G.w_avg, expected, atol=1e-6)


# ---- noise ------------------------------------------------------------------------------------

def test_noise_modes_const_none_random_and_explicit():
    G = tiny_generator(16).eval()
    randomize_noise_strengths(G)
    ws = G.mapping(torch.randn(2, G.z_dim)).detach()
    with torch.no_grad():
        const_a, const_b = G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const")
        none = G.synthesis(ws, noise_mode="none")
        random_a, random_b = G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random")
        zeros = {name: torch.zeros(1, 1, 1, 1) for name in G.synthesis.noise_layers()}
        explicit_zero = G.synthesis(ws, noise_mode="random", noise=zeros)
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(const_a, none) and not torch.allclose(random_a, random_b)
    assert torch.allclose(explicit_zero, none, atol=1e-6)


def test_explicit_noise_as_list_equals_dict_and_make_noise_is_reproducible():
    G = tiny_generator(16).eval()
    randomize_noise_strengths(G)
    assert G.synthesis.noise_layers() == ["b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1"]
    ws = G.mapping(torch.randn(2, G.z_dim)).detach()
    noise = G.synthesis.make_noise(2, generator=torch.Generator().manual_seed(3))
    again = G.synthesis.make_noise(2, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(noise[k], again[k]) for k in noise)
    with torch.no_grad():
        from_dict = G.synthesis(ws, noise=noise)
        from_list = G.synthesis(ws, noise=list(noise.values()))
    assert torch.equal(from_dict, from_list)
    with pytest.raises(UserInputError, match="needs 5 tensors"):
        G.synthesis(ws, noise=list(noise.values())[:2])
    with pytest.raises(UserInputError, match="unknown noise layer"):
        G.synthesis(ws, noise={"b99.conv0": noise["b8.conv0"]})


# ---- training: gradients and the non-fused path -----------------------------------------------

def test_gradients_flow_to_ws_and_every_generator_parameter():
    G = tiny_generator(16).train()
    randomize_noise_strengths(G)
    ws = G.mapping(torch.randn(4, G.z_dim))
    ws_leaf = ws.detach().requires_grad_(True)
    G.synthesis(ws_leaf, noise_mode="random").square().mean().backward()
    ws.sum().backward()  # the mapping gets gradients through its own graph
    assert ws_leaf.grad is not None and ws_leaf.grad.abs().sum() > 0
    no_grad = [n for n, p in G.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_fused_and_non_fused_modconv_agree_in_forward_and_gradients():
    G = tiny_generator(16).eval()
    randomize_noise_strengths(G)
    ws = G.mapping(torch.randn(3, G.z_dim)).detach()
    results = []
    for fused in (True, False):
        G.zero_grad()
        ws_leaf = ws.clone().requires_grad_(True)
        img = G.synthesis(ws_leaf, fused_modconv=fused)
        img.square().sum().backward()
        results.append((img.detach(), ws_leaf.grad, {n: p.grad.clone() for n, p in G.synthesis.named_parameters()}))
    (img_a, gws_a, grads_a), (img_b, gws_b, grads_b) = results
    assert_close(img_a, img_b, "image")
    assert_close(gws_a, gws_b, "d/dws")
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], name)


def test_discriminator_trains_and_deepcopy_makes_an_independent_ema_copy():
    D = tiny_discriminator(16).train()
    img = torch.randn(4, 3, 16, 16, requires_grad=True)
    D(img).sum().backward()
    assert img.grad.abs().sum() > 0
    assert all(p.grad is not None for p in D.parameters())
    G = tiny_generator(8)
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        G.synthesis.b4.const.add_(1)
    assert not torch.equal(G.synthesis.b4.const, G_ema.synthesis.b4.const)
    assert G_ema.backend == "reference"


# ---- discriminator ----------------------------------------------------------------------------

def test_discriminator_output_and_input_checks():
    D = tiny_discriminator(16).eval()
    assert D(torch.randn(8, 3, 16, 16)).shape == (8, 1)
    assert D(torch.randn(2, 3, 16, 16)).shape == (2, 1)  # group = min(4, N)
    with pytest.raises(UserInputError, match=r"images \[N, 3, 16, 16\]"):
        D(torch.randn(2, 3, 32, 32))
    with pytest.raises(UserInputError, match="divisible by its group size 4"):
        D(torch.randn(6, 3, 16, 16))


def test_minibatch_std_uses_population_variance_over_strided_groups():
    x = torch.randn(4, 6, 3, 3)
    out = MinibatchStdLayer(group_size=2, num_channels=1)(x)
    assert out.shape == (4, 7, 3, 3)
    for n in range(4):  # sample n is grouped with sample (n + 2) % 4: groups {0, 2} and {1, 3}
        group = x[[n % 2, n % 2 + 2]]
        expected = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[n, 6], expected.expand(3, 3), atol=1e-6)
    whole = MinibatchStdLayer(group_size=None)(x)
    assert torch.allclose(whole[0, 6, 0, 0], (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(), atol=1e-6)


# ---- backends ---------------------------------------------------------------------------------

def test_resolve_backend_names_and_errors():
    assert ops_pkg.resolve_backend("reference") == "reference"
    assert ops_pkg.get_ops("reference") is ref
    with pytest.raises(DeviceError, match="unknown backend 'cuda'"):
        ops_pkg.resolve_backend("cuda")


def test_fused_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops_pkg, "_import_fused", lambda: (None, "no triton here"))
    monkeypatch.setattr(ops_pkg, "_loaded", {})
    with pytest.raises(DeviceError, match="--backend fused cannot run here: no triton here"):
        ops_pkg.resolve_backend("fused")
    with pytest.raises(DeviceError, match="no triton here"):
        ops_pkg.get_ops("fused")
    with pytest.raises(DeviceError, match="no triton here"):
        build_generator(8, **TINY, backend="fused")


def test_auto_falls_back_to_reference_with_exactly_one_warning(monkeypatch):
    monkeypatch.setattr(ops_pkg, "_import_fused", lambda: (None, "fused is not built"))
    monkeypatch.setattr(ops_pkg, "_auto_choice", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops_pkg.resolve_backend("auto") == "reference"
        assert ops_pkg.resolve_backend("auto") == "reference"
    messages = [str(w.message) for w in caught]
    assert messages == ["StyleGAN2 backend 'auto' uses the reference ops: fused is not built"]


def test_state_dict_is_identical_across_backends_and_loads_into_another_generator():
    G = tiny_generator(16, seed=1)
    keys_before = list(G.state_dict())
    other = Generator(G.config, backend="reference")
    other.load_state_dict(G.state_dict(), strict=True)
    try:
        G.set_backend("fused")
    except DeviceError:
        pass  # no fused backend here: switching still must not change the state dict
    assert list(G.state_dict()) == keys_before
    with torch.no_grad():
        z = torch.randn(2, G.z_dim)
        assert torch.allclose(G.eval()(z), other.eval()(z), atol=1e-5)


# ---- reference ops: checked against first principles -------------------------------------------

def test_bias_act_defaults_and_clamp():
    x, b = torch.randn(2, 3, 4, 4), torch.randn(3)
    lrelu = ref.bias_act(x, b, act="lrelu")
    assert torch.allclose(lrelu, F.leaky_relu(x + b.view(1, 3, 1, 1), 0.2) * math.sqrt(2))
    assert torch.equal(ref.bias_act(x), x)
    clamped = ref.bias_act(x, b, act="lrelu", gain=2.0, clamp=0.5)
    assert clamped.abs().max() <= 0.5
    b_last = torch.randn(4)
    assert torch.allclose(ref.bias_act(x, b_last, dim=3, gain=3.0), (x + b_last.view(1, 1, 1, 4)) * 3.0)


def test_setup_filter_is_the_normalised_outer_product():
    f = ref.setup_filter([1, 3, 3, 1])
    assert torch.allclose(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    assert ref.setup_filter([1] * 8).ndim == 1  # long filters stay separable


def test_upfirdn2d_upsampling_keeps_a_constant_image_constant():
    f = ref.setup_filter([1, 3, 3, 1])
    ones = torch.ones(1, 2, 6, 6)
    up = ref.upfirdn2d(ones, f, up=2, padding=[2, 1, 2, 1], gain=4)
    assert up.shape == (1, 2, 12, 12)
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.ones(1, 2, 8, 8))
    down = ref.upfirdn2d(ones, f, down=2, padding=[1, 1, 1, 1])
    assert down.shape == (1, 2, 3, 3) and torch.allclose(down[:, :, 1:-1, 1:-1], torch.ones(1, 2, 1, 1))


def test_upfirdn2d_of_a_delta_is_the_filter_and_separable_equals_2d():
    f1 = torch.tensor([1.0, 2.0, 5.0])
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1
    out = ref.upfirdn2d(delta, ref.setup_filter(f1, normalize=False), padding=1)
    assert torch.allclose(out[0, 0, 1:4, 1:4], torch.outer(f1, f1))
    separable = ref.upfirdn2d(delta, ref.setup_filter(f1, normalize=False, separable=True), padding=1)
    assert torch.allclose(separable, out)


def test_conv2d_resample_up_equals_zero_insertion_conv_and_fir():
    """The strided transposed-conv fast path equals the definition, also with groups."""
    torch.manual_seed(0)
    f = ref.setup_filter([1, 3, 3, 1])
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    fast = ref.conv2d_resample(x, w, f=f, up=2, padding=1, groups=2, flip_weight=False)
    zero_inserted = torch.zeros(1, 4, 10, 10)
    zero_inserted[:, :, ::2, ::2] = x
    # definition: true convolution (flipped weight) with padding 2,1 then the FIR with gain 4 and padding 1,1
    conv = F.conv2d(F.pad(zero_inserted, [2, 1, 2, 1]), w.flip([2, 3]), groups=2)
    slow = ref.upfirdn2d(conv, f, padding=1, gain=4)
    assert fast.shape == slow.shape == (1, 6, 10, 10)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_conv2d_resample_down_equals_fir_then_strided_conv():
    f = ref.setup_filter([1, 3, 3, 1])
    x, w = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3)
    out = ref.conv2d_resample(x, w, f=f, down=2, padding=1)
    expected = F.conv2d(ref.upfirdn2d(x, f, padding=2), w, stride=2)
    assert out.shape == (2, 5, 4, 4) and torch.allclose(out, expected, atol=1e-6)


def test_modulated_conv2d_matches_a_per_sample_loop():
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(3, 4)
    noise = torch.randn(3, 1, 6, 6)
    out = ref.modulated_conv2d(x, weight, styles, noise=noise, padding=1)
    for n in range(3):
        w = weight * styles[n].view(1, 4, 1, 1)
        w = w * (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        expected = F.conv2d(x[n:n + 1], w, padding=1) + noise[n:n + 1]
        assert torch.allclose(out[n:n + 1], expected, atol=1e-5)


def test_networks_never_modify_their_inputs_in_place():
    G, D = tiny_generator(16).eval(), tiny_discriminator(16).eval()
    randomize_noise_strengths(G)
    ws = torch.randn(4, G.num_ws, G.w_dim)
    noise = G.synthesis.make_noise(4, generator=torch.Generator().manual_seed(0))
    img = torch.randn(4, 3, 16, 16)
    copies = (ws.clone(), {k: v.clone() for k, v in noise.items()}, img.clone())
    with torch.no_grad():
        G.synthesis(ws, noise=noise)
        G.synthesis(ws, noise=noise, fused_modconv=False)
        D(img)
    assert torch.equal(ws, copies[0]) and torch.equal(img, copies[2])
    assert all(torch.equal(noise[k], copies[1][k]) for k in noise)
