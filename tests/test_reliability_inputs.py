"""Bad input at the command line, per subcommand: the rows of docs/reliability.md that the
per-command test files do not already cover (those are referenced from the table, not repeated).

Every refusal is one `Error:` line on stderr, exit code 1, and nothing written to the output
folder; every odd-but-valid input (CMYK, 16-bit, grayscale, RGBA, animated GIF, a 10,000-character
prompt, a symlink loop in a data folder) works with exit code 0.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, written_files
from test_imageio import _png_with_declared_size
from test_metrics_eval import write_noise_images
from tiny_models import make_tiny_generator, make_tiny_mapper

LONG_PROMPT = ("a red circle " * 770).strip()  # 10,009 characters
assert len(LONG_PROMPT) >= 10_000


# ----------------------------------------------------------------------------------------------
# Image files


def _noise(size=(40, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_odd_image(directory: Path, kind: str) -> Path:
    """A valid image in an unusual mode: cmyk, 16bit, gray, rgba, gif (animated)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = _noise()
    if kind == "cmyk":
        path = directory / "cmyk.jpg"
        base.convert("CMYK").save(path, format="JPEG")
    elif kind == "16bit":
        path = directory / "deep.png"
        Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(path)
        assert Image.open(path).mode.startswith("I")
    elif kind == "gray":
        path = directory / "gray.png"
        base.convert("L").save(path)
    elif kind == "rgba":
        path = directory / "alpha.png"
        rgba = base.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path)
    elif kind == "gif":
        path = directory / "anim.gif"
        base.save(path, save_all=True, append_images=[_noise(seed=1), _noise(seed=2)], duration=50, loop=0)
        assert getattr(Image.open(path), "n_frames", 1) == 3
    else:
        raise ValueError(kind)
    return path


def write_bad_image(directory: Path, kind: str) -> tuple[Path, str]:
    """A hostile or broken image and the fragment its one-line error must contain."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "bomb":
        return _png_with_declared_size(directory / "bomb.png", 30_000, 30_000), "decompression bomb"
    fmt, suffix = {"truncated-png": ("PNG", "png"), "truncated-jpeg": ("JPEG", "jpg")}[kind]
    full = directory / f"full.{suffix}"
    _noise((128, 128)).save(full, format=fmt)
    cut = directory / f"cut.{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return cut, "truncated or corrupt"


ODD = ["cmyk", "16bit", "gray", "rgba", "gif"]
BAD = ["bomb", "truncated-png", "truncated-jpeg"]


def _cli(cli_runner, command, tiny_pack, out, *args, **kwargs):
    return cli_runner([command, *args, *tiny_pack.cli_args(), "--out", out], **kwargs)


@pytest.mark.parametrize("kind", ODD)
def test_edit_reads_odd_image_modes(cli_runner, tiny_pack, tmp_path, kind):
    image = write_odd_image(tmp_path / "in", kind)
    result = _cli(cli_runner, "edit", tiny_pack, tmp_path / "out", image, "blue", "--json")
    assert result.exit_code == 0, result.stderr
    assert {json.loads(line)["role"] for line in result.stdout.splitlines()} >= {"edited", "sheet"}


@pytest.mark.parametrize("kind", BAD)
def test_edit_refuses_bombs_and_truncated_images(cli_runner, tiny_pack, tmp_path, kind):
    image, fragment = write_bad_image(tmp_path / "in", kind)
    result = _cli(cli_runner, "edit", tiny_pack, tmp_path / "out", image, "blue")
    assert_one_line_error(result, fragment, image.name)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("kind", BAD)
def test_interpolate_refuses_bombs_and_truncated_image_endpoints(cli_runner, tiny_pack, tmp_path, kind):
    image, fragment = write_bad_image(tmp_path / "in", kind)
    result = _cli(cli_runner, "interpolate", tiny_pack, tmp_path / "out", image, "blue", "--frames", "2")
    assert_one_line_error(result, fragment)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("kind", ["16bit", "gif"])
def test_interpolate_reads_odd_image_endpoints(cli_runner, tiny_pack, tmp_path, kind):
    image = write_odd_image(tmp_path / "in", kind)
    result = _cli(cli_runner, "interpolate", tiny_pack, tmp_path / "out", image, "blue", "--frames", "2")
    assert result.exit_code == 0, result.stderr
    assert len(written_files(tmp_path / "out")) == 2


def _symlink_loops(folder: Path) -> None:
    """A link to itself, a link to its own folder and a dangling link, all inside `folder`."""
    os.symlink("self-loop.png", folder / "self-loop.png")
    os.symlink(".", folder / "up", target_is_directory=True)
    os.symlink("missing.png", folder / "dangling.png")


def test_eval_fid_folders_with_odd_modes_bombs_truncated_files_and_symlink_loops(cli_runner, tiny_pack, tmp_path):
    from tiny_models import register_tiny_pack

    real = write_noise_images(tmp_path / "real", 3, seed=0, size=32)
    fake = write_noise_images(tmp_path / "fake", 3, seed=1, size=32)
    for kind in ODD:
        write_odd_image(real, kind)
    for kind in BAD:
        write_bad_image(fake, kind)
    _symlink_loops(real)
    _symlink_loops(fake)
    result = cli_runner(["eval-fid", "--real", real, "--fake", fake, "--features", "clip", "--pack",
                         register_tiny_pack(tiny_pack, "tiny"), "--device", "cpu", "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_real"] == 3 + len(ODD) - 1  # eval-fid reads png/jpg/jpeg/webp/bmp: the GIF is not counted
    assert report["n_fake"] == 3 and report["n_fake_skipped"] >= len(BAD)


def test_train_data_folder_with_odd_modes_bombs_truncated_files_and_symlink_loops(cli_runner, tiny_pack, tmp_path):
    data = write_noise_images(tmp_path / "data", 2, seed=0, size=32)
    for kind in ("cmyk", "16bit", "gray", "rgba"):  # --data reads jpg/png/webp
        write_odd_image(data / "odd", kind)
    for kind in BAD:
        write_bad_image(data / "bad", kind)
    _symlink_loops(data)
    os.symlink("..", data / "odd" / "parent", target_is_directory=True)  # a cycle two levels deep
    result = cli_runner(["train", "--generator", tiny_pack.generator, "--clip", tiny_pack.clip_config, "--data", data,
                         "--out", tmp_path / "run", "--steps", "1", "--device", "cpu", "--no-progress",
                         "--set", "lpips_net=none", "--set", "lambda_adv=0", "--set", "batch_size=2",
                         "--set", "mapper_hidden_dim=32", "--set", "num_sample_images=2"])
    assert result.exit_code == 0, result.output
    # The scan reads headers only: the bomb is skipped there; the truncated files pass it and are
    # replaced (and counted) when a batch decodes them (test_train_data.py::
    # test_an_image_corrupt_past_its_header_is_replaced_and_counted). No link is followed.
    assert f"Data: 8 images in {data} (1 unreadable files skipped)" in result.stderr


# ----------------------------------------------------------------------------------------------
# Prompts: 10,000 characters, non-UTF-8 stdin


def test_edit_with_a_10000_character_text_truncates_with_a_warning(cli_runner, tiny_pack, tmp_path):
    image = write_odd_image(tmp_path / "in", "gray")
    with pytest.warns(UserWarning, match="truncated"):
        result = _cli(cli_runner, "edit", tiny_pack, tmp_path / "out", image, LONG_PROMPT, "--json")
    assert result.exit_code == 0, result.stderr
    assert all(len(Path(json.loads(line)["path"]).name) < 120 for line in result.stdout.splitlines())


def test_interpolate_between_10000_character_prompts(cli_runner, tiny_pack, tmp_path):
    # A prompt that long is no valid file name (ENAMETOOLONG): it must still be read as a prompt.
    with pytest.warns(UserWarning, match="truncated"):
        result = _cli(cli_runner, "interpolate", tiny_pack, tmp_path / "out", LONG_PROMPT, "blue " * 2000,
                      "--frames", "2", "--json")
    assert result.exit_code == 0, result.stderr
    names = [Path(json.loads(line)["path"]).name for line in result.stdout.splitlines()]
    assert len(names) == 2 and all(len(name) < 120 for name in names)


def test_generate_with_non_utf8_stdin_is_one_line_error(cli_runner, tiny_pack, tmp_path):
    result = _cli(cli_runner, "generate", tiny_pack, tmp_path / "out", "-", input=b"a red circle\n\xff\xfeblue\n")
    assert_one_line_error(result, "stdin is not UTF-8 text (byte 13)")
    assert written_files(tmp_path / "out") == []


def test_generate_non_utf8_stdin_in_a_real_pipe(tiny_pack, tmp_path):
    from conftest import REPO_ROOT

    # Latin-1 "café" piped in from another program: the real process reads raw bytes from stdin.
    result = subprocess.run([sys.executable, "-m", "clip2gan_cli", "generate", "-", *map(str, tiny_pack.cli_args()),
                             "--out", str(tmp_path / "out")], input=b"caf\xe9\n", capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT, timeout=120)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, stderr
    assert [line for line in stderr.splitlines() if line.startswith("Error:")] == \
        ["Error: stdin is not UTF-8 text (byte 3)"]
    assert "Traceback" not in stderr and written_files(tmp_path / "out") == []


def test_eval_fid_prompts_file_that_is_not_utf8(cli_runner, tmp_path):
    real = write_noise_images(tmp_path / "real", 2, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe\n")
    result = cli_runner(["eval-fid", "--real", real, "--prompts", prompts, "-n", "2", "--features", "clip",
                         "--device", "cpu", "-q"])
    assert_one_line_error(result, str(prompts), "can't decode byte 0xff")


# ----------------------------------------------------------------------------------------------
# Registry with duplicate names


@pytest.mark.parametrize("kind", ["files", "packs"])
def test_download_weights_registry_with_duplicate_names(cli_runner, tmp_path, kind):
    body = 'url = "https://example.invalid/a.bin"\nformat = "safetensors"\nlicense = "x"\n'
    if kind == "files":
        text = f"schema = 1\n[files.a]\n{body}\n[files.a]\n{body}"
        fragment = "duplicate file name 'a' (first defined at line 2)"
    else:
        text = f'schema = 1\n[files.a]\n{body}\n[packs.p]\ngenerator = "a"\n\n[packs.p]\ngenerator = "a"\n'
        fragment = "duplicate pack name 'p' (first defined at line 7)"
    registry = tmp_path / "reg.toml"
    registry.write_text(text)
    for args in (["a"], ["--list"]):
        assert_one_line_error(cli_runner(["download-weights", *args, "--registry", registry]), str(registry), fragment)


def test_local_packs_file_with_a_duplicate_pack_fails_every_model_command(cli_runner, tmp_path, clip2gan_home):
    (clip2gan_home / "packs.toml").write_text('schema = 1\n[packs.x]\ngenerator = "/g"\n[packs.x]\ngenerator = "/g"\n')
    result = cli_runner(["generate", "a red circle", "--pack", "x", "--out", tmp_path / "out"])
    assert_one_line_error(result, "packs.toml:4", "duplicate pack name 'x'")


# ----------------------------------------------------------------------------------------------
# safetensors files whose header lies


def _safetensors(header: dict | bytes, data: bytes, header_length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + data


LYING_HEADERS = {
    # 8 bytes of data; the header claims more, points elsewhere, or cannot be believed at all
    "offsets-past-the-end": _safetensors({"w_plus": {"dtype": "F32", "shape": [1, 6, 32],
                                                     "data_offsets": [0, 768]}}, b"\0" * 8),
    "shape-larger-than-data": _safetensors({"w_plus": {"dtype": "F32", "shape": [1000, 1000],
                                                       "data_offsets": [0, 8]}}, b"\0" * 8),
    "header-length-2^62": _safetensors({"w_plus": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                       b"\0" * 8, header_length=1 << 62),
    "header-length-past-the-end": _safetensors(b'{"a":1}', b"", header_length=4096),
    "unknown-dtype": _safetensors({"w_plus": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlapping-tensors": _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "header-not-json": _safetensors(b"\xff\xfe not json", b""),
}


@pytest.fixture(params=sorted(LYING_HEADERS))
def lying_safetensors(request, tmp_path) -> Path:
    path = tmp_path / f"lying-{request.param}.safetensors"
    path.write_bytes(LYING_HEADERS[request.param])
    return path


def test_generate_refuses_a_lying_mapper_file(cli_runner, tiny_pack, tmp_path, lying_safetensors):
    result = cli_runner(["generate", "a red circle", "--mapper", lying_safetensors, "--generator", tiny_pack.generator,
                         "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result, lying_safetensors.name)
    assert written_files(tmp_path / "out") == []


def test_generate_refuses_a_lying_generator_file(cli_runner, tiny_pack, tmp_path, lying_safetensors):
    result = cli_runner(["generate", "a red circle", "--mapper", tiny_pack.mapper, "--generator", lying_safetensors,
                         "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result, lying_safetensors.name)
    assert written_files(tmp_path / "out") == []


def test_edit_and_interpolate_refuse_a_lying_latent_file(cli_runner, tiny_pack, tmp_path, lying_safetensors):
    image = write_odd_image(tmp_path / "in", "gray")
    result = _cli(cli_runner, "edit", tiny_pack, tmp_path / "out", image, "blue", "--latent", lying_safetensors)
    assert_one_line_error(result, lying_safetensors.name)
    result = _cli(cli_runner, "interpolate", tiny_pack, tmp_path / "out", lying_safetensors, "blue")
    assert_one_line_error(result, lying_safetensors.name)
    assert written_files(tmp_path / "out") == []


def test_train_refuses_a_lying_generator_file(cli_runner, tiny_pack, tmp_path, lying_safetensors):
    result = cli_runner(["train", "--generator", lying_safetensors, "--clip", tiny_pack.clip_config, "--data",
                         "synthetic", "--out", tmp_path / "run", "--steps", "1", "--device", "cpu",
                         "--set", "lpips_net=none"])
    assert_one_line_error(result, lying_safetensors.name)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Checkpoints of the wrong architecture, mappers for another generator


@pytest.mark.parametrize("wrong", ["discriminator", "mapper", "clip"])
@pytest.mark.parametrize("command", ["generate", "edit", "interpolate", "train"])
def test_checkpoint_of_the_wrong_architecture_as_generator(cli_runner, tiny_pack, tmp_path, wrong, command):
    wrong_file = {"discriminator": tiny_pack.discriminator, "mapper": tiny_pack.mapper,
                  "clip": tiny_pack.clip_weights}[wrong]
    models = ["--generator", wrong_file, "--clip", tiny_pack.clip_config]
    image = write_odd_image(tmp_path / "in", "gray")
    args = {"generate": ["generate", "a red circle", "--mapper", tiny_pack.mapper, *models],
            "edit": ["edit", image, "blue", "--mapper", tiny_pack.mapper, *models],
            "interpolate": ["interpolate", "red", "blue", "--mapper", tiny_pack.mapper, *models],
            "train": ["train", *models, "--data", "synthetic", "--steps", "1", "--device", "cpu",
                      "--set", "lpips_net=none"]}[command]
    result = cli_runner([*args, "--out", tmp_path / "out"])
    line = assert_one_line_error(result)
    assert wrong_file.name in line or "generator" in line.lower(), line
    assert not [f for f in written_files(tmp_path / "out") if not f.startswith(".")]  # (train: empty run dir)


@pytest.mark.parametrize("command", ["edit", "interpolate"])
def test_mapper_for_another_generator_in_edit_and_interpolate(cli_runner, tiny_pack, tmp_path, command):
    from clip2gan_cli.mapper import save_mapper

    other = make_tiny_mapper(make_tiny_generator(), hidden_dim=8)
    other.config.num_ws = 4  # as if trained for an 8 px generator
    other.layers[-1] = torch.nn.Linear(8, 4 * 32)
    save_mapper(other, tmp_path / "other.safetensors")
    image = write_odd_image(tmp_path / "in", "gray")
    inputs = [image, "blue"] if command == "edit" else ["red", "blue"]
    result = cli_runner([command, *inputs, "--mapper", tmp_path / "other.safetensors", "--generator",
                         tiny_pack.generator, "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result, "mapper for another generator")
    assert written_files(tmp_path / "out") == []


# ----------------------------------------------------------------------------------------------
# Devices and output folders for the commands whose own tests do not try them


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
@pytest.mark.parametrize("command", ["interpolate", "train", "eval-fid"])
def test_device_cuda_without_cuda(cli_runner, tiny_pack, tmp_path, command):
    real = write_noise_images(tmp_path / "real", 2, seed=0)
    args = {"interpolate": ["interpolate", "red", "blue", *tiny_pack.cli_args(), "--out", tmp_path / "out"],
            "train": ["train", "--generator", tiny_pack.generator, "--clip", tiny_pack.clip_config, "--data",
                      "synthetic", "--out", tmp_path / "out", "--steps", "1", "--set", "lpips_net=none"],
            "eval-fid": ["eval-fid", "--real", real, "--fake", real, "--features", "clip", "-q"]}[command]
    result = cli_runner([*args, "--device", "cuda"])
    assert_one_line_error(result, "CUDA is not available")
    assert not [f for f in written_files(tmp_path / "out") if not f.startswith(".")]


def test_interpolate_output_directory_not_writable(cli_runner, tiny_pack, tmp_path):
    (tmp_path / "file").write_text("x")
    result = _cli(cli_runner, "interpolate", tiny_pack, tmp_path / "file" / "out", "red", "blue")
    assert_one_line_error(result, "not writable")
