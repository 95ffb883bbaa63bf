"""`precision` through the pack loaders: load_pack / load_models / select_models -> the generator and the
discriminator run their num_fp16_res blocks as asked; CLIP and mapper stay float32."""
from __future__ import annotations

import pytest
import torch

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.packs import load_pack, select_models
from tiny_models import make_tiny_pack, register_tiny_pack


@pytest.fixture(scope="module")
def mixed_pack(tmp_path_factory):
    """A tiny pack whose G and D mark their two highest-resolution blocks for float16 (NVIDIA's num_fp16_res)."""
    from clip2gan_cli.stylegan2.convert import load_discriminator, load_generator, save_discriminator, save_generator
    from clip2gan_cli.stylegan2.networks import Discriminator, Generator

    paths = make_tiny_pack(tmp_path_factory.mktemp("mixed_pack"))
    for path, network_class, load, save in ((paths.generator, Generator, load_generator, save_generator),
                                            (paths.discriminator, Discriminator, load_discriminator,
                                             save_discriminator)):
        network = load(path, device="cpu", backend="reference")
        config = type(network.config).from_dict({**network.config.to_dict(), "num_fp16_res": 2})
        marked = network_class(config, backend="reference")
        marked.load_state_dict(network.state_dict())
        save(marked, path)
    return paths


def _synthesis_block_dtypes(generator) -> dict[int, torch.dtype]:
    seen: dict[int, torch.dtype] = {}
    for res in generator.synthesis.block_resolutions[1:]:  # b4 has no conv0
        def record(module, args, res=res):
            seen[res] = args[0].dtype
        generator.synthesis.get_submodule(f"b{res}.conv0").register_forward_pre_hook(record)
    with torch.no_grad():
        generator(torch.randn(1, generator.z_dim))
    return seen


@pytest.mark.parametrize("precision, reduced", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                ("fp32", torch.float32), ("auto", torch.float32)])
def test_load_pack_runs_the_generator_and_discriminator_in_the_precision_asked(mixed_pack, precision, reduced):
    pack = load_pack(register_tiny_pack(mixed_pack, "mixed"), device="cpu", precision=precision)
    resolved = "fp32" if precision == "auto" else precision  # auto on the CPU: float32
    assert pack.precision == pack.generator.precision == resolved
    assert _synthesis_block_dtypes(pack.generator) == {8: reduced, 16: reduced}  # num_fp16_res=2 at 16 px
    discriminator = pack.load_discriminator()
    assert discriminator.precision == resolved and discriminator.config.num_fp16_res == 2
    assert next(pack.mapper.parameters()).dtype == torch.float32


def test_select_models_with_explicit_files_passes_the_precision_on(mixed_pack):
    pack = select_models(None, mixed_pack.mapper, str(mixed_pack.generator), str(mixed_pack.clip_config),
                         device="cpu", precision="fp16")
    assert pack.precision == pack.generator.precision == "fp16"
    assert _synthesis_block_dtypes(pack.generator)[16] == torch.float16
    assert pack.load_discriminator() is None  # explicit files name no discriminator
    default = select_models(None, mixed_pack.mapper, str(mixed_pack.generator), str(mixed_pack.clip_config),
                            device="cpu")
    assert default.generator.precision == "fp32"


@pytest.mark.parametrize("explicit_files", [False, True], ids=["pack", "files"])
def test_unknown_precision_is_refused_before_loading(mixed_pack, explicit_files):
    with pytest.raises(UserInputError, match="`precision` 'half'"):
        if explicit_files:
            select_models(None, mixed_pack.mapper, str(mixed_pack.generator), str(mixed_pack.clip_config),
                          device="cpu", precision="half")
        else:
            load_pack(register_tiny_pack(mixed_pack, "mixed"), device="cpu", precision="half")


def test_cli_precision_reaches_the_generator_and_auto_is_float32_on_the_cpu(mixed_pack, cli_runner, tmp_path):
    """generate --precision: fp32 and the default (auto = fp32 on the CPU) write the same bytes; fp16 runs the
    marked blocks in float16, so its images differ slightly (float16 rounding, visible after 8-bit quantisation)."""
    import io

    import numpy as np
    from PIL import Image

    def images(precision):
        out = tmp_path / (precision or "default")
        args = ["generate", "a red circle", "-n", "4", "--no-grid", *mixed_pack.cli_args(), "--out", str(out)]
        result = cli_runner(args + (["--precision", precision] if precision else []))
        assert result.exit_code == 0, result.stderr
        return [(out / f"a-red-circle_s0_{i:03d}.png").read_bytes() for i in range(4)]

    default, fp32, fp16 = images(None), images("fp32"), images("FP16")
    assert default == fp32
    pixels = lambda png: np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)  # noqa: E731
    deviation = max(np.abs(pixels(a) - pixels(b)).max() for a, b in zip(fp16, fp32))
    assert 0 < deviation <= 8, deviation  # float16 rounding: a few 8-bit levels at most


def test_serve_reproducing_commands_carry_a_precision_other_than_auto():
    from clip2gan_cli.serve.app import ModelSpec

    assert "--precision" not in ModelSpec(pack="tiny").cli_args()
    assert ModelSpec(pack="tiny", precision="fp16").cli_args() == ["--pack", "tiny", "--precision", "fp16"]


def test_serve_refuses_an_unknown_precision_before_listening(cli_runner):
    result = cli_runner(["serve", "--precision", "fp8", "--port", "0"])
    assert result.exit_code == 1
    expected = "Error: unknown --precision 'fp8' (expected auto | fp32 | fp16 | bf16)"
    assert result.stderr.strip().splitlines() == [expected]
