"""`clip2gan interpolate` end to end on the tiny random pack."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, written_files


def _run(cli_runner, tiny_pack, out, *args):
    return cli_runner(["interpolate", *args, *tiny_pack.cli_args(), "--out", out])


def test_two_prompts_frames_and_gif(cli_runner, tiny_pack, tmp_path):
    gif = tmp_path / "anim.gif"
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", "a red circle", "a blue square", "--frames", "5",
                  "--gif", gif, "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["role"] for r in records] == ["frame"] * 5 + ["gif"]
    assert [r["index"] for r in records[:5]] == list(range(5))
    assert len(written_files(tmp_path / "frames")) == 5
    with Image.open(gif) as animation:
        assert animation.n_frames == 5


def test_endpoints_are_the_latents_images(cli_runner, tiny_pack, tmp_path):
    assert cli_runner(["generate", "a red circle", "a blue square", "-n", "1", "--save-latents", "--no-grid",
                       *tiny_pack.cli_args(), "--out", tmp_path / "gen"]).exit_code == 0
    a, b = (tmp_path / "gen" / f"{slug}_s0.safetensors" for slug in ("a-red-circle", "a-blue-square"))
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", a, b, "--frames", "4", "--json")
    assert result.exit_code == 0, result.stderr
    frames = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    read = lambda path: np.asarray(Image.open(path)).astype(int)  # noqa: E731
    assert np.abs(read(frames[0]) - read(tmp_path / "gen" / "a-red-circle_s0_000.png")).max() <= 1
    assert np.abs(read(frames[-1]) - read(tmp_path / "gen" / "a-blue-square_s0_000.png")).max() <= 1
    assert not np.array_equal(read(frames[1]), read(frames[0]))


def test_prompt_endpoints_follow_the_mappers_prior(cli_runner, tmp_path):
    import dataclasses

    import torch

    from clip2gan_cli.mapper import load_mapper, save_mapper
    from clip2gan_cli.pipeline import prompt_latents, synthesize, text_latents
    from tiny_models import load_tiny_models, make_tiny_pack

    pack = make_tiny_pack(tmp_path / "pack")
    mapper = load_mapper(pack.mapper)
    mapper.config = dataclasses.replace(mapper.config, generation_prior="retrieval", retrieval_temperature=1e-4)
    mapper.set_image_feature_bank(torch.randn(5, mapper.clip_dim, generator=torch.Generator().manual_seed(0)))
    save_mapper(mapper, pack.mapper)

    def first_frame(out, *args):
        result = cli_runner(["interpolate", "a red circle", "a blue square", "--frames", "2", *args,
                             *pack.cli_args(), "--out", tmp_path / out, "--json"])
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(json.loads(result.stdout.splitlines()[0])["path"])).astype(int)

    models = load_tiny_models(pack)
    expected = {prior: synthesize(models.generator, latents)[0]
                for prior, latents in (("retrieval", prompt_latents(models.clip, models.mapper, ["a red circle"])),
                                       ("text", text_latents(models.clip, models.mapper, ["a red circle"])))}
    to_pixels = lambda image: ((image.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()  # noqa: E731
    retrieved, text = first_frame("retrieval"), first_frame("text", "--prior", "text")
    assert np.abs(retrieved - to_pixels(expected["retrieval"])).max() <= 1
    assert np.abs(text - to_pixels(expected["text"])).max() <= 1
    assert not np.array_equal(retrieved, text)
    # at a tiny temperature the retrieval endpoint is the mapper at the bank row closest to the prompt
    with torch.no_grad():
        text_feature = models.mapper.text_to_image_features(models.clip.encode_text(["a red circle"]))
        bank = models.mapper.image_feature_bank
        nearest = bank[(torch.nn.functional.normalize(text_feature) @ bank.T).argmax()]
        torch.testing.assert_close(prompt_latents(models.clip, models.mapper, ["a red circle"]),
                                   models.mapper(nearest[None]))


def test_image_endpoint_and_spherical(cli_runner, tiny_pack, tmp_path):

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(image)
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", image, "a green star", "--frames", "3", "--spherical")
    assert result.exit_code == 0, result.stderr
    assert len(written_files(tmp_path / "frames")) == 3


def test_mp4_without_an_encoder_fails_before_writing(cli_runner, tiny_pack, tmp_path, monkeypatch):
    from clip2gan_cli import imageio

    monkeypatch.setattr(imageio.video, "mp4_encoder", lambda: None)
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", "a", "b", "--mp4", tmp_path / "x.mp4")
    assert_one_line_error(result, "writing MP4 needs an encoder package", "pip install av")
    assert written_files(tmp_path) == []


@pytest.mark.parametrize("args, fragments", [
    (["a red circle", "blue", "--frames", "1"], ["--frames must be at least 2"]),
    (["", "blue"], ["empty prompt"]),
    (["missing.png", "blue"], ["image not found"]),
    (["a red circle", "blue", "--prior", "nearest"], ["unknown --prior 'nearest'"]),
    (["a red circle", "blue", "--precision", "fp64"], ["unknown --precision 'fp64'"]),
    (["a red circle", "blue", "--prior", "retrieval"], ["no image feature bank"]),
])
def test_bad_arguments(cli_runner, tiny_pack, tmp_path, args, fragments):
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", *args)
    assert_one_line_error(result, *fragments)
    assert written_files(tmp_path / "frames") == []


def test_latent_of_the_wrong_shape(cli_runner, tiny_pack, tmp_path):
    from clip2gan_cli.imageio import save_latent

    save_latent(tmp_path / "w.safetensors", torch.zeros(1, 18, 512))
    result = _run(cli_runner, tiny_pack, tmp_path / "frames", tmp_path / "w.safetensors", "blue")
    assert_one_line_error(result, "wrong for this generator")
    assert written_files(tmp_path / "frames") == []
