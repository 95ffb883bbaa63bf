"""Parity with rosinality/stylegan2-pytorch: its weights, translated by the importer's key map,
must reproduce the outputs its own code produced (tests/data/parity/rosinality_small.*).

Rule (README of the parity data): max|out - ref| <= 1e-5 * max(1, max|ref|) per tensor, CPU float32.
"""
from __future__ import annotations

import json

import pytest
import torch

from clip2gan_cli.stylegan2 import convert
from clip2gan_cli.stylegan2.networks import (Discriminator, DiscriminatorConfig, Generator, GeneratorConfig,
                                             load_state_dict_strict)

from parity_helpers import PARITY, assert_close, split_prefix


def _backends() -> list:
    from clip2gan_cli.errors import DeviceError
    from clip2gan_cli.stylegan2.ops import resolve_backend

    try:
        resolve_backend("eager")
        reason = None
    except DeviceError as error:
        reason = str(error)
    skip_fused = pytest.mark.skipif(reason is not None, reason=f"eager backend not available here: {reason}")
    return ["reference", pytest.param("eager", marks=skip_fused)]


@pytest.fixture(scope="module")
def parity():
    safetensors_path = PARITY / "rosinality_small.safetensors"
    if not safetensors_path.is_file():
        pytest.skip(f"parity data missing: {safetensors_path}")
    from safetensors.torch import load_file

    return load_file(str(safetensors_path)), json.loads((PARITY / "rosinality_small.json").read_text())


def _networks(parity, backend):
    tensors, info = parity
    channels = {int(res): ch for res, ch in info["G_init"]["channels_used"].items()}
    g_state = convert.rosinality_to_nvidia_generator(split_prefix(tensors, "g_ema."), tensors["latent_avg"])
    d_state = convert.rosinality_to_nvidia_discriminator(split_prefix(tensors, "d."))
    G = Generator(GeneratorConfig(img_resolution=info["G_init"]["size"], z_dim=info["G_init"]["style_dim"],
                                  w_dim=info["G_init"]["style_dim"], mapping_layers=info["G_init"]["n_mlp"],
                                  mapping_lr_mul=info["G_init"]["lr_mlp"], channels=channels), backend=backend)
    d_channels = {int(res): ch for res, ch in info["D_init"]["channels_used"].items()}
    D = Discriminator(DiscriminatorConfig(img_resolution=info["D_init"]["size"], channels=d_channels,
                                          mbstd_group_size=info["D_init"]["stddev_group"],
                                          mbstd_num_channels=info["D_init"]["stddev_feat"]), backend=backend)
    load_state_dict_strict(G, g_state, source="rosinality_small g_ema")
    load_state_dict_strict(D, d_state, source="rosinality_small d")
    return G.eval().requires_grad_(False), D.eval().requires_grad_(False)


@pytest.mark.parametrize("backend", _backends())
def test_rosinality_small_reproduces_every_output(parity, backend):
    tensors, info = parity
    G, D = _networks(parity, backend)
    z, z2 = tensors["in.z"], tensors["in.z2"]
    explicit_noise = [tensors[f"in.noise.{i}"] for i in range(info["G_init"]["num_layers"])]
    checked = set()

    def check(name, actual):
        assert_close(actual, tensors[name], name)
        checked.add(name)

    with torch.no_grad():
        ws = G.mapping(z)
        check("out.w", ws[:, 0])
        check("out.latents.psi1", ws)
        check("out.img.psi1.buffers", G.synthesis(ws, noise_mode="const"))  # randomize_noise=False
        ws_truncated = G.mapping(z, truncation_psi=0.7)  # centre: latent_avg, now mapping.w_avg
        check("out.latents.psi0.7", ws_truncated)
        check("out.img.psi0.7.buffers", G.synthesis(ws_truncated, noise_mode="const"))
        check("out.img.psi1.noise", G.synthesis(ws, noise=explicit_noise))
        check("out.img.psi0.7.noise", G.synthesis(ws_truncated, noise=explicit_noise))
        check("out.img.psi1.zeronoise", G.synthesis(ws, noise_mode="none"))
        check("out.img.wplus_input.psi0.7.buffers", G.synthesis(tensors["out.latents.psi0.7"], noise_mode="const"))
        # inject_index=3: W+ rows 0..2 from z, rows 3.. from z2.
        ws_mixed = torch.cat([ws[:, :3], G.mapping(z2)[:, 3:]], dim=1)
        check("out.latents.mix3", ws_mixed)
        check("out.img.mix3.buffers", G.synthesis(ws_mixed, noise_mode="const"))
        check("out.D.logits.img.psi1.buffers", D(tensors["out.img.psi1.buffers"]))
        check("out.D.logits.img.psi0.7.buffers", D(tensors["out.img.psi0.7.buffers"]))
    assert checked == {name for name in tensors if name.startswith("out.")}, "every out.* tensor is compared"


def test_inferred_config_matches_the_recorded_channel_table(parity):
    tensors, info = parity
    g_state = convert.rosinality_to_nvidia_generator(split_prefix(tensors, "g_ema."), tensors["latent_avg"])
    config = convert.infer_generator_config(g_state)
    assert config.img_resolution == info["G_init"]["size"]
    assert config.z_dim == config.w_dim == info["G_init"]["style_dim"]
    assert config.mapping_layers == info["G_init"]["n_mlp"]
    assert config.num_ws == info["G_init"]["n_latent"]
    assert config.channels_per_resolution() == {int(r): c for r, c in info["G_init"]["channels_used"].items()}
    d_config = convert.infer_discriminator_config(convert.rosinality_to_nvidia_discriminator(split_prefix(tensors, "d.")))
    assert d_config.channels_per_resolution() == {int(r): c for r, c in info["D_init"]["channels_used"].items()}


def test_load_generator_reads_the_rosinality_parity_file_directly(parity):
    tensors, _ = parity
    G = convert.load_generator(PARITY / "rosinality_small.safetensors", device="cpu", backend="reference")
    D = convert.load_discriminator(PARITY / "rosinality_small.safetensors", device="cpu", backend="reference")
    assert not any(p.requires_grad for p in G.parameters()) and not G.training
    with torch.no_grad():
        ws = G.mapping(tensors["in.z"], truncation_psi=0.7)
        assert_close(G.synthesis(ws, noise_mode="const"), tensors["out.img.psi0.7.buffers"], "out.img.psi0.7.buffers")
        assert_close(D(tensors["out.img.psi1.buffers"]), tensors["out.D.logits.img.psi1.buffers"],
                     "out.D.logits.img.psi1.buffers")


def _meta_tensors(entries: list[dict]) -> dict[str, torch.Tensor]:
    return {entry["name"]: torch.empty(entry["shape"], device="meta") for entry in entries}


@pytest.mark.slow  # the first meta-device build in a process costs a few seconds of torch warm-up
def test_rosinality_ffhq1024_manifest_maps_one_to_one_onto_our_networks():
    manifest_path = PARITY / "rosinality_ffhq1024_keys.json"
    if not manifest_path.is_file():
        pytest.skip(f"parity data missing: {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    g_state = convert.rosinality_to_nvidia_generator(_meta_tensors(manifest["g_ema"]["keys"]),
                                                     torch.empty([512], device="meta"))
    d_state = convert.rosinality_to_nvidia_discriminator(_meta_tensors(manifest["d"]["keys"]))
    g_config, d_config = convert.infer_generator_config(g_state), convert.infer_discriminator_config(d_state)
    assert g_config.channels_per_resolution() == {int(r): c for r, c in manifest["G_channels"].items()}
    assert g_config.num_ws == manifest["G_n_latent"]
    with torch.device("meta"):
        G, D = Generator(g_config, backend="reference"), Discriminator(d_config, backend="reference")
    for ours, theirs, label in ((G.state_dict(), g_state, "G"), (D.state_dict(), d_state, "D")):
        ours = {key: tuple(value.shape) for key, value in ours.items() if not key.endswith("resample_filter")}
        theirs = {key: tuple(value.shape) for key, value in theirs.items()}
        assert sorted(set(ours) - set(theirs)) == [], f"{label}: keys our network has but the manifest lacks"
        assert sorted(set(theirs) - set(ours)) == [], f"{label}: manifest keys our network lacks"
        assert ours == theirs, f"{label}: shapes differ"
    # Every rosinality tensor was used or is a constant blur kernel (nothing silently ignored).
    dropped = [entry["name"] for entry in manifest["g_ema"]["keys"] + manifest["d"]["keys"]
               if entry["name"].endswith("kernel")]
    assert len(g_state) + len(d_state) - 1 == manifest["g_ema"]["summary"]["num_tensors"] + \
        manifest["d"]["summary"]["num_tensors"] - len(dropped)


def test_rosinality_key_rules_hold_at_every_resolution():
    # The index rules of nvidia_rosinality_keymap_ffhq1024.json, checked pair by pair at 1024.
    keymap_path = PARITY / "nvidia_rosinality_keymap_ffhq1024.json"
    if not keymap_path.is_file():
        pytest.skip(f"parity data missing: {keymap_path}")
    keymap = json.loads(keymap_path.read_text())
    for pair in keymap["generator"]["pairs"]:
        assert convert.rosinality_generator_key(pair["rosinality"])[0] == pair["nvidia"]
    for pair in keymap["discriminator"]["pairs"]:
        assert convert.rosinality_discriminator_key(pair["rosinality"], 1024)[0] == pair["nvidia"]
    for key in keymap["generator"]["rosinality_only"]["keys"]:
        assert convert.rosinality_generator_key(key)[0] is None
    for key in keymap["discriminator"]["rosinality_only"]["keys"]:
        assert convert.rosinality_discriminator_key(key, 1024)[0] is None
