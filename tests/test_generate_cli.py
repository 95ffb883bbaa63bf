"""`clip2gan generate` end to end on the tiny random pack (in-process CLI runner)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, written_files
from tiny_models import make_tiny_generator, make_tiny_mapper, make_tiny_pack, register_tiny_pack


def _generate(cli_runner, tiny_pack, out, *args, **kwargs):
    return cli_runner(["generate", *args, *tiny_pack.cli_args(), "--out", out], **kwargs)


def test_writes_n_images_per_prompt_plus_grids_and_prints_paths(cli_runner, tiny_pack, tmp_path):
    result = _generate(cli_runner, tiny_pack, tmp_path, "a red circle", "a blue square", "-n", "3")
    assert result.exit_code == 0, result.stderr
    files = written_files(tmp_path)
    assert files == sorted([f"a-red-circle_s0_{i:03d}.png" for i in range(3)] + ["a-red-circle_s0_grid.png"]
                           + [f"a-blue-square_s0_{i:03d}.png" for i in range(3)] + ["a-blue-square_s0_grid.png"])
    assert sorted(result.stdout.split()) == sorted(str(tmp_path / f) for f in files)
    assert "Wrote 8 file(s)" in result.stderr
    with Image.open(tmp_path / "a-red-circle_s0_000.png") as image:
        assert image.size == (16, 16) and image.mode == "RGB"


def test_json_lines_on_stdout_and_messages_on_stderr(cli_runner, tiny_pack, tmp_path):
    result = _generate(cli_runner, tiny_pack, tmp_path, "a red circle", "-n", "2", "--seed", "4", "--json",
                       "--no-grid")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["seed"], r["index"], r["role"]) for r in records] == \
        [("a red circle", 4, 0, "image"), ("a red circle", 4, 1, "image")]
    assert all((tmp_path / r["path"]).is_file() for r in records)
    assert "Wrote" in result.stderr and "Wrote" not in result.stdout


def test_same_arguments_give_identical_files_other_seed_differs(cli_runner, tiny_pack, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert _generate(cli_runner, tiny_pack, tmp_path / name, "a red circle", "-n", "2", "--seed", seed,
                         "--no-grid").exit_code == 0
    read = lambda d, s, i: (tmp_path / d / f"a-red-circle_s{s}_{i:03d}.png").read_bytes()  # noqa: E731
    assert read("a", 1, 0) == read("b", 1, 0) and read("a", 1, 1) == read("b", 1, 1)
    assert read("a", 1, 0) != read("c", 2, 0)
    assert read("a", 1, 0) != read("a", 1, 1)  # distinct images for one prompt


def test_prompts_from_stdin(cli_runner, tiny_pack, tmp_path):
    result = _generate(cli_runner, tiny_pack, tmp_path, "-", "-n", "1", "--json",
                       input="a red circle\n\na green star\n")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["a red circle", "a green star"]


def test_png_metadata_names_prompt_seed_pack_truncation_hashes_version(cli_runner, tiny_pack, tmp_path):
    from clip2gan_cli import __version__
    from clip2gan_cli.imageio import read_png_metadata

    assert _generate(cli_runner, tiny_pack, tmp_path, "a red circle", "-n", "1", "--seed", "3",
                     "--truncation", "0.7").exit_code == 0
    metadata = read_png_metadata(tmp_path / "a-red-circle_s3_000.png")
    assert metadata["prompt"] == "a red circle" and metadata["seed"] == "3" and metadata["index"] == "0"
    assert metadata["pack"] == "custom" and metadata["truncation"] == "0.7"
    assert metadata["clip2gan_version"] == __version__
    hashes = json.loads(metadata["model_hashes"])
    assert set(hashes) == {"generator", "mapper", "clip_config", "clip_weights"}
    assert all(len(value) == 16 for value in hashes.values())


def test_save_latents_and_jpg_format(cli_runner, tiny_pack, tmp_path):
    from clip2gan_cli.imageio import load_latent

    result = _generate(cli_runner, tiny_pack, tmp_path, "a red circle", "-n", "2", "--save-latents",
                       "--format", "jpg", "--json")
    assert result.exit_code == 0, result.stderr
    roles = [json.loads(line)["role"] for line in result.stdout.splitlines()]
    assert roles == ["image", "image", "grid", "latents"]
    assert load_latent(tmp_path / "a-red-circle_s0.safetensors", 6, 32).shape == (2, 6, 32)
    with Image.open(tmp_path / "a-red-circle_s0_000.jpg") as image:
        assert image.format == "JPEG"


def test_registered_local_pack_by_name(cli_runner, tiny_pack, tmp_path):
    register_tiny_pack(tiny_pack, "tiny")
    result = cli_runner(["generate", "a red circle", "-n", "1", "--pack", "tiny", "--out", tmp_path, "--json"])
    assert result.exit_code == 0, result.stderr
    from clip2gan_cli.imageio import read_png_metadata

    assert read_png_metadata(json.loads(result.stdout)["path"])["pack"] == "tiny"


def test_a_mappers_retrieval_prior_is_the_default_and_prior_text_overrides_it(cli_runner, tmp_path):
    import dataclasses

    import numpy as np

    from clip2gan_cli.imageio import read_png_metadata
    from clip2gan_cli.mapper import load_mapper, save_mapper

    pack = make_tiny_pack(tmp_path / "pack")
    mapper = load_mapper(pack.mapper)
    mapper.config = dataclasses.replace(mapper.config, generation_prior="retrieval")
    mapper.set_image_feature_bank(torch.randn(8, mapper.clip_dim, generator=torch.Generator().manual_seed(0)))
    save_mapper(mapper, pack.mapper)

    def run(out, *args):
        result = cli_runner(["generate", "a red circle", "-n", "2", "--no-grid", *args, *pack.cli_args(),
                             "--out", tmp_path / out, "--json"])
        assert result.exit_code == 0, result.stderr
        path = json.loads(result.stdout.splitlines()[0])["path"]
        return read_png_metadata(path)["prior"], np.asarray(Image.open(path))

    (default_prior, default_pixels), (text_prior, text_pixels) = run("default"), run("text", "--prior", "text")
    assert (default_prior, text_prior) == ("retrieval", "text")
    assert not np.array_equal(default_pixels, text_pixels)


# --- bad input: one line, exit 1, nothing written ---
@pytest.mark.parametrize("args, fragments", [
    (["", "-n", "1"], ["empty prompt"]),
    (["a red circle", "-n", "0"], ["-n and --batch-size must be at least 1"]),
    (["a red circle", "--format", "gif"], ["unknown --format 'gif'"]),
    (["a red circle", "--prior", "nearest"], ["unknown --prior 'nearest'", "text or retrieval"]),
    (["a red circle", "--precision", "fp8"], ["unknown --precision 'fp8'", "auto | fp32 | fp16 | bf16"]),
    (["a red circle", "--prior", "retrieval"], ["no image feature bank", "--prior text"]),
])
def test_bad_arguments(cli_runner, tiny_pack, tmp_path, args, fragments):
    result = _generate(cli_runner, tiny_pack, tmp_path / "out", *args)
    assert_one_line_error(result, *fragments)
    assert written_files(tmp_path / "out") == []


def test_output_directory_not_writable(cli_runner, tiny_pack, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _generate(cli_runner, tiny_pack, blocker / "out", "a red circle")
    assert_one_line_error(result, "not writable")


def test_pack_without_a_mapper_says_how_to_train_one(cli_runner, tmp_path):
    register_tiny_pack(make_tiny_pack(tmp_path / "pack", with_mapper=False), "untrained")
    result = cli_runner(["generate", "a red circle", "--pack", "untrained", "--out", tmp_path / "out"])
    assert_one_line_error(result, "no trained mapper",
                          "clip2gan train --pack untrained --data DIR_OR_synthetic --out runs/untrained "
                          "--export-pack untrained")
    assert written_files(tmp_path / "out") == []


def test_registry_pack_without_mapper(cli_runner, tmp_path):
    result = cli_runner(["generate", "a face", "--pack", "ffhq-1024", "--out", tmp_path / "out"])
    assert_one_line_error(result, "pack 'ffhq-1024' has no trained mapper", "clip2gan train --pack ffhq-1024")


def test_unknown_pack_lists_known_packs(cli_runner, tmp_path):
    result = cli_runner(["generate", "a red circle", "--pack", "nope", "--out", tmp_path / "out"])
    assert_one_line_error(result, "unknown pack 'nope'", "known packs:", "shapes")


def test_mapper_for_another_generator(cli_runner, tiny_pack, tmp_path):
    from clip2gan_cli.mapper import save_mapper

    other = make_tiny_mapper(make_tiny_generator(), hidden_dim=8)
    other.config.num_ws = 4  # pretend it was trained for a 8 px generator
    other.layers[-1] = torch.nn.Linear(8, 4 * 32)
    save_mapper(other, tmp_path / "other.safetensors")
    result = cli_runner(["generate", "a red circle", "--mapper", tmp_path / "other.safetensors", "--generator",
                         tiny_pack.generator, "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result, "mapper for another generator")
    assert written_files(tmp_path / "out") == []


def test_pack_and_explicit_models_together_or_incomplete(cli_runner, tiny_pack, tmp_path):
    result = cli_runner(["generate", "x", "--pack", "shapes", "--mapper", tiny_pack.mapper, "--out", tmp_path])
    assert_one_line_error(result, "either --pack or --mapper/--generator/--clip")
    result = cli_runner(["generate", "x", "--mapper", tiny_pack.mapper, "--out", tmp_path])
    assert_one_line_error(result, "--generator, --clip missing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_device_cuda_without_cuda(cli_runner, tiny_pack, tmp_path):
    result = _generate(cli_runner, tiny_pack, tmp_path / "out", "a red circle", "--device", "cuda")
    assert_one_line_error(result, "CUDA is not available")
    assert written_files(tmp_path / "out") == []


# --- pack resolution ---
@pytest.fixture
def builtin_shapes(tiny_pack, tmp_path, monkeypatch):
    """The tiny pack installed as the builtin `shapes` pack (packs.loading.PACKS_DIR pointed at a copy)."""
    import shutil

    from clip2gan_cli.packs import loading

    shutil.copytree(tiny_pack.directory, tmp_path / "packs" / "shapes")
    monkeypatch.setattr(loading, "PACKS_DIR", tmp_path / "packs")
    return tmp_path / "packs" / "shapes"


def test_default_pack_is_the_builtin_shapes_pack(cli_runner, builtin_shapes, tmp_path):
    from clip2gan_cli.imageio import read_png_metadata

    result = cli_runner(["generate", "a red circle", "-n", "1", "--out", tmp_path / "out", "--json"])
    assert result.exit_code == 0, result.stderr
    assert read_png_metadata(json.loads(result.stdout)["path"])["pack"] == "shapes"


def test_builtin_pack_loads_discriminator_lazily(builtin_shapes):
    from clip2gan_cli.packs import load_pack

    pack = load_pack(device="cpu")
    assert pack.name == "shapes" and pack.mapper is not None and not pack.is_face_pack
    discriminator = pack.load_discriminator()
    assert discriminator(torch.zeros(1, 3, 16, 16)).shape == (1, 1)
    assert pack.load_identity() is None


def test_builtin_pack_with_missing_files_names_them(cli_runner, builtin_shapes, tmp_path):
    (builtin_shapes / "generator.safetensors").unlink()
    result = cli_runner(["generate", "a red circle", "--out", tmp_path / "out"])
    assert_one_line_error(result, "builtin pack 'shapes' is missing generator.safetensors")


def test_very_long_prompt_is_truncated_with_a_warning(cli_runner, tiny_pack, tmp_path):
    prompt = "a red circle " * 800  # ~10,000 characters
    with pytest.warns(UserWarning, match="truncated"):
        result = _generate(cli_runner, tiny_pack, tmp_path, prompt.strip(), "-n", "1", "--json", "--no-grid")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["path"].rsplit("/", 1)[1]) < 80


def test_face_pack_loads_its_identity_net_from_the_registered_file(tiny_pack, tmp_path):
    from facenet_pytorch import InceptionResnetV1

    from clip2gan_cli.packs import load_pack

    reference = InceptionResnetV1(pretrained=None, classify=False)
    state = {**reference.state_dict(), "logits.weight": torch.zeros(3, 512), "logits.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "vggface2.pt")  # the release file carries a classifier head too
    register_tiny_pack(tiny_pack, "tinyface", identity=str(tmp_path / "vggface2.pt"))
    pack = load_pack("tinyface", device="cpu")
    assert pack.is_face_pack
    identity = pack.load_identity()
    assert not identity.training and not any(p.requires_grad for p in identity.parameters())
    torch.testing.assert_close(identity.state_dict()["last_linear.weight"], reference.state_dict()["last_linear.weight"])
