"""The eager ops backend (formerly `fused`) computes what the reference computes: forward and gradients, op by op and
through whole networks, on CPU (and on CUDA when present: those tests are marked `cuda`).

Tolerance is the parity rule of ../shared/parity/README.md: max|eager - reference| <= 1e-5 * max(1, max|ref|),
applied per tensor (gradients included).
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from clip2gan_cli.stylegan2 import build_discriminator, build_generator, get_ops, resolve_backend
from clip2gan_cli.stylegan2 import ops as ops_pkg
from clip2gan_cli.stylegan2.ops import eager, reference
from parity_helpers import assert_close, randomize_network

HAS_CUDA = torch.cuda.is_available()
FIR = reference.setup_filter([1, 3, 3, 1])


def run_both(op_name, inputs: dict, kwargs: dict, seed=0):
    """Run an op with each backend on clones of `inputs` (leaf tensors with grad); return outputs and grads."""
    results = {}
    for backend in ("reference", "eager"):
        leaves = {name: tensor.detach().clone().requires_grad_(tensor.requires_grad) for name, tensor in
                  inputs.items()}
        out = getattr(get_ops(backend), op_name)(**leaves, **kwargs)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)  # fixed upstream grad
        wrt = [t for t in leaves.values() if t.requires_grad]
        grads = torch.autograd.grad((out * probe).sum(), wrt) if wrt else ()
        results[backend] = (out.detach(), dict(zip([n for n, t in leaves.items() if t.requires_grad], grads)))
    return results


def assert_backends_agree(op_name, inputs, **kwargs):
    results = run_both(op_name, inputs, kwargs)
    (ref_out, ref_grads), (out, grads) = results["reference"], results["eager"]
    assert_close(out, ref_out, f"{op_name} forward {kwargs}")
    for name, ref_grad in ref_grads.items():
        assert_close(grads[name], ref_grad, f"{op_name} d/d{name} {kwargs}")


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Dispatch


def test_eager_backend_is_available_and_selected_by_name():
    assert eager.is_available() is True
    assert eager.unavailable_reason() == ""
    assert resolve_backend("eager") == "eager"
    assert get_ops("eager") is eager


def test_old_name_fused_still_selects_eager_with_one_deprecation_warning(monkeypatch):
    monkeypatch.setattr(ops_pkg, "_deprecation_warned", set())
    monkeypatch.setattr(ops_pkg, "_loaded", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("fused") == "eager"
        assert resolve_backend("fused") == "eager"
        assert get_ops("fused") is eager
    messages = [str(w.message) for w in caught]
    assert messages == ["StyleGAN2 backend 'fused' is now called 'eager' (same ops); the old name will go away"]
    assert caught[0].category is FutureWarning


# ----------------------------------------------------------------------------------------------
# bias_act


@pytest.mark.parametrize("act,gain,clamp,with_bias", list(itertools.product(
    ["linear", "lrelu"], [None, 0.5, 1.0, 2 ** 0.5 * 0.7], [None, 0.8], [True, False])))
def test_bias_act_matches_reference(act, gain, clamp, with_bias):
    inputs = {"x": _randn(2, 5, 6, 7, seed=1).requires_grad_()}
    if with_bias:
        inputs["b"] = _randn(5, seed=2).requires_grad_()
    assert_backends_agree("bias_act", inputs, act=act, gain=gain, clamp=clamp)


def test_bias_act_on_feature_vectors_and_other_dims():
    assert_backends_agree("bias_act", {"x": _randn(4, 9).requires_grad_(), "b": _randn(9).requires_grad_()},
                          act="lrelu")
    assert_backends_agree("bias_act", {"x": _randn(3, 4, 6).requires_grad_(), "b": _randn(6).requires_grad_()},
                          dim=2, act="lrelu", alpha=0.1, clamp=0.5)


def test_bias_act_negative_gain_keeps_reference_order():
    # lrelu(x + b) * g == lrelu(g x + g b) only for g > 0; a negative gain must still be exact.
    assert_backends_agree("bias_act", {"x": _randn(2, 3, 4, 4).requires_grad_(), "b": _randn(3).requires_grad_()},
                          act="lrelu", gain=-1.5)


def test_eager_ops_never_modify_their_inputs():
    x, b = _randn(1, 4, 8, 8), _randn(4)
    weight, styles, noise = _randn(4, 4, 3, 3), _randn(1, 4) + 1, _randn(16, 16)
    snapshot = [t.clone() for t in (x, b, weight, styles, noise)]
    with torch.no_grad():
        for gain in (None, 1.0):
            eager.bias_act(x, b, act="lrelu", gain=gain, clamp=0.5)
            eager.bias_act(x, None, act="lrelu", gain=gain, clamp=0.5)
        eager.modulated_conv2d(x, weight, styles, noise=noise, up=2, padding=1, resample_filter=FIR)
        eager.upfirdn2d(x, FIR, up=2, padding=[2, 1, 2, 1], gain=4)
    for before, after in zip(snapshot, (x, b, weight, styles, noise)):
        assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------
# upfirdn2d


FILTERS = {
    "binomial": FIR,
    "binomial-separable": reference.setup_filter([1, 3, 3, 1], separable=True),
    "triangle-3tap": reference.setup_filter([1, 2, 1]),
    "asymmetric": torch.tensor([[1.0, 2.0], [0.5, 3.0]]),
}


@pytest.mark.parametrize("up,down,padding", [
    (1, 1, 0), (1, 1, [1, 2, 1, 2]), (1, 1, -1), (1, 2, [1, 1, 1, 1]), (1, 2, 0),
    (2, 1, [2, 1, 2, 1]), (2, 1, [1, 0, 1, 0]), (2, 1, [2, 2, 2, 2]), (2, 1, [1, 2, 0, 3]), (2, 2, 1),
])
@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("flip_filter", [False, True])
def test_upfirdn2d_matches_reference(up, down, padding, filter_name, flip_filter):
    inputs = {"x": _randn(2, 3, 7, 9, seed=3).requires_grad_()}
    assert_backends_agree("upfirdn2d", inputs, f=FILTERS[filter_name], up=up, down=down, padding=padding,
                          flip_filter=flip_filter, gain=3.0)


# ----------------------------------------------------------------------------------------------
# conv2d_resample


@pytest.mark.parametrize("kernel,up,down", [(3, 1, 1), (3, 2, 1), (3, 1, 2), (1, 1, 1), (1, 2, 1), (1, 1, 2)])
@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_resample_matches_reference(kernel, up, down, flip_weight, groups):
    inputs = {"x": _randn(2, 4, 9, 9, seed=4).requires_grad_(),
              "w": _randn(6, 4 // groups, kernel, kernel, seed=5).requires_grad_()}
    assert_backends_agree("conv2d_resample", inputs, f=FIR, up=up, down=down, padding=kernel // 2, groups=groups,
                          flip_weight=flip_weight)


@pytest.mark.parametrize("padding", [0, [0, 2, 1, 1], [2, 0, 0, 2]])
def test_conv2d_resample_asymmetric_padding(padding):
    inputs = {"x": _randn(1, 3, 8, 8).requires_grad_(), "w": _randn(5, 3, 3, 3).requires_grad_()}
    assert_backends_agree("conv2d_resample", inputs, padding=padding)


def test_conv2d_resample_large_maps_run_channels_last():
    x, w = _randn(1, 8, 32, 32), _randn(8, 8, 3, 3)
    with torch.no_grad():
        y = eager.conv2d_resample(x, w, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the fast layout is actually used
    assert_close(y, reference.conv2d_resample(x, w, padding=1), "channels_last conv")


# ----------------------------------------------------------------------------------------------
# modulated_conv2d


@pytest.mark.parametrize("batch,size", [(1, 3), (1, 16), (3, 3), (3, 16)])  # small maps vs large maps
@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("noise_kind", [None, "const", "per-sample"])
def test_modulated_conv2d_matches_reference(batch, size, up, demodulate, noise_kind):
    channels_in, channels_out = 6, 5
    out_size = size * up
    inputs = {"x": _randn(batch, channels_in, size, size, seed=6).requires_grad_(),
              "weight": _randn(channels_out, channels_in, 3, 3, seed=7).requires_grad_(),
              "styles": (_randn(batch, channels_in, seed=8) + 1).requires_grad_()}
    if noise_kind == "const":
        inputs["noise"] = _randn(out_size, out_size, seed=9).requires_grad_()
    elif noise_kind == "per-sample":
        inputs["noise"] = _randn(batch, 1, out_size, out_size, seed=9).requires_grad_()
    for fused_modconv in (True, False):
        assert_backends_agree("modulated_conv2d", inputs, up=up, padding=1, resample_filter=FIR,
                              demodulate=demodulate, flip_weight=(up == 1), fused_modconv=fused_modconv)


@pytest.mark.parametrize("batch", [1, 2])
def test_modulated_conv2d_1x1_torgb(batch):
    inputs = {"x": _randn(batch, 8, 12, 12).requires_grad_(), "weight": _randn(3, 8, 1, 1).requires_grad_(),
              "styles": (_randn(batch, 8) / 8 ** 0.5).requires_grad_()}
    assert_backends_agree("modulated_conv2d", inputs, demodulate=False)
    with torch.no_grad():
        image = eager.modulated_conv2d(**inputs, demodulate=False)
    assert image.is_contiguous()  # images come back in the ordinary layout


def test_weight_cache_follows_in_place_weight_updates():
    # Small maps + big weight: the activation-scaling path, whose weight-derived tensors are cached.
    x, styles = _randn(1, 16, 4, 4), _randn(1, 16) + 1
    weight = _randn(16, 16, 3, 3)
    with torch.no_grad():
        for up in (1, 2):
            kwargs = dict(up=up, padding=1, resample_filter=FIR, flip_weight=(up == 1))
            first = eager.modulated_conv2d(x, weight, styles, **kwargs)
            assert_close(first, reference.modulated_conv2d(x, weight, styles, **kwargs), "before update")
            assert any(entry[0]() is weight for entry in eager._derived_cache.values())  # cached
            weight.mul_(-0.5).add_(0.1)  # what an optimizer step or load_state_dict does
            second = eager.modulated_conv2d(x, weight, styles, **kwargs)
            assert_close(second, reference.modulated_conv2d(x, weight, styles, **kwargs), "after update")


def test_weight_cache_entries_die_with_their_weights():
    x, styles = _randn(1, 16, 4, 4), _randn(1, 16) + 1
    with torch.no_grad():
        eager.modulated_conv2d(x, _randn(16, 16, 3, 3), styles, padding=1)
        baseline = len(eager._derived_cache)
        for seed in range(20):
            eager.modulated_conv2d(x, _randn(16, 16, 3, 3, seed=seed), styles, up=2, padding=1,
                                   resample_filter=FIR, flip_weight=False)
    assert len(eager._derived_cache) <= baseline + 2  # temporary weights leave nothing behind


def test_inference_mode_then_training_through_a_frozen_weight():
    # Nothing derived under inference_mode may be reused where autograd has to save it.
    weight, styles = _randn(16, 16, 3, 3), _randn(1, 16) + 1  # big weight, small map: the caching path
    with torch.inference_mode():
        eager.modulated_conv2d(_randn(1, 16, 2, 2), weight, styles, up=2, padding=1, resample_filter=FIR,
                               flip_weight=False)
    x, styles = _randn(1, 16, 2, 2).requires_grad_(), styles.clone().requires_grad_()
    y = eager.modulated_conv2d(x, weight, styles, up=2, padding=1, resample_filter=FIR, flip_weight=False)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(styles.grad).all()


def test_frozen_weights_still_give_gradients_to_styles_and_inputs():
    # CLIP2GAN trains through a frozen G: weights without grad (cached), gradients to styles and x.
    weight = _randn(16, 16, 3, 3)  # big weight, small map: the path that caches weight-derived tensors
    x = _randn(1, 16, 2, 2).requires_grad_()
    styles = (_randn(1, 16) + 1).requires_grad_()
    for _ in range(2):  # the second call hits the cache
        assert_backends_agree("modulated_conv2d", {"x": x, "weight": weight, "styles": styles}, up=2, padding=1,
                              resample_filter=FIR, flip_weight=False)


# ----------------------------------------------------------------------------------------------
# Whole networks


def _small_generator(**overrides):
    config = dict(z_dim=32, w_dim=32, channel_base=256, channel_max=32, mapping_layers=2, seed=0)
    config.update(overrides)
    return build_generator(32, backend="reference", **config)


def _generator_outputs(G, backend, ws, **kwargs):
    G.set_backend(backend)
    ws = ws.detach().clone().requires_grad_()
    image = G.synthesis(ws, **kwargs)
    probe = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in G.parameters() if p.requires_grad]
    grads = torch.autograd.grad((image * probe).sum(), [ws] + params, allow_unused=True)
    return image.detach(), grads


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conv_clamp", [None, 0.5])
@pytest.mark.parametrize("training", [False, True])  # eval: grouped-conv modconv; train: activation scaling
def test_generator_images_and_gradients_match(batch, conv_clamp, training):
    G = randomize_network(_small_generator(conv_clamp=conv_clamp)).train(training)
    ws = G.mapping(_randn(batch, G.z_dim, seed=2), truncation_psi=0.7).detach()
    ref_image, ref_grads = _generator_outputs(G, "reference", ws, noise_mode="const")
    image, grads = _generator_outputs(G, "eager", ws, noise_mode="const")
    assert_close(image, ref_image, "image")
    assert image.is_contiguous()
    names = ["ws"] + [name for name, p in G.named_parameters() if p.requires_grad]
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        if ref_grad is None:
            assert grad is None, name
            continue
        assert_close(grad, ref_grad, f"d image / d {name}")


@pytest.mark.parametrize("noise_mode", ["none", "explicit"])
def test_generator_noise_modes_match(noise_mode):
    G = randomize_network(_small_generator(), seed=3).eval()
    ws = G.mapping(_randn(2, G.z_dim, seed=4)).detach()
    kwargs = {"noise_mode": "none"}
    if noise_mode == "explicit":
        kwargs = {"noise": G.synthesis.make_noise(2, generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        images = {b: G.set_backend(b).synthesis(ws, **kwargs) for b in ("reference", "eager")}
    assert_close(images["eager"], images["reference"], noise_mode)


def test_generator_repeated_inference_is_stable():
    # Inference reuses cached weight-derived tensors; results must not drift between calls.
    G = randomize_network(_small_generator(), seed=6).eval().set_backend("eager")
    ws = G.mapping(_randn(1, G.z_dim)).detach()
    with torch.no_grad():
        first, second = G.synthesis(ws), G.synthesis(ws)
    assert torch.equal(first, second)


@pytest.mark.parametrize("batch", [2, 4])
def test_discriminator_logits_and_gradients_match(batch):
    D = randomize_network(build_discriminator(32, channel_base=256, channel_max=32, seed=0, backend="reference"), seed=7)
    images = _randn(batch, 3, 32, 32, seed=8)
    results = {}
    for backend in ("reference", "eager"):
        D.set_backend(backend)
        x = images.clone().requires_grad_()
        logits = D(x)
        params = list(D.parameters())
        grads = torch.autograd.grad(logits.sum(), [x] + params)
        results[backend] = (logits.detach(), grads)
    assert_close(results["eager"][0], results["reference"][0], "logits")
    for index, (grad, ref_grad) in enumerate(zip(results["eager"][1], results["reference"][1])):
        assert_close(grad, ref_grad, f"D gradient #{index}")


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a device)


@pytest.fixture
def no_tf32():
    """Full fp32 on CUDA (TF32 would blur the comparison far beyond the parity tolerance)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch,up", [(1, 1), (1, 2), (3, 2)])
def test_cuda_modulated_conv2d_matches_reference(batch, up, no_tf32):
    inputs = {"x": _randn(batch, 6, 16, 16).cuda().requires_grad_(),
              "weight": _randn(5, 6, 3, 3).cuda().requires_grad_(),
              "styles": (_randn(batch, 6) + 1).cuda().requires_grad_(),
              "noise": _randn(16 * up, 16 * up).cuda()}
    assert_backends_agree("modulated_conv2d", inputs, up=up, padding=1, resample_filter=FIR.cuda(),
                          flip_weight=(up == 1))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_generator_matches_reference(no_tf32):
    G = randomize_network(_small_generator(), seed=9).eval().cuda()
    ws = G.mapping(_randn(2, G.z_dim).cuda()).detach()
    ref_image, ref_grads = _generator_outputs(G, "reference", ws)
    image, grads = _generator_outputs(G, "eager", ws)
    assert_close(image, ref_image, "cuda image")
    assert_close(grads[0], ref_grads[0], "cuda d image / d ws")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_generator_is_finite_and_close(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 not supported on this GPU")
    G = randomize_network(_small_generator(), seed=10).eval().cuda()
    ws = G.mapping(_randn(2, G.z_dim).cuda()).detach()
    with torch.no_grad():
        full = G.set_backend("reference").synthesis(ws).float()
        G = G.to(dtype)
        half = G.set_backend("eager").synthesis(ws.to(dtype)).float()
    assert torch.isfinite(half).all()
    assert (half - full).abs().max().item() <= 0.05 * max(1.0, full.abs().max().item())
