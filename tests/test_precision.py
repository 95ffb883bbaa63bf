"""Mixed precision of the StyleGAN2 networks: num_fp16_res in the configs, set_precision, what "auto" means."""
from __future__ import annotations

import json

import pytest
import torch

from clip2gan_cli import device as device_mod
from clip2gan_cli.errors import DeviceError, UserInputError
from clip2gan_cli.stylegan2.networks import (
    DiscriminatorConfig,
    GeneratorConfig,
    build_discriminator,
    build_generator,
)

TINY = dict(channel_base=256, channel_max=16, conv_clamp=256)


def tiny_G(num_fp16_res=2, precision="auto", backend="reference"):
    return build_generator(32, z_dim=16, w_dim=16, **TINY, num_fp16_res=num_fp16_res, precision=precision,
                           backend=backend, seed=0).eval().requires_grad_(False)


def tiny_D(num_fp16_res=2, precision="auto", backend="reference"):
    return build_discriminator(32, **TINY, num_fp16_res=num_fp16_res, precision=precision, backend=backend,
                               seed=1).eval().requires_grad_(False)


def record_block_inputs(network, prefix):
    """{block name: (dtype, channels_last?)} of the activations each block's first layer receives."""
    seen = {}

    def hook(name):
        def record(module, args):
            x = args[0]
            seen[name] = (x.dtype, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                          and not x.is_contiguous())
        return record

    for name, module in network.named_modules():
        if name.startswith(prefix) and name.count(".") == prefix.count(".") + 1 and name.endswith(("conv1", "conv0")):
            module.register_forward_pre_hook(hook(name))
    return seen


# ---- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_class", [GeneratorConfig, DiscriminatorConfig])
def test_num_fp16_res_round_trips_and_old_configs_load_as_float32(config_class):
    config = config_class(img_resolution=64, num_fp16_res=3, conv_clamp=256.0)
    again = config_class.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.num_fp16_res == 3
    old = config.to_dict()
    del old["num_fp16_res"]  # written before this field existed
    assert config_class.from_dict(old).num_fp16_res == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_num_fp16_res_must_be_a_non_negative_integer(bad):
    with pytest.raises(UserInputError, match="num_fp16_res"):
        GeneratorConfig(img_resolution=32, num_fp16_res=bad)


def test_marked_blocks_follow_nvidias_rule():
    """fp16 for the N highest resolutions, never the 4x4 block (NVIDIA: max(2**(log2 R + 1 - N), 8))."""
    assert GeneratorConfig(img_resolution=1024, num_fp16_res=4).fp16_resolutions == [128, 256, 512, 1024]
    assert GeneratorConfig(img_resolution=1024).fp16_resolutions == []
    assert GeneratorConfig(img_resolution=32, num_fp16_res=99).fp16_resolutions == [8, 16, 32]
    assert DiscriminatorConfig(img_resolution=256, num_fp16_res=4).fp16_resolutions == [256, 128, 64, 32]
    assert DiscriminatorConfig(img_resolution=32, num_fp16_res=99).fp16_resolutions == [32, 16, 8]


# ---- what auto means ----------------------------------------------------------------------------

def test_resolve_precision_auto_is_fp16_on_cuda_and_fp32_elsewhere(monkeypatch):
    assert device_mod.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert device_mod.resolve_precision(None, torch.device("cpu")) == "fp32"
    assert device_mod.resolve_precision("auto", torch.device("mps")) == "fp32"
    assert device_mod.resolve_precision("auto", torch.device("cuda")) == "fp16"  # decided without touching CUDA
    assert device_mod.resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert device_mod.resolve_precision("BF16", "cpu") == "bf16"
    assert device_mod.reduced_dtype("fp32", torch.device("cuda")) is None
    assert device_mod.reduced_dtype("auto", torch.device("cuda")) == torch.float16
    assert device_mod.reduced_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DeviceError, match="bf16"):
        device_mod.resolve_precision("bf16", torch.device("cuda"))
    with pytest.raises(DeviceError, match="unknown precision"):
        device_mod.resolve_precision("fp8", torch.device("cpu"))


def test_channels_last_by_default_only_on_cuda():
    assert device_mod.reduced_precision_channels_last(torch.device("cuda"))
    assert not device_mod.reduced_precision_channels_last(torch.device("cpu"))


def test_set_precision_validates_and_is_kept_on_the_networks():
    G, D = tiny_G(), tiny_D()
    assert G.precision == "auto" and D.precision == "auto"
    assert G.set_precision("FP16") is G and G.precision == "fp16" and G.synthesis.precision == "fp16"
    G.precision = "bf16"
    assert G.synthesis.precision == "bf16"
    with pytest.raises(DeviceError, match="unknown precision"):
        G.set_precision("half")
    with pytest.raises(DeviceError, match="unknown precision"):
        D.set_precision("fp64")


# ---- which blocks run in what -------------------------------------------------------------------

@pytest.mark.parametrize("precision, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_only_the_marked_blocks_run_reduced_and_outputs_are_float32(precision, expected):
    G, D = tiny_G(precision=precision), tiny_D(precision=precision)
    seen_G = record_block_inputs(G, "synthesis.b")
    seen_D = record_block_inputs(D, "b")
    img = G(torch.randn([2, 16]))
    logits = D(img)
    assert img.dtype == torch.float32 and logits.dtype == torch.float32
    assert img.is_contiguous()
    assert {name: dtype for name, (dtype, _) in seen_G.items()} == {
        "synthesis.b4.conv1": torch.float32, "synthesis.b8.conv0": torch.float32, "synthesis.b8.conv1": torch.float32,
        "synthesis.b16.conv0": expected, "synthesis.b16.conv1": expected,
        "synthesis.b32.conv0": expected, "synthesis.b32.conv1": expected}
    assert {name: dtype for name, (dtype, _) in seen_D.items()} == {
        "b32.conv0": expected, "b32.conv1": expected, "b16.conv0": expected, "b16.conv1": expected,
        "b8.conv0": torch.float32, "b8.conv1": torch.float32}
    assert not any(channels_last for _, channels_last in seen_G.values())  # NCHW on the CPU by default


def test_channels_last_when_asked_for():
    G = tiny_G(precision="fp16")
    G.synthesis.fp16_channels_last = True
    seen = record_block_inputs(G, "synthesis.b")
    G(torch.randn([2, 16]))
    assert seen["synthesis.b32.conv1"] == (torch.float16, True)
    assert seen["synthesis.b8.conv1"] == (torch.float32, False)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_auto_and_fp32_on_the_cpu_run_everything_in_float32(precision):
    G = tiny_G(precision=precision)
    seen = record_block_inputs(G, "synthesis.b")
    z = torch.randn([2, 16])
    img = G(z)
    assert {dtype for dtype, _ in seen.values()} == {torch.float32}
    assert torch.equal(img, tiny_G(num_fp16_res=0)(z))  # the same as a network with no marked blocks


def test_force_fp32_overrides_the_precision_and_fp16_stays_close():
    G, D = tiny_G(precision="fp16"), tiny_D(precision="fp16")
    z = torch.randn([2, 16], generator=torch.Generator().manual_seed(0))
    full = tiny_G(precision="fp32")(z)
    assert torch.equal(G(z, force_fp32=True), full)
    half = G(z)
    assert not torch.equal(half, full)
    assert (half - full).abs().max() <= 4e-3 * max(1.0, full.abs().max().item())
    assert torch.equal(D(full, force_fp32=True), tiny_D(precision="fp32")(full))


@pytest.mark.parametrize("backend", ["reference", "eager"])
def test_float16_gradients_reach_ws_and_stay_close_to_float32(backend):
    G = tiny_G(precision="fp16", backend=backend).train()
    ws = torch.randn([2, G.num_ws, 16], generator=torch.Generator().manual_seed(1))
    grads = []
    for force_fp32 in (False, True):
        w = ws.clone().requires_grad_(True)
        G.synthesis(w, force_fp32=force_fp32).square().mean().backward()
        assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
        grads.append(w.grad)
    assert (grads[0] - grads[1]).abs().max() <= 2e-2 * grads[1].abs().max()


@pytest.mark.parametrize("conv_clamp, finite", [(256, True), (None, False)])
def test_conv_clamp_is_what_keeps_float16_finite(conv_clamp, finite):
    """Large biases blow activations past float16's 65504 within a block or two; conv_clamp 256 caps each
    layer so the next demodulated conv stays in range (without it the same network overflows)."""
    G = build_generator(32, z_dim=16, w_dim=16, channel_base=256, channel_max=16, conv_clamp=conv_clamp,
                        num_fp16_res=2, precision="fp16", backend="reference", seed=0).eval().requires_grad_(False)
    with torch.no_grad():
        for name, parameter in G.named_parameters():
            if name.startswith("synthesis") and name.endswith(".bias") and "affine" not in name:
                parameter.fill_(1e4)
    img = G(torch.randn([2, 16]))
    assert bool(torch.isfinite(img).all()) == finite
