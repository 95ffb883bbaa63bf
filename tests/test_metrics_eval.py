"""metrics.evaluate, CLIP score and diversity on the tiny random pack (tests/tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.metrics import EvalConfig, clip_score, diversity, evaluate, read_prompts_file


def write_noise_images(folder: Path, count: int, seed: int, size: int = 16) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def write_prompts(path: Path, *prompts: str) -> Path:
    path.write_text("# prompts for the test\n" + "\n".join(prompts) + "\n\n")
    return path


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_is_100_times_the_clamped_cosine(tiny_pack):
    from tiny_models import load_tiny_models

    clip = load_tiny_models(tiny_pack).clip
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = clip_score.clip_scores(clip, "a red circle", images, batch_size=2)
    with torch.no_grad():
        cosine = (clip.encode_image(images) @ clip.encode_text(["a red circle"]).T).squeeze(1)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0))
    assert clip_score.mean_clip_score([scores[:2], scores[2:]]) == pytest.approx(float(scores.mean()))


def test_clip_score_of_uint8_images_equals_their_float_form(tiny_pack):
    from tiny_models import load_tiny_models

    clip = load_tiny_models(tiny_pack).clip
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(clip_score.clip_scores(clip, "a blue square", pixels),
                               clip_score.clip_scores(clip, "a blue square", pixels.float() / 127.5 - 1))


# --------------------------------------------------------------------------- diversity


def test_diversity_of_identical_images_is_zero_and_grows_with_difference():
    base = torch.zeros(4, 3, 16, 16)
    assert diversity.mean_pairwise_distance([base], diversity.l1_distance) == 0.0
    varied = base + torch.arange(4).view(4, 1, 1, 1) * 0.2
    spread = varied * 2
    assert 0 < diversity.mean_pairwise_distance([varied], diversity.l1_distance) \
        < diversity.mean_pairwise_distance([spread], diversity.l1_distance)


def test_diversity_averages_over_pairs_of_the_same_prompt_only():
    black, white = -torch.ones(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    # Within each prompt the images are equal: diversity 0 although the prompts differ wildly.
    assert diversity.mean_pairwise_distance([black, white], diversity.l1_distance) == 0.0
    assert diversity.mean_pairwise_distance([torch.cat([black[:1], white[:1]])], diversity.l1_distance) == 1.0


def test_diversity_falls_back_to_pixel_l1_when_lpips_weights_are_unavailable(monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    warnings = []
    images = [torch.rand(3, 3, 16, 16) * 2 - 1]
    result = diversity.diversity(images, warn=warnings.append)
    assert set(result) == {"diversity_l1", "diversity_note"}
    assert result["diversity_l1"] == pytest.approx(diversity.mean_pairwise_distance(images, diversity.l1_distance))
    assert "torchvision-alexnet" in warnings[0]


def random_alexnet_features(path: Path) -> Path:
    """A torchvision-AlexNet-shaped `features.*` state dict with random weights (no classifier: fast)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for index, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"features.{index}.weight"] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(shape[0])
    torch.save(state, path)
    return path


def test_diversity_uses_lpips_with_registry_backbone_weights(tmp_path, monkeypatch):
    backbone = random_alexnet_features(tmp_path / "alexnet.pth")
    model = diversity.load_lpips("cpu", backbone_path=backbone)
    monkeypatch.setattr(diversity, "load_lpips", lambda device, progress=True: model)
    images = [torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    result = diversity.diversity(images)
    assert set(result) == {"diversity_lpips"} and result["diversity_lpips"] > 0
    same = diversity.diversity([images[0][:1].expand(3, -1, -1, -1)])
    assert same["diversity_lpips"] == pytest.approx(0.0, abs=1e-6)


def test_lpips_refuses_a_backbone_that_is_not_alexnet(tmp_path):
    from clip2gan_cli.errors import CheckpointError

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="not a torchvision AlexNet"):
        diversity.load_lpips("cpu", backbone_path=wrong)


# --------------------------------------------------------------------------- evaluate


def test_prompts_file_skips_blank_lines_and_comments(tmp_path):
    assert read_prompts_file(write_prompts(tmp_path / "p.txt", "a red circle", "  a blue square ")) == \
        ["a red circle", "a blue square"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(UserInputError, match="holds no prompt"):
        read_prompts_file(tmp_path / "empty.txt")


def test_on_the_fly_generation_equals_evaluating_the_written_pngs(tmp_path, tiny_pack_name):
    """Generated images are quantised as saved PNGs, so both routes give the same FID."""
    from clip2gan_cli import imageio, pipeline
    from clip2gan_cli.packs import load_pack

    real = write_noise_images(tmp_path / "real", 6, seed=0)
    prompts = write_prompts(tmp_path / "prompts.txt", "a red circle", "a blue square")
    common = dict(real=real, pack=tiny_pack_name, features="clip", device="cpu", progress=False)
    on_the_fly = evaluate(EvalConfig(prompts=prompts, images_per_prompt=3, **common))

    pack = load_pack(tiny_pack_name, device="cpu")
    result = pipeline.generate(pack.generator, pack.clip, pack.mapper, ["a red circle", "a blue square"], n=3, seed=0)
    fake = tmp_path / "fake"
    fake.mkdir()
    for index, image in enumerate(result.images):
        imageio.save_png(fake / f"{index:03d}.png", image)
    from_files = evaluate(EvalConfig(fake=fake, **common))

    assert on_the_fly["n_fake"] == from_files["n_fake"] == 6
    assert on_the_fly["fid"] == pytest.approx(from_files["fid"], rel=1e-5, abs=1e-7)
    assert on_the_fly["n_prompts"] == 2 and on_the_fly["images_per_prompt"] == 3
    assert on_the_fly["generation_precision"] == "fp32"  # auto on the CPU
    assert 0 <= on_the_fly["clip_score"] <= 100
    assert "diversity_lpips" in on_the_fly or "diversity_l1" in on_the_fly


def test_fd_clip_of_a_folder_against_itself_is_zero(tmp_path, tiny_pack_name):
    real = write_noise_images(tmp_path / "real", 5, seed=0)
    report = evaluate(EvalConfig(real=real, fake=real, pack=tiny_pack_name, features="clip", device="cpu",
                                 progress=False))
    assert abs(report["fid"]) < 1e-5
    assert report["n_real"] == report["n_fake"] == 5


# The library names EvalConfig's fields; the CLI prints their flags (--fake, -n, --features, --batch-size),
# as tests/test_eval_fid_cli.py asserts.
@pytest.mark.parametrize("changes, message", [
    (dict(fake=None), "either `fake` DIR or `prompts`"),  # CLI: either --fake DIR or --prompts
    (dict(prompts=Path("p.txt")), "not both"),
    (dict(fake=None, prompts=Path("p.txt")), "needs `images_per_prompt`"),  # CLI: needs -n
    (dict(images_per_prompt=2), "only applies with `prompts`"),  # CLI: only applies with --prompts
    (dict(features="vgg"), "unknown `features`"),  # CLI: unknown --features
    (dict(precision="fp8"), "unknown `precision` 'fp8'"),  # CLI: unknown --precision
    (dict(batch_size=0), "`batch_size` must be at least 1"),  # CLI: --batch-size must be at least 1
    (dict(fake=None, prompts=Path("p.txt"), images_per_prompt=0),
     "`images_per_prompt` must be at least 1"),  # CLI: -n must be at least 1
    (dict(features="clip", inception_weights=Path("x.pth")),
     "only applies with `features` inception"),  # CLI: only applies with --features inception
])
def test_contradictory_options_are_user_errors(tmp_path, changes, message):
    config = EvalConfig(real=tmp_path, fake=tmp_path, progress=False)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(UserInputError, match=message):
        evaluate(config)
