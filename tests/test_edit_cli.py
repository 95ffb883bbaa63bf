"""`clip2gan edit` end to end on the tiny random pack."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, written_files
from tiny_models import make_tiny_pack, register_tiny_pack


@pytest.fixture
def input_image(tmp_path):
    """A 40x32 photo-like input (resized and centre-cropped to the 16 px generator)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "input.png"
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def _edit(cli_runner, tiny_pack, out, *args, **kwargs):
    return cli_runner(["edit", *args, *tiny_pack.cli_args(), "--out", out], **kwargs)


def test_writes_edited_reconstruction_sheet_and_latent(cli_runner, tiny_pack, tmp_path, input_image):
    out = tmp_path / "out"
    result = _edit(cli_runner, tiny_pack, out, input_image, "blue", "--beta", "1.5", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["role"] for r in records] == ["edited", "reconstruction", "sheet", "latent"]
    assert all(json.loads(line)["path"].startswith(str(out)) for line in result.stdout.splitlines())
    with Image.open(records[0]["path"]) as edited, Image.open(records[2]["path"]) as sheet:
        assert edited.size == (16, 16)
        assert sheet.size == (3 * 18 + 2, 20)  # input | reconstruction | edit, 2 px padding
    edited_pixels = np.asarray(Image.open(records[0]["path"]))
    reconstruction_pixels = np.asarray(Image.open(records[1]["path"]))
    assert not np.array_equal(edited_pixels, reconstruction_pixels)


def test_several_edits_with_neutral_text(cli_runner, tiny_pack, tmp_path, input_image):
    from clip2gan_cli.imageio import read_png_metadata

    result = _edit(cli_runner, tiny_pack, tmp_path / "out", input_image, "--edit", "blue:1", "--edit",
                   "large circle:-0.5", "--neutral", "a circle", "--json")
    assert result.exit_code == 0, result.stderr
    edited = json.loads(result.stdout.splitlines()[0])["path"]
    metadata = read_png_metadata(edited)
    assert metadata["edits"] == "blue:1+large circle:-0.5-vs-a circle" and metadata["neutral"] == "a circle"
    assert metadata["source"] == "input.png"


def test_neutral_changes_the_result(cli_runner, tiny_pack, tmp_path, input_image):
    plain = _edit(cli_runner, tiny_pack, tmp_path / "plain", input_image, "blue", "--json")
    neutral = _edit(cli_runner, tiny_pack, tmp_path / "neutral", input_image, "blue", "--neutral", "a circle",
                    "--json")
    read = lambda r: np.asarray(Image.open(json.loads(r.stdout.splitlines()[0])["path"]))  # noqa: E731
    assert not np.array_equal(read(plain), read(neutral))


def test_the_mappers_edit_defaults_apply_and_flags_override_them(cli_runner, tmp_path, input_image):
    import dataclasses

    from clip2gan_cli.imageio import load_latent, read_png_metadata
    from clip2gan_cli.mapper import load_mapper, save_mapper

    pack = make_tiny_pack(tmp_path / "pack")
    mapper = load_mapper(pack.mapper)
    mapper.config = dataclasses.replace(mapper.config, edit_direction="image", edit_layers=(2, None), edit_beta=0.5)
    save_mapper(mapper, pack.mapper)

    def run(out, *args):
        result = cli_runner(["edit", input_image, "blue", *args, *pack.cli_args(), "--out", tmp_path / out, "--json"])
        assert result.exit_code == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        edited = next(r["path"] for r in records if r["role"] == "edited")
        latent = next(r["path"] for r in records if r["role"] == "latent")
        return read_png_metadata(edited), load_latent(latent, 6, 32)

    metadata, w_default = run("default")
    assert (metadata["direction"], metadata["layers"], metadata["edits"]) == ("image", "2:", "blue:0.5")
    metadata, w_flags = run("flags", "--direction", "text", "--layers", "0:6", "--beta", "2")
    assert (metadata["direction"], metadata["layers"], metadata["edits"]) == ("text", "0:6", "blue:2")
    assert not torch.allclose(w_default, w_flags)


def test_auto_neutral_names_what_it_inferred_and_none_turns_a_mappers_default_off(cli_runner, tmp_path, input_image):
    import dataclasses

    from clip2gan_cli.imageio import read_png_metadata
    from clip2gan_cli.mapper import load_mapper, save_mapper

    pack = make_tiny_pack(tmp_path / "pack")

    def run(out, *args):
        result = cli_runner(["edit", input_image, "blue", *args, *pack.cli_args(), "--out", tmp_path / out, "--json"])
        assert result.exit_code == 0, result.stderr
        edited = json.loads(result.stdout.splitlines()[0])["path"]
        return read_png_metadata(edited), result.stderr

    metadata, stderr = run("auto", "--neutral", "auto", "--contrast", "red,green,blue")
    inferred = metadata["neutral"]
    assert inferred in ("red", "green", "blue") and metadata["edits"] == f"blue:2-vs-{inferred}"
    assert "Neutral for 'blue': " in stderr and (inferred == "blue" or f"'{inferred}'" in stderr)
    mapper = load_mapper(pack.mapper)
    mapper.config = dataclasses.replace(mapper.config, edit_neutral="auto",
                                        edit_contrast_sets=[["red", "green", "blue"]])
    save_mapper(mapper, pack.mapper)
    assert run("default")[0]["neutral"] == inferred  # the mapper's default: auto over its own sets
    metadata, stderr = run("none", "--neutral", "none")
    assert (metadata["neutral"], metadata["edits"]) == ("", "blue:2") and "Neutral for" not in stderr


def test_from_a_saved_latent_and_with_refinement(cli_runner, tiny_pack, tmp_path, input_image):
    generated = cli_runner(["generate", "a red circle", "-n", "1", "--save-latents", *tiny_pack.cli_args(),
                            "--out", tmp_path / "gen"])
    assert generated.exit_code == 0, generated.stderr
    latent = tmp_path / "gen" / "a-red-circle_s0.safetensors"
    image = tmp_path / "gen" / "a-red-circle_s0_000.png"
    result = _edit(cli_runner, tiny_pack, tmp_path / "out", image, "blue", "--latent", latent, "--json")
    assert result.exit_code == 0, result.stderr
    reconstruction = json.loads(result.stdout.splitlines()[1])["path"]
    # Starting from the generating latent, the reconstruction is the generated image itself.
    assert np.abs(np.asarray(Image.open(reconstruction)).astype(int)
                  - np.asarray(Image.open(image)).astype(int)).max() <= 1
    refined = _edit(cli_runner, tiny_pack, tmp_path / "refined", image, "blue", "--refine-steps", "2")
    assert refined.exit_code == 0, refined.stderr
    assert "L2 only" in refined.stderr


def test_align_without_a_face_says_use_no_align(cli_runner, tiny_pack, tmp_path):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (20, 120, 220)).save(flat)
    result = _edit(cli_runner, tiny_pack, tmp_path / "out", flat, "blue", "--align")
    assert_one_line_error(result, "no face found", "use --no-align")
    assert written_files(tmp_path / "out") == []


def _bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    return {"missing.png": "image not found", "empty.png": "empty (0 bytes)", "text.png": "not an image",
            "tiny.png": "at least 16 px"}


def test_bad_images(cli_runner, tiny_pack, tmp_path):
    for name, fragment in _bad_images(tmp_path).items():
        result = _edit(cli_runner, tiny_pack, tmp_path / "out", tmp_path / name, "blue")
        assert_one_line_error(result, fragment)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("args, fragments", [
    (["blue", "--beta", "strong"], ["--beta must be a number, got 'strong'"]),
    (["--edit", "blue"], ["malformed --edit 'blue'"]),
    (["--edit", "blue:lots"], ["beta in --edit 'blue:lots' must be a number"]),
    (["", "--beta", "1"], ["empty prompt"]),
    ([], ["no edit given"]),
    (["blue", "--refine-steps", "-1"], ["--refine-steps must be >= 0"]),
    (["blue", "--direction", "pixels"], ["unknown --direction 'pixels'", "text or image"]),
    (["blue", "--precision", "half"], ["unknown --precision 'half'"]),
    (["blue", "--layers", "2"], ["--layers must be START:STOP"]),
    (["blue", "--layers", "4:2"], ["selects no rows", "6 W+ rows"]),
    (["blue", "--layers", "9:"], ["selects no rows"]),
    (["blue", "--neutral", "auto"], ["--neutral auto needs contrast sets", "--contrast"]),
    (["blue", "--neutral", "red", "--contrast", "red,blue"], ["--contrast is used only with --neutral auto"]),
    (["blue", "--contrast", "red,blue"], ["--contrast is used only with --neutral auto"]),
    (["blue", "--neutral", "auto", "--contrast", "red"], ["two distinct"]),
])
def test_bad_edit_arguments(cli_runner, tiny_pack, tmp_path, input_image, args, fragments):
    result = _edit(cli_runner, tiny_pack, tmp_path / "out", input_image, *args)
    assert_one_line_error(result, *fragments)
    assert written_files(tmp_path / "out") == []


def test_latent_of_the_wrong_shape(cli_runner, tiny_pack, tmp_path, input_image):
    from clip2gan_cli.imageio import save_latent

    save_latent(tmp_path / "w.safetensors", torch.zeros(1, 18, 512))
    result = _edit(cli_runner, tiny_pack, tmp_path / "out", input_image, "blue", "--latent", tmp_path / "w.safetensors")
    assert_one_line_error(result, "wrong for this generator", "[N, 6, 32]")
    assert written_files(tmp_path / "out") == []


def test_output_directory_not_writable(cli_runner, tiny_pack, tmp_path, input_image):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(_edit(cli_runner, tiny_pack, tmp_path / "file" / "out", input_image, "blue"),
                          "not writable")


def test_pack_without_mapper(cli_runner, tmp_path, input_image):
    register_tiny_pack(make_tiny_pack(tmp_path / "pack", with_mapper=False), "bare")
    result = cli_runner(["edit", input_image, "blue", "--pack", "bare", "--out", tmp_path / "out"])
    assert_one_line_error(result, "no trained mapper", "clip2gan train --pack bare")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_device_cuda_without_cuda(cli_runner, tiny_pack, tmp_path, input_image):
    result = _edit(cli_runner, tiny_pack, tmp_path / "out", input_image, "blue", "--device", "cuda")
    assert_one_line_error(result, "CUDA is not available")


def test_face_packs_align_by_default_and_no_align_skips_it(cli_runner, tiny_pack, tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), tmp_path / "id.pt")
    register_tiny_pack(tiny_pack, "tinyface", identity=str(tmp_path / "id.pt"))
    flat = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (20, 120, 220)).save(flat)
    result = cli_runner(["edit", flat, "blue", "--pack", "tinyface", "--out", tmp_path / "out"])
    assert_one_line_error(result, "no face found", "use --no-align")
    result = cli_runner(["edit", flat, "blue", "--pack", "tinyface", "--no-align", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.stderr
