"""inputs: what a command starts from (image files, latent files, interpolation endpoints) as W+ codes."""
from __future__ import annotations

import pytest
import torch

from clip2gan_cli import imageio, inputs, pipeline
from clip2gan_cli.errors import ImageError
from tiny_models import TINY_RESOLUTION


def _image_file(models, path):
    images = pipeline.generate(models.generator, models.clip, models.mapper, ["a red circle"], n=1, seed=1).images
    imageio.save_png(path, images[:1])
    return path


def test_a_prompt_endpoint_is_the_prompt_latent_of_the_mappers_prior(tiny_models):
    models = tiny_models
    w = inputs.endpoint_latent("a blue square", models, seed=3)
    assert w.shape == (1, models.generator.num_ws, models.generator.w_dim)
    torch.testing.assert_close(w, pipeline.prompt_latents(models.clip, models.mapper, ["a blue square"], seed=3),
                               rtol=0, atol=0)


def test_an_image_endpoint_is_its_inversion_and_a_latent_endpoint_its_first_code(tiny_models, tmp_path):
    models = tiny_models
    path = _image_file(models, tmp_path / "circle.png")
    assert inputs.is_image_endpoint(str(path)) and inputs.needs_image_encoder("a prompt", str(path))
    image = imageio.load_image_tensor(path, TINY_RESOLUTION)
    torch.testing.assert_close(inputs.endpoint_latent(str(path), models),
                               pipeline.invert(models.clip, models.mapper, image), rtol=0, atol=0)
    codes = torch.randn(2, models.generator.num_ws, models.generator.w_dim)
    latent = imageio.save_latent(tmp_path / "codes.safetensors", codes)
    assert not inputs.is_image_endpoint(str(latent))
    torch.testing.assert_close(inputs.endpoint_latent(str(latent), models), codes[:1], rtol=0, atol=0)
    assert inputs.load_start_latent(None, models) is None


def test_a_missing_image_endpoint_is_an_image_error_and_a_long_prompt_is_no_file(tiny_models, tmp_path):
    with pytest.raises(ImageError, match="image not found"):
        inputs.endpoint_latent(str(tmp_path / "missing.png"), tiny_models)
    long_prompt = "a red circle " * 40  # longer than a file name may be: ENAMETOOLONG, not a crash
    assert not inputs.is_file(long_prompt) and not inputs.needs_image_encoder(long_prompt, "b")


def test_face_alignment_defaults_to_the_pack_and_names_say_what_the_endpoints_were(tiny_models, tmp_path):
    assert inputs.face_alignment(tiny_models) is tiny_models.is_face_pack
    assert inputs.face_alignment(tiny_models, True) is True
    path = _image_file(tiny_models, tmp_path / "circle.png")
    assert inputs.interpolation_name(str(path), "a blue square") == "interp_circle_to_a-blue-square"


def test_refine_lpips_is_none_without_steps_or_without_cached_weights(tmp_path, monkeypatch):
    from clip2gan_cli.refine import refine_lpips

    monkeypatch.setenv("CLIP2GAN_HOME", str(tmp_path))
    notes = []
    assert refine_lpips(0, log=notes.append) is None and notes == []
    assert refine_lpips(3, log=notes.append) is None
    assert len(notes) == 1 and "L2 only" in notes[0]
