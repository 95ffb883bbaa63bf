"""Checkpoint import: NVIDIA pickles (built here in NVIDIA's persistence structure), rosinality
`.pt` files, the project's safetensors, config inference from shapes, and the conversion cache."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from _nvidia_pickles import dumps_snapshot
from clip2gan_cli.errors import CheckpointError, UserInputError
from clip2gan_cli.stylegan2 import build_discriminator, build_generator, convert
from clip2gan_cli.stylegan2.networks import Discriminator, Generator
from parity_helpers import PARITY, assert_close, split_prefix



def _load_parity(name: str) -> dict[str, torch.Tensor]:
    path = PARITY / name
    if not path.is_file():
        pytest.skip(f"parity data missing: {path}")
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def nvidia_small():
    return _load_parity("nvidia_small.safetensors")


@pytest.fixture(scope="module")
def rosinality_small():
    return _load_parity("rosinality_small.safetensors")


# ----------------------------------------------------------------------------------------------
# NVIDIA pickles


@pytest.mark.parametrize("protocol, ordered_containers", [(2, False), (3, True), (4, False)],
                         ids=["protocol2", "protocol3-torch1.7-containers", "protocol4"])
def test_nvidia_snapshot_pickle_loads_and_reproduces_parity_outputs(tmp_path, nvidia_small, protocol,
                                                                     ordered_containers):
    pickle_path = tmp_path / f"network-snapshot-p{protocol}.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D."), protocol=protocol,
                                           ordered_containers=ordered_containers))
    G = convert.load_generator(pickle_path, device="cpu", backend="reference")
    D = convert.load_discriminator(pickle_path, device="cpu", backend="reference")
    assert isinstance(G, Generator) and isinstance(D, Discriminator)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    z = nvidia_small["in.z"]
    with torch.no_grad():
        for psi, cutoff, name in ((1.0, None, "psi1"), (0.7, None, "psi0.7"), (0.7, 4, "psi0.7.cutoff4")):
            ws = G.mapping(z, truncation_psi=psi, truncation_cutoff=cutoff)
            assert_close(ws, nvidia_small[f"out.ws.{name}"], f"out.ws.{name}")
            assert_close(G.synthesis(ws, noise_mode="const"), nvidia_small[f"out.img.{name}.const"],
                         f"out.img.{name}.const")
        ws = G.mapping(z)
        assert_close(G.synthesis(ws, noise_mode="none"), nvidia_small["out.img.psi1.none"], "out.img.psi1.none")
        prefix = "in.noise.psi0.7.random."
        noise = {key[len(prefix):]: value for key, value in nvidia_small.items() if key.startswith(prefix)}
        ws = G.mapping(z, truncation_psi=0.7)
        assert_close(G.synthesis(ws, noise=noise), nvidia_small["out.img.psi0.7.random"], "out.img.psi0.7.random")
        assert_close(G(z, truncation_psi=0.7, noise_mode="const"), nvidia_small["out.img.G_forward.psi0.7.const"],
                     "out.img.G_forward.psi0.7.const")
        for image in ("psi1.const", "psi0.7.const"):
            assert_close(D(nvidia_small[f"out.img.{image}"]), nvidia_small[f"out.D.logits.img.{image}"],
                         f"out.D.logits.img.{image}")


def test_nvidia_pickle_recorded_conv_clamp_and_mbstd_group_are_used(tmp_path, nvidia_small):
    # conv_clamp and the mbstd group change no tensor: they must come from the recorded attributes.
    pickle_path = tmp_path / "clamped.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D."),
                                           conv_clamp=(1.5, 4.0)))
    G = convert.load_generator(pickle_path, device="cpu", backend="reference")
    D = convert.load_discriminator(pickle_path, device="cpu", backend="reference")
    assert G.config.conv_clamp == 1.5 and D.config.conv_clamp == 4.0
    with torch.no_grad():
        assert_close(G.synthesis(nvidia_small["out.ws.psi1"], noise_mode="const"),
                     nvidia_small["out.img.psi1.const.clamp"], "out.img.psi1.const.clamp")
        assert_close(D(nvidia_small["out.img.psi1.const"]), nvidia_small["out.D.logits.img.psi1.const.clamp"],
                     "out.D.logits.img.psi1.const.clamp")
    whole_batch = tmp_path / "legacy-tf-conversion.pkl"
    whole_batch.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D."),
                                           mbstd_group_size=None))
    assert convert.load_discriminator(whole_batch, device="cpu").config.mbstd_group_size is None


@pytest.fixture(scope="module")
def nvidia_small_fp16():
    return _load_parity("nvidia_small_fp16.safetensors")


def _marked_block_dtypes(network, blocks) -> dict[str, torch.dtype]:
    """{block: dtype of the activations its conv layers receive} over one forward call (pre-hooks)."""
    seen: dict[str, torch.dtype] = {}

    def recorder(name):
        def record(module, args):
            seen[name] = args[0].dtype
        return record

    for name in blocks:
        for layer in ("conv0", "conv1"):
            network.get_submodule(f"{name}.{layer}").register_forward_pre_hook(recorder(name))
    return seen


def test_nvidia_pickle_mixed_precision_settings_survive_conversion(tmp_path, nvidia_small_fp16):
    # num_fp16_res and conv_clamp change no tensor: read from the recorded kwargs, kept in the converted config.
    pickle_path = tmp_path / "mixed.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small_fp16, "G."), split_prefix(nvidia_small_fp16, "D."),
                                           conv_clamp=(256, 256), num_fp16_res=(2, 2)))
    generator_path = convert.convert_checkpoint(pickle_path, out_dir=tmp_path / "converted")
    for path in (generator_path, convert.discriminator_path(generator_path)):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            config = json.loads(handle.metadata()["config"])
        assert (config["num_fp16_res"], config["conv_clamp"]) == (2, 256), path.name
    G = convert.load_generator(generator_path, device="cpu", backend="reference")
    D = convert.load_discriminator(convert.discriminator_path(generator_path), device="cpu", backend="reference")
    assert (G.config.num_fp16_res, G.config.conv_clamp, G.config.fp16_resolutions) == (2, 256, [16, 32])
    assert (D.config.num_fp16_res, D.config.conv_clamp, sorted(D.config.fp16_resolutions)) == (2, 256, [16, 32])
    assert G.precision == D.precision == "fp32"  # auto on the CPU


def test_nvidia_pickle_without_num_fp16_res_and_old_converted_files_load_as_float32(tmp_path, nvidia_small):
    from safetensors.torch import load_file, save_file

    pickle_path = tmp_path / "fp32.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D.")))
    generator_path = convert.convert_checkpoint(pickle_path, out_dir=tmp_path / "converted")
    assert convert.load_generator(generator_path, device="cpu").config.num_fp16_res == 0
    from safetensors import safe_open

    with safe_open(str(generator_path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["num_fp16_res"]  # a file converted before the key existed
    old_path = tmp_path / "old.G.safetensors"
    save_file(load_file(str(generator_path)), str(old_path), metadata={**metadata, "config": json.dumps(config),
                                                                       "converter_version": "1"})
    G = convert.load_generator(old_path, device="cpu", precision="fp16")
    assert G.config.num_fp16_res == 0 and G.config.fp16_resolutions == []


def test_bad_num_fp16_res_in_a_pickle_is_a_checkpoint_error(tmp_path, nvidia_small):
    path = tmp_path / "bad.pkl"
    path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), None, num_fp16_res=(-1, 0)))
    with pytest.raises(CheckpointError, match="num_fp16_res"):
        convert.load_generator(path, device="cpu")


def test_cached_conversions_of_an_older_converter_are_redone(tmp_path, nvidia_small_fp16):
    pickle_path = tmp_path / "net.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small_fp16, "G."), None, conv_clamp=(256, None),
                                           num_fp16_res=(2, 0)))
    out_dir = tmp_path / "converted"
    generator_path = convert.convert_checkpoint(pickle_path, out_dir=out_dir)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(generator_path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["num_fp16_res"]  # what version 1 wrote: the setting was lost
    save_file(load_file(str(generator_path)), str(generator_path),
              metadata={**metadata, "config": json.dumps(config), "converter_version": "1"})
    assert convert.load_generator(generator_path, device="cpu").config.num_fp16_res == 0
    convert.convert_checkpoint(pickle_path, out_dir=out_dir)
    assert convert.load_generator(generator_path, device="cpu").config.num_fp16_res == 2


def test_load_with_precision_runs_the_marked_blocks_as_asked(tmp_path, nvidia_small_fp16):
    """precision="fp16" on the CPU: the checkpoint's two marked blocks run in float16 and reproduce NVIDIA's
    float16 outputs (reference backend, NVIDIA's NCHW layout: float32-tight); "fp32" and auto: all float32."""
    tensors = nvidia_small_fp16
    pickle_path = tmp_path / "mixed.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(tensors, "G."), split_prefix(tensors, "D."),
                                           conv_clamp=(256, 256), num_fp16_res=(2, 2)))
    ws = tensors["out.ws.psi1"]
    expected = {"fp16": torch.float16, "fp32": torch.float32, "auto": torch.float32}
    for precision, dtype in expected.items():
        G = convert.load_generator(pickle_path, device="cpu", backend="reference", precision=precision)
        D = convert.load_discriminator(pickle_path, device="cpu", backend="reference", precision=precision)
        seen_G = _marked_block_dtypes(G.synthesis, ["b8", "b16", "b32"])
        seen_D = _marked_block_dtypes(D, ["b32", "b16", "b8"])
        path = "fp16path" if precision == "fp16" else "fp32path"
        with torch.no_grad():
            assert_close(G.synthesis(ws, noise_mode="const"), tensors[f"out.img.const.{path}"], f"{precision} image")
            assert_close(D(tensors["out.img.const.fp32path"]), tensors[f"out.D.logits.{path}"], f"{precision} logits")
        assert seen_G == {"b8": torch.float32, "b16": dtype, "b32": dtype}, precision
        assert seen_D == {"b32": dtype, "b16": dtype, "b8": torch.float32}, precision
        assert G.precision == D.precision == ("fp32" if precision == "auto" else precision)


@pytest.mark.parametrize("loader", ["load_generator", "load_discriminator"])
def test_unknown_precision_fails_at_load_naming_the_parameter(tmp_path, nvidia_small, loader, clip2gan_home):
    pickle_path = tmp_path / "net.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D.")))
    with pytest.raises(UserInputError, match="`precision` 'fp8'") as caught:
        getattr(convert, loader)(pickle_path, device="cpu", precision="fp8")
    assert "auto | fp32 | fp16 | bf16" in caught.value.one_line()
    assert not (clip2gan_home / "converted").exists(), "refused before any conversion"


def test_nvidia_pickle_without_discriminator_gives_a_clear_error_for_D(tmp_path, nvidia_small):
    pickle_path = tmp_path / "generator-only.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), None))
    assert convert.load_generator(pickle_path, device="cpu").img_resolution == 32
    with pytest.raises(CheckpointError, match="holds no discriminator"):
        convert.load_discriminator(pickle_path, device="cpu")


def test_conversion_happens_once_and_records_its_source(tmp_path, nvidia_small):
    pickle_path = tmp_path / "net.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D.")))
    out_dir = tmp_path / "converted"
    generator_path = convert.convert_checkpoint(pickle_path, out_dir=out_dir)
    assert generator_path == out_dir / "net.G.safetensors"
    assert convert.discriminator_path(generator_path) == out_dir / "net.D.safetensors"
    assert convert.discriminator_path(generator_path).is_file()
    from safetensors import safe_open

    with safe_open(str(generator_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == convert.GENERATOR_FORMAT
    assert json.loads(metadata["config"])["img_resolution"] == 32
    assert metadata["source_network"] == "G_ema" and metadata["source_format"] == "nvidia-pkl"
    assert len(metadata["source_sha256"]) == 64
    first_write = generator_path.stat().st_mtime_ns

    assert convert.convert_checkpoint(pickle_path, out_dir=out_dir) == generator_path
    assert generator_path.stat().st_mtime_ns == first_write, "an up-to-date conversion is reused"
    os.utime(pickle_path, ns=(first_write + 10**9, first_write + 10**9))  # touched, same bytes
    convert.convert_checkpoint(pickle_path, out_dir=out_dir)
    assert generator_path.stat().st_mtime_ns == first_write, "same sha256: reused"

    changed = split_prefix(nvidia_small, "G.")
    changed["mapping.w_avg"] = changed["mapping.w_avg"] + 1.0
    pickle_path.write_bytes(dumps_snapshot(changed, split_prefix(nvidia_small, "D.")))
    convert.convert_checkpoint(pickle_path, out_dir=out_dir)
    G = convert.load_generator(generator_path, device="cpu")
    torch.testing.assert_close(G.w_avg, changed["mapping.w_avg"], rtol=0, atol=0)


def test_convert_checkpoint_defaults_to_the_cache(tmp_path, nvidia_small, clip2gan_home):
    pickle_path = tmp_path / "ffhq.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), None))
    assert convert.convert_checkpoint(pickle_path) == clip2gan_home / "converted" / "ffhq.G.safetensors"


def test_registry_name_is_fetched_converted_and_loaded(tmp_path, nvidia_small, monkeypatch, clip2gan_home):
    pickle_path = tmp_path / "stylegan2-tiny-32x32.pkl"
    pickle_path.write_bytes(dumps_snapshot(split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D.")))
    fetched = []

    def fake_fetch(name, registry=None, progress=True):
        fetched.append(name)
        return pickle_path

    monkeypatch.setattr("clip2gan_cli.weights.fetch", fake_fetch)
    G = convert.load_generator("stylegan2-tiny-32x32", device="cpu", backend="reference")
    D = convert.load_discriminator("stylegan2-tiny-32x32", device="cpu", backend="reference")
    assert fetched == ["stylegan2-tiny-32x32"] * 2
    assert (clip2gan_home / "converted" / "stylegan2-tiny-32x32.G.safetensors").is_file()
    with torch.no_grad():
        assert_close(G.synthesis(nvidia_small["out.ws.psi1"]), nvidia_small["out.img.psi1.const"], "out.img.psi1.const")
        assert_close(D(nvidia_small["out.img.psi1.const"]), nvidia_small["out.D.logits.img.psi1.const"],
                     "out.D.logits.img.psi1.const")


# ----------------------------------------------------------------------------------------------
# rosinality .pt


def _rosinality_mean_latent(g_state: dict, samples: int, seed: int) -> torch.Tensor:
    """rosinality's Generator.mean_latent written out from its own tensors (PixelNorm + EqualLinear)."""
    z = torch.randn([samples, g_state["style.1.weight"].shape[1]], generator=torch.Generator().manual_seed(seed))
    x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
    index = 1
    while f"style.{index}.weight" in g_state:
        weight, bias = g_state[f"style.{index}.weight"], g_state[f"style.{index}.bias"]
        x = torch.nn.functional.linear(x, weight * (0.01 / math.sqrt(weight.shape[1])))
        x = torch.nn.functional.leaky_relu(x + bias * 0.01, 0.2) * math.sqrt(2)
        index += 1
    return x.mean(dim=0)


def test_rosinality_converted_file_with_latent_avg_loads(tmp_path, rosinality_small):
    checkpoint = {"g_ema": split_prefix(rosinality_small, "g_ema."), "latent_avg": rosinality_small["latent_avg"],
                  "d": split_prefix(rosinality_small, "d.")}
    path = tmp_path / "stylegan2-ffhq-config-f.pt"
    torch.save(checkpoint, path)
    G = convert.load_generator(path, device="cpu", backend="reference")
    D = convert.load_discriminator(path, device="cpu", backend="reference")
    torch.testing.assert_close(G.w_avg, rosinality_small["latent_avg"], rtol=0, atol=0)
    with torch.no_grad():
        ws = G.mapping(rosinality_small["in.z"], truncation_psi=0.7)
        assert_close(G.synthesis(ws), rosinality_small["out.img.psi0.7.buffers"], "out.img.psi0.7.buffers")
        assert_close(D(rosinality_small["out.img.psi1.buffers"]), rosinality_small["out.D.logits.img.psi1.buffers"],
                     "out.D.logits.img.psi1.buffers")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_rosinality_training_snapshot_estimates_latent_avg(tmp_path, rosinality_small, legacy):
    g_ema = split_prefix(rosinality_small, "g_ema.")
    snapshot = {
        "g": {name: value + 0.5 for name, value in g_ema.items()},  # raw weights differ from the EMA
        "d": split_prefix(rosinality_small, "d."),
        "g_ema": g_ema,
        "g_optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                    "param_groups": [{"lr": 0.002, "betas": (0.0, 0.99), "params": [0]}]},
        "d_optim": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(size=32, n_mlp=8, latent=64, channel_multiplier=2, path="/data/lmdb",
                                   ckpt=None, augment=True),
        "ada_aug_p": 0.12,
    }
    path = tmp_path / "550000.pt"
    torch.save(snapshot, path, _use_new_zipfile_serialization=not legacy)
    G = convert.load_generator(path, device="cpu", backend="reference")
    expected = _rosinality_mean_latent(g_ema, convert.LATENT_AVG_SAMPLES, convert.LATENT_AVG_SEED)
    torch.testing.assert_close(G.w_avg, expected, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(convert.converted_paths(path)[0]), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["w_avg_source"].startswith("estimated: mean of mapping(z) over 4096")
    assert metadata["source_network"] == "g_ema"
    assert json.loads(metadata["training_args"])["channel_multiplier"] == 2
    with torch.no_grad():  # the EMA weights were used, not `g`
        assert_close(G.synthesis(G.mapping(rosinality_small["in.z"])), rosinality_small["out.img.psi1.buffers"],
                     "out.img.psi1.buffers")


def test_rosinality_blur_kernel_other_than_1331_is_refused(tmp_path, rosinality_small):
    g_ema = split_prefix(rosinality_small, "g_ema.")
    g_ema["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    path = tmp_path / "odd-kernel.pt"
    torch.save({"g_ema": g_ema, "latent_avg": rosinality_small["latent_avg"]}, path)
    with pytest.raises(CheckpointError, match="blur kernel"):
        convert.load_generator(path, device="cpu")


# ----------------------------------------------------------------------------------------------
# The project's safetensors


def test_save_and_load_generator_round_trip(tmp_path):
    G = build_generator(16, z_dim=8, w_dim=8, channel_base=64, channel_max=16, mapping_layers=2,
                        conv_clamp=256.0, backend="reference", seed=3).eval()
    path = convert.save_generator(G, tmp_path / "tiny.G.safetensors", extra_metadata={"note": "test", "n": 3})
    loaded = convert.load_generator(path, device="cpu", backend="reference")
    assert loaded.config == G.config
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, truncation_psi=0.5), G(z, truncation_psi=0.5), rtol=0, atol=0)
    D = build_discriminator(16, channel_base=64, channel_max=16, mbstd_group_size=2, backend="reference", seed=4)
    d_path = convert.save_discriminator(D, tmp_path / "tiny.D.safetensors")
    assert convert.load_discriminator(d_path, device="cpu").config == D.config
    with pytest.raises(CheckpointError, match="holds a discriminator, not a generator"):
        convert.load_generator(d_path, device="cpu")


def test_safetensors_without_metadata_uses_json_beside_or_shapes(tmp_path):
    from safetensors.torch import save_file

    G = build_generator(16, z_dim=8, w_dim=8, channel_base=64, channel_max=16, mapping_layers=2,
                        backend="reference", seed=5)
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path))
    assert convert.load_generator(path, device="cpu").config.channels_per_resolution() == \
        G.config.channels_per_resolution()
    config = dict(G.config.to_dict(), conv_clamp=64.0)  # a shape-neutral setting only the JSON can give
    path.with_suffix(".json").write_text(json.dumps({"generator": config}))
    assert convert.load_generator(path, device="cpu").config.conv_clamp == 64.0


def test_nvidia_parity_file_loads_by_its_key_prefixes(nvidia_small):
    G = convert.load_generator(PARITY / "nvidia_small.safetensors", device="cpu", backend="reference")
    with torch.no_grad():
        assert_close(G.synthesis(G.mapping(nvidia_small["in.z"], truncation_psi=0.7, truncation_cutoff=4)),
                     nvidia_small["out.img.psi0.7.cutoff4.const"], "out.img.psi0.7.cutoff4.const")


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_file_is_a_user_input_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        convert.load_generator(tmp_path / "nope.pkl", device="cpu")
    with pytest.raises(UserInputError):
        convert.convert_checkpoint(tmp_path / "nope.pt", out_dir=tmp_path)
    with pytest.raises(UserInputError, match="not a checkpoint file"):
        convert.load_generator(tmp_path, device="cpu")


def test_unknown_file_content_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a StyleGAN2 checkpoint"):
        convert.load_generator(path, device="cpu")


def test_unknown_layout_names_what_it_found(tmp_path):
    path = tmp_path / "classifier.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="no generator found"):
        convert.load_generator(path, device="cpu")
    torch.save({"g_ema": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="unknown generator layout"):
        convert.load_generator(path, device="cpu")


def test_wrong_architecture_is_a_checkpoint_error(tmp_path, nvidia_small):
    state = split_prefix(nvidia_small, "G.")
    state["synthesis.b16.conv0.weight"] = torch.zeros(64, 48, 3, 3)  # no longer fits b8's 64 channels
    path = tmp_path / "broken.pkl"
    path.write_bytes(dumps_snapshot(state, None))
    with pytest.raises(CheckpointError, match="does not fit the network"):
        convert.load_generator(path, device="cpu")
    assert not (Path(os.environ["CLIP2GAN_HOME"]) / "converted" / "broken.G.safetensors").exists()


def test_truncated_pickle_is_a_checkpoint_error(tmp_path, nvidia_small):
    data = dumps_snapshot(split_prefix(nvidia_small, "G."), None)
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        convert.load_generator(path, device="cpu")


# ----------------------------------------------------------------------------------------------
# Architecture inference from the full-size manifests (shapes only, meta tensors)


def _manifest(name: str) -> dict:
    path = PARITY / name
    if not path.is_file():
        pytest.skip(f"parity data missing: {path}")
    return json.loads(path.read_text())


def _meta_state(entries: list[dict], overrides: dict | None = None) -> dict[str, torch.Tensor]:
    overrides = overrides or {}
    return {e["name"]: torch.empty(overrides.get(e["name"], e["shape"]), device="meta") for e in entries}


@pytest.mark.slow  # builds full-size networks on the meta device (a few seconds of torch warm-up)
@pytest.mark.parametrize("manifest_name, resolution, channel_base, mbstd_group", [
    ("nvidia_ffhq1024_keys.json", 1024, 32768, 4),
    ("nvidia_celebahq256_keys.json", 256, 16384, 8),
])
def test_infer_config_from_nvidia_manifests(manifest_name, resolution, channel_base, mbstd_group):
    manifest = _manifest(manifest_name)
    g_config = convert.infer_generator_config(_meta_state(manifest["G"]["keys"]))
    assert (g_config.img_resolution, g_config.z_dim, g_config.w_dim) == (resolution, 512, 512)
    assert g_config.mapping_layers == 8 and g_config.mapping_lr_mul == 0.01
    assert g_config.num_ws == manifest["G_num_ws"]
    assert (g_config.channel_base, g_config.channel_max) == (channel_base, 512)
    assert g_config.channels_per_resolution() == {int(r): c for r, c in manifest["G_channels_per_resolution"].items()}
    d_config = convert.infer_discriminator_config(_meta_state(manifest["D"]["keys"]), mbstd_group_size=mbstd_group)
    assert (d_config.img_resolution, d_config.channel_base, d_config.mbstd_num_channels) == (resolution, channel_base, 1)
    with torch.device("meta"):
        G, D = Generator(g_config, backend="reference"), Discriminator(d_config, backend="reference")
    for network, label in ((G, "G"), (D, "D")):
        ours = {key: list(value.shape) for key, value in network.state_dict().items()}
        theirs = {entry["name"]: entry["shape"] for entry in manifest[label]["keys"]}
        assert ours == theirs, f"{label} built from the inferred config differs from the manifest"


def test_celebahq256_channel_base_is_told_apart_by_b64_shapes():
    manifest = _manifest("nvidia_celebahq256_keys.json")
    g_overrides = {d["name"]: d["shape_cbase32768"] for d in manifest["alternative_channel_base_32768_shape_differences"]
                   if d["net"] == "G"}
    assert "synthesis.b64.conv0.weight" in g_overrides
    config = convert.infer_generator_config(_meta_state(manifest["G"]["keys"], g_overrides))
    assert config.channel_base == 32768
    assert config.channels_per_resolution() == {int(r): c for r, c in
                                                manifest["G_channels_per_resolution_if_channel_base_32768"].items()}


def test_inference_refuses_unsupported_layouts():
    manifest = _manifest("nvidia_celebahq256_keys.json")
    state = _meta_state(manifest["G"]["keys"])
    conditional = dict(state, **{"mapping.embed.weight": torch.empty(512, 10, device="meta")})
    with pytest.raises(CheckpointError, match="class-conditional"):
        convert.infer_generator_config(conditional)
    no_torgb = {k: v for k, v in state.items() if not k.startswith("synthesis.b64.torgb.")}
    with pytest.raises(CheckpointError, match="skip"):
        convert.infer_generator_config(no_torgb)
    gap = {k: v for k, v in state.items() if not k.startswith("synthesis.b32.")}
    with pytest.raises(CheckpointError):
        convert.infer_generator_config(gap)


def test_nvidia_settings_fall_back_to_recorded_constructor_kwargs(tmp_path, nvidia_small):
    # Without the module attributes, conv_clamp / mbstd group come from _init_kwargs (stylegan3 keeps them flat).
    from _nvidia_pickles import build_tree, default_attributes, dumps_with_stand_ins

    g_state, d_state = split_prefix(nvidia_small, "G."), split_prefix(nvidia_small, "D.")
    g_attributes = {"": {"_init_kwargs": {"conv_clamp": 1.5, "z_dim": 64}}}
    d_attributes = {"": {"_init_kwargs": {"conv_clamp": 4.0, "epilogue_kwargs": {"mbstd_group_size": 2}}}}
    root = {"G_ema": build_tree(g_state, "generator", g_attributes), "D": build_tree(d_state, "discriminator",
                                                                                   d_attributes)}
    path = tmp_path / "kwargs-only.pkl"
    path.write_bytes(dumps_with_stand_ins(root, protocol=4))
    G = convert.load_generator(path, device="cpu", backend="reference")
    D = convert.load_discriminator(path, device="cpu", backend="reference")
    assert (G.config.conv_clamp, D.config.conv_clamp, D.config.mbstd_group_size) == (1.5, 4.0, 2)
    with torch.no_grad():
        assert_close(G.synthesis(nvidia_small["out.ws.psi1"]), nvidia_small["out.img.psi1.const.clamp"],
                     "out.img.psi1.const.clamp")
    bad = dict(default_attributes(g_state, "generator"))
    bad["synthesis.b4.conv1"] = {**bad["synthesis.b4.conv1"], "conv_clamp": "256; rm -rf /"}
    path.write_bytes(dumps_with_stand_ins({"G_ema": build_tree(g_state, "generator", bad)}, protocol=4))
    with pytest.raises(CheckpointError, match="conv_clamp"):
        convert.load_generator(path, device="cpu")


def test_package_re_exports_the_loaders():
    import clip2gan_cli

    assert clip2gan_cli.load_generator is convert.load_generator
    assert clip2gan_cli.load_discriminator is convert.load_discriminator


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # the typed storage is what gets pickled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int64,
                                   torch.uint8, torch.bool])
def test_nested_storage_streams_parse_like_torch(dtype):
    # Each tensor's storage is a legacy torch.save stream; ours is parsed by hand, never torch.load-ed.
    from clip2gan_cli.stylegan2.safe_pickle import parse_legacy_storage

    tensor = (torch.arange(-5, 7) * 3).to(dtype)
    func, (blob,) = tensor.storage().__reduce__()  # what pickle.dumps writes for a tensor's storage
    assert func is torch.storage._load_from_bytes
    parsed = parse_legacy_storage(blob)
    assert parsed.flat.dtype == dtype
    torch.testing.assert_close(parsed.flat, tensor, rtol=0, atol=0)


def test_pickle_with_only_G_uses_it(tmp_path, nvidia_small):
    from _nvidia_pickles import build_tree, default_attributes, dumps_with_stand_ins

    g_state = split_prefix(nvidia_small, "G.")
    tree = build_tree(g_state, "generator", default_attributes(g_state, "generator"))
    path = tmp_path / "legacy-G-only.pkl"
    path.write_bytes(dumps_with_stand_ins({"G": tree, "D": None}, protocol=3))
    G = convert.load_generator(path, device="cpu", backend="reference")
    with torch.no_grad():
        assert_close(G.mapping(nvidia_small["in.z"]), nvidia_small["out.ws.psi1"], "out.ws.psi1")
