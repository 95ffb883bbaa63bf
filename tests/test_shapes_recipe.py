"""The shapes recipe as package code: its mapper.toml is the mapper stage it replaced, the build passes
only the flags a user gave, and the GAN stages use the library's EMA and w_avg estimate without
changing a bit of what they computed before."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clip2gan_cli.recipes.shapes import build, gan
from clip2gan_cli.train.config import load_config, parse_override

# The mapper stage's settings as the build passed them before mapper.toml (`--device cpu` and one `--set` each).
MAPPER_STAGE_FLAGS = ["device=cpu", "lpips_backbone=random", "batch_size=16", "lr=0.0005", "mapper_hidden_dim=256",
                      "synthetic_truncation=1.0", "ema_decay=0.995", "lambda_adv=0.0", "div_std=0.6",
                      "lambda_div=0.1", "max_grad_norm=1.0", "lr_schedule=cosine", "checkpoint_every=100",
                      "sample_every=200", "log_every=20", "num_sample_images=4",
                      'sample_prompts=["a red circle", "a blue square", "a green triangle", "a yellow cross"]']


def test_mapper_toml_resolves_to_the_config_the_set_flags_gave():
    from_flags = load_config(None, dict(parse_override(text) for text in MAPPER_STAGE_FLAGS))
    from_toml = load_config(build.MAPPER_CONFIG)
    assert from_toml == from_flags
    assert from_toml.to_toml() == from_flags.to_toml()


def _build_args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return build.parse_args(["--workdir", str(tmp_path / "work"), "--pack-dir", str(tmp_path / "pack"), *argv])


def test_mapper_stage_runs_train_with_the_toml_and_only_the_flags_given(tmp_path):
    run_dir = tmp_path / "work" / "mapper_run"
    command = build.mapper_train_command(_build_args(tmp_path), run_dir, "synthetic")
    assert command[command.index("--config") + 1] == str(build.MAPPER_CONFIG)
    assert "--set" not in command
    assert command[command.index("--generator") + 1] == str(tmp_path / "pack" / "generator.safetensors")
    assert command[-2:] == ["--steps", "4100"]
    command = build.mapper_train_command(_build_args(tmp_path, "--mapper-lr", "0.001", "--mapper-hidden", "64"),
                                         run_dir, "synthetic")
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert sets == ["lr=0.001", "mapper_hidden_dim=64"]
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text("")
    resumed = build.mapper_train_command(_build_args(tmp_path), run_dir, "synthetic")
    assert resumed[-4:] == ["--resume", str(run_dir), "--steps", "4100"] and "--config" not in resumed


def _tiny_trainer(tmp_path: Path) -> gan.ShapesGanTrainer:
    recipe = gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8}, d_channels={4: 8, 8: 8, 16: 8, 32: 8})
    return gan.ShapesGanTrainer(tmp_path, recipe, log=lambda m: None)


def test_gan_ema_is_bit_for_bit_the_lerp_it_replaced(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    with torch.no_grad():
        for param in trainer.G.parameters():
            param.add_(torch.randn_like(param))
    beta = 0.5 ** (trainer.recipe.batch / trainer.recipe.ema_half_life_images)
    expected = [param.lerp(ema, beta) for ema, param in zip(trainer.G_ema.parameters(), trainer.G.parameters())]
    trainer._update_ema()
    assert all(torch.equal(got, want) for got, want in zip(trainer.G_ema.parameters(), expected))


def test_gan_w_avg_is_bit_for_bit_the_estimate_it_replaced(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    with torch.no_grad():
        z = torch.randn(4096, trainer.recipe.z_dim, generator=torch.Generator().manual_seed(99))
        expected = trainer.G.mapping(z)[:, 0].mean(0)
    trainer._set_w_avg(trainer.G)
    assert torch.equal(trainer.G.mapping.w_avg, expected) and not trainer.G.mapping.w_avg.requires_grad
