"""Parity with NVIDIA stylegan2-ada-pytorch: the stored reference tensors of tests/data/parity.

nvidia_small.safetensors holds a small random-weight NVIDIA G and D, the inputs and the outputs
their own code produced (see tests/data/parity/README in /work/shared/parity and nvidia_small.json).
Every `out.*` tensor must match within 1e-5 * max(1, max|ref|), for every ops backend.
The full-size key manifests must map one to one onto our networks built at those configs.
"""
from __future__ import annotations

import json

import pytest
import torch

from clip2gan_cli.errors import DeviceError
from clip2gan_cli.stylegan2.networks import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    build_discriminator,
    build_generator,
    load_state_dict_strict,
)
from clip2gan_cli.stylegan2.ops import resolve_backend
from parity_helpers import PARITY, assert_close, split_prefix


NOISE_PREFIX = "in.noise.psi0.7.random."


def _backend_or_skip(backend: str) -> str:
    """The backend name, or a clean skip when it cannot run here (fused missing or unusable)."""
    try:
        return resolve_backend(backend)
    except DeviceError as error:
        pytest.skip(f"backend '{backend}' unavailable: {error}")


@pytest.fixture(params=["reference", "eager"])
def backend(request) -> str:
    return _backend_or_skip(request.param)


@pytest.fixture(scope="module")
def small():
    """(tensors, description) of nvidia_small."""
    from safetensors.torch import load_file

    tensors = load_file(str(PARITY / "nvidia_small.safetensors"))
    description = json.loads((PARITY / "nvidia_small.json").read_text())
    return tensors, description


def _generator_config(description: dict, conv_clamp=None) -> GeneratorConfig:
    """Our config from the reference's resolved kwargs (channels taken from its table)."""
    resolved = description["G_resolved"]
    return GeneratorConfig(
        img_resolution=resolved["img_resolution"], z_dim=resolved["z_dim"], w_dim=resolved["w_dim"],
        img_channels=resolved["img_channels"], mapping_layers=resolved["mapping"]["num_layers"],
        mapping_lr_mul=resolved["mapping"]["lr_multiplier"], w_avg_beta=resolved["mapping"]["w_avg_beta"],
        channel_base=resolved["synthesis"]["channel_base"], channel_max=resolved["synthesis"]["channel_max"],
        conv_clamp=conv_clamp, architecture=resolved["synthesis"]["architecture"],
        resample_filter=tuple(resolved["synthesis"]["resample_filter"]))


def _discriminator_config(description: dict, conv_clamp=None) -> DiscriminatorConfig:
    resolved = description["D_resolved"]
    return DiscriminatorConfig(
        img_resolution=resolved["img_resolution"], img_channels=resolved["img_channels"],
        channel_base=resolved["channel_base"], channel_max=resolved["channel_max"], conv_clamp=conv_clamp,
        architecture=resolved["architecture"], mbstd_group_size=resolved["epilogue"]["mbstd_group_size"],
        mbstd_num_channels=resolved["epilogue"]["mbstd_num_channels"])


def _load_G(small, backend, conv_clamp=None, device="cpu") -> Generator:
    tensors, description = small
    G = Generator(_generator_config(description, conv_clamp), backend=backend)
    load_state_dict_strict(G, split_prefix(tensors, "G."), source="nvidia_small G")
    return G.to(device).eval().requires_grad_(False)


def _load_D(small, backend, conv_clamp=None, device="cpu") -> Discriminator:
    tensors, description = small
    D = Discriminator(_discriminator_config(description, conv_clamp), backend=backend)
    load_state_dict_strict(D, split_prefix(tensors, "D."), source="nvidia_small D")
    return D.to(device).eval().requires_grad_(False)


# ---- mapping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, psi, cutoff", [
    ("out.ws.psi1", 1.0, None),
    ("out.ws.psi0.7", 0.7, None),
    ("out.ws.psi0.7.cutoff4", 0.7, 4),
])
def test_mapping_matches_nvidia(small, backend, name, psi, cutoff):
    tensors, _ = small
    G = _load_G(small, backend)
    with torch.no_grad():
        ws = G.mapping(tensors["in.z"], truncation_psi=psi, truncation_cutoff=cutoff)
    assert_close(ws, tensors[name], name)


# ---- synthesis --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ws_name, noise_mode", [
    ("out.img.psi1.const", "out.ws.psi1", "const"),
    ("out.img.psi0.7.const", "out.ws.psi0.7", "const"),
    ("out.img.psi1.none", "out.ws.psi1", "none"),
    ("out.img.psi0.7.cutoff4.const", "out.ws.psi0.7.cutoff4", "const"),
])
def test_synthesis_matches_nvidia(small, backend, name, ws_name, noise_mode):
    tensors, _ = small
    G = _load_G(small, backend)
    with torch.no_grad():
        img = G.synthesis(tensors[ws_name], noise_mode=noise_mode)
    assert_close(img, tensors[name], name)


def test_synthesis_with_the_saved_random_noise_matches_nvidia(small, backend):
    tensors, _ = small
    G = _load_G(small, backend)
    noise = split_prefix(tensors, NOISE_PREFIX)  # {"synthesis.b8.conv0": [4,1,8,8], ...}
    assert sorted(key.removeprefix("synthesis.") for key in noise) == sorted(G.synthesis.noise_layers())
    with torch.no_grad():
        img = G.synthesis(tensors["out.ws.psi0.7"], noise_mode="random", noise=noise)
    assert_close(img, tensors["out.img.psi0.7.random"], "out.img.psi0.7.random")


def test_generator_forward_end_to_end_matches_nvidia(small, backend):
    tensors, _ = small
    G = _load_G(small, backend)
    with torch.no_grad():
        img = G(tensors["in.z"], truncation_psi=0.7, noise_mode="const")
    assert_close(img, tensors["out.img.G_forward.psi0.7.const"], "out.img.G_forward.psi0.7.const")


def test_every_synthesis_block_matches_the_debug_intermediates(small, backend):
    tensors, _ = small
    G = _load_G(small, backend)
    captured = {}
    hooks = [getattr(G.synthesis, f"b{res}").register_forward_hook(
        lambda module, args, output, res=res: captured.__setitem__(res, output))
        for res in G.synthesis.block_resolutions]
    with torch.no_grad():
        G.synthesis(tensors["out.ws.psi1"], noise_mode="const")
    for hook in hooks:
        hook.remove()
    for res, (x, img) in captured.items():
        assert_close(x, tensors[f"dbg.G.synthesis.b{res}.x"], f"b{res}.x")
        assert_close(img, tensors[f"dbg.G.synthesis.b{res}.img"], f"b{res}.img")


def test_conv_clamp_generator_matches_nvidia(small, backend):
    tensors, description = small
    G = _load_G(small, backend, conv_clamp=description["clamp_variants"]["G_conv_clamp"])
    with torch.no_grad():
        img = G.synthesis(tensors["out.ws.psi1"], noise_mode="const")
    assert_close(img, tensors["out.img.psi1.const.clamp"], "out.img.psi1.const.clamp")


def test_training_path_non_fused_modconv_stays_within_tolerance(small, backend):
    """NVIDIA's training path (activation scaling instead of a grouped conv) agrees with the eval path."""
    tensors, _ = small
    G = _load_G(small, backend)
    with torch.no_grad():
        img = G.synthesis(tensors["out.ws.psi1"], noise_mode="const", fused_modconv=False)
    assert_close(img, tensors["out.img.psi1.const"], "out.img.psi1.const (fused_modconv=False)")


# ---- discriminator ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, img_name", [
    ("out.D.logits.img.psi1.const", "out.img.psi1.const"),
    ("out.D.logits.img.psi0.7.const", "out.img.psi0.7.const"),
])
def test_discriminator_matches_nvidia(small, backend, name, img_name):
    tensors, _ = small
    D = _load_D(small, backend)
    with torch.no_grad():
        logits = D(tensors[img_name])  # the stored image, so a G error cannot show up here
    assert_close(logits, tensors[name], name)


def test_discriminator_blocks_match_the_debug_intermediates(small, backend):
    tensors, _ = small
    D = _load_D(small, backend)
    captured = {}
    hooks = [getattr(D, f"b{res}").register_forward_hook(
        lambda module, args, output, res=res: captured.__setitem__(res, output)) for res in D.block_resolutions]
    with torch.no_grad():
        D(tensors["out.img.psi1.const"])
    for hook in hooks:
        hook.remove()
    assert sorted(captured) == [8, 16, 32]
    for res, x in captured.items():
        assert_close(x, tensors[f"dbg.D.b{res}.x"], f"D.b{res}.x")


def test_conv_clamp_discriminator_matches_nvidia(small, backend):
    tensors, description = small
    D = _load_D(small, backend, conv_clamp=description["clamp_variants"]["D_conv_clamp"])
    with torch.no_grad():
        logits = D(tensors["out.img.psi1.const"])
    assert_close(logits, tensors["out.D.logits.img.psi1.const.clamp"], "out.D.logits.img.psi1.const.clamp")


def test_every_stored_output_has_a_test(small):
    """A new out.* tensor in the data file must get a comparison above (none silently ignored)."""
    tensors, _ = small
    covered = {
        "out.ws.psi1", "out.ws.psi0.7", "out.ws.psi0.7.cutoff4", "out.img.psi1.const", "out.img.psi0.7.const",
        "out.img.psi1.none", "out.img.psi0.7.cutoff4.const", "out.img.psi0.7.random",
        "out.img.G_forward.psi0.7.const", "out.img.psi1.const.clamp", "out.D.logits.img.psi1.const",
        "out.D.logits.img.psi0.7.const", "out.D.logits.img.psi1.const.clamp",
    }
    assert {key for key in tensors if key.startswith("out.")} == covered


def test_loading_a_checkpoint_with_a_wrong_shape_is_a_checkpoint_error(small):
    from clip2gan_cli.errors import CheckpointError

    tensors, description = small
    state = split_prefix(tensors, "G.")
    state["synthesis.b8.conv0.weight"] = state["synthesis.b8.conv0.weight"][:, :32]
    del state["mapping.fc7.bias"]
    G = Generator(_generator_config(description), backend="reference")
    with pytest.raises(CheckpointError, match="missing: mapping.fc7.bias.*shape mismatch: synthesis.b8.conv0.weight"):
        load_state_dict_strict(G, state)


# ---- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_and_discriminator_match_nvidia(small, backend):
    from clip2gan_cli.device import disable_tf32

    disable_tf32()  # TF32 errors are orders of magnitude above the tolerance
    tensors, _ = small
    G = _load_G(small, backend, device="cuda")
    D = _load_D(small, backend, device="cuda")
    noise = {key: value.cuda() for key, value in split_prefix(tensors, NOISE_PREFIX).items()}
    with torch.no_grad():
        assert_close(G.mapping(tensors["in.z"].cuda(), 0.7, 4), tensors["out.ws.psi0.7.cutoff4"], "ws cutoff")
        assert_close(G.synthesis(tensors["out.ws.psi0.7.cutoff4"].cuda()), tensors["out.img.psi0.7.cutoff4.const"],
                       "img cutoff")
        assert_close(G.synthesis(tensors["out.ws.psi0.7"].cuda(), noise_mode="random", noise=noise),
                       tensors["out.img.psi0.7.random"], "img random")
        assert_close(D(tensors["out.img.psi1.const"].cuda()), tensors["out.D.logits.img.psi1.const"], "logits")


# ---- full-size key manifests ------------------------------------------------------------------

@pytest.mark.parametrize("manifest_name", ["nvidia_ffhq1024_keys.json", "nvidia_celebahq256_keys.json"])
def test_full_size_manifest_maps_one_to_one(manifest_name):
    """Every key, shape and parameter/buffer kind of the real checkpoints, nothing missing or unused."""
    manifest = json.loads((PARITY / manifest_name).read_text())
    g_kwargs, d_kwargs = manifest["G_init_kwargs"], manifest["D_init_kwargs"]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        G = build_generator(g_kwargs["img_resolution"], z_dim=g_kwargs["z_dim"], w_dim=g_kwargs["w_dim"],
                            channel_base=g_kwargs["synthesis_kwargs"]["channel_base"],
                            channel_max=g_kwargs["synthesis_kwargs"]["channel_max"],
                            mapping_layers=g_kwargs["mapping_kwargs"]["num_layers"], backend="reference")
        D = build_discriminator(d_kwargs["img_resolution"], channel_base=d_kwargs["channel_base"],
                                channel_max=d_kwargs["channel_max"],
                                mbstd_group_size=d_kwargs["epilogue_kwargs"]["mbstd_group_size"], backend="reference")
    assert G.num_ws == manifest["G_num_ws"]
    assert {str(r): c for r, c in G.config.channels_per_resolution().items()} == manifest["G_channels_per_resolution"]
    for label, net in (("G", G), ("D", D)):
        expected = {entry["name"]: (entry["shape"], entry["kind"]) for entry in manifest[label]["keys"]}
        parameters = {name for name, _ in net.named_parameters()}
        ours = {name: (list(t.shape), "parameter" if name in parameters else "buffer")
                for name, t in net.state_dict().items()}
        assert sorted(set(expected) - set(ours)) == [], f"{label}: keys we lack"
        assert sorted(set(ours) - set(expected)) == [], f"{label}: keys the checkpoint lacks"
        wrong = {name: (ours[name], expected[name]) for name in expected if ours[name] != expected[name]}
        assert wrong == {}, f"{label}: shape or kind differs"
        n_params = sum(p.numel() for p in net.parameters())
        assert n_params == manifest[label]["summary"]["num_parameters_total"]
