"""How a run runs its frozen G and its critic: `checkpoint_blocks` (activation checkpointing) and
`precision` (NVIDIA's mixed precision in G's and D's marked blocks; the mapper, its optimiser and the
losses float32), plus the critic step's two-graph backward. Tiny random models on the CPU."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import TINY_RESOLUTION, TINY_W_DIM, make_tiny_clip, make_tiny_discriminator, make_tiny_generator

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.stylegan2.networks import build_discriminator, build_generator
from clip2gan_cli.train import losses as L
from clip2gan_cli.train import trainer
from clip2gan_cli.train.checkpoints import load_latest_checkpoint
from clip2gan_cli.train.config import TrainConfig, checkpointing_enabled, load_config
from clip2gan_cli.train.models import TrainModels
from clip2gan_cli.train.trainer import run_training


def tiny_config(**overrides) -> TrainConfig:
    values = dict(steps=2, batch_size=2, log_every=1, sample_every=1000, checkpoint_every=1000, device="cpu",
                  lpips_net="none", identity="off", num_sample_images=0, sample_prompts=[], mapper_hidden_dim=32,
                  num_workers=0)
    values.update(overrides)
    return TrainConfig(**values).validate()


def tiny_models(generator=None, discriminator=None) -> TrainModels:
    return TrainModels(generator or make_tiny_generator(seed=0), make_tiny_clip(seed=0),
                       discriminator or make_tiny_discriminator(seed=1), sources={"generator": "tiny"})


def test_checkpoint_blocks_round_trips_through_toml_and_rejects_other_values(tmp_path):
    assert TrainConfig().checkpoint_blocks == "auto"
    for value in ("auto", "on", "off"):
        path = tmp_path / f"{value}.toml"
        path.write_text(TrainConfig(checkpoint_blocks=value).to_toml())
        assert load_config(path).checkpoint_blocks == value
    with pytest.raises(UserInputError, match="checkpoint_blocks must be one of auto, on, off"):
        load_config(None, {"checkpoint_blocks": "yes"})
    assert load_config(None, {"precision": "auto"}).precision == "auto"


def test_auto_checkpoints_from_512_px_up_and_on_off_are_what_they_say():
    assert [checkpointing_enabled("auto", r) for r in (16, 256, 511, 512, 1024)] == [False, False, False, True, True]
    assert checkpointing_enabled("on", 16) and not checkpointing_enabled("off", 1024)


def test_the_run_sets_checkpoint_blocks_on_the_placed_generator_and_critic(tmp_path):
    for setting, expected in (("on", True), ("off", False), ("auto", False)):  # auto: 16 px is below 512
        models = tiny_models()
        models.generator.synthesis.checkpoint_blocks = models.discriminator.checkpoint_blocks = not expected
        run_training(tiny_config(steps=1, checkpoint_blocks=setting), tmp_path / setting, models=models,
                     progress=False)
        assert models.generator.synthesis.checkpoint_blocks is expected
        assert models.discriminator.checkpoint_blocks is expected
    # auto at 512 px: the decision reads the generator's resolution
    generator, discriminator = make_tiny_generator(seed=0), make_tiny_discriminator(seed=1)
    generator.img_resolution = 512
    trainer.prepare_networks(generator, discriminator, tiny_config(), "fp32")
    assert generator.synthesis.checkpoint_blocks and discriminator.checkpoint_blocks


def test_training_with_checkpointed_blocks_gives_the_mapper_of_training_without(tmp_path, monkeypatch):
    """Critic (WGAN-GP, double backward) and mapper steps through checkpointed G and D blocks: the same
    weights to float32 rounding (blocks recomputed one sample at a time), and checkpointing really ran."""
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda block, *args, **kwargs: (calls.append(type(block).__name__),
                                                        real_checkpoint(block, *args, **kwargs))[1])
    mappers = {}
    for setting in ("off", "on"):
        run_training(tiny_config(steps=3, checkpoint_blocks=setting), tmp_path / setting, models=tiny_models(),
                     progress=False)
        mappers[setting] = load_file(str(tmp_path / setting / "mapper.safetensors"))
        if setting == "off":
            assert calls == []
    assert {"SynthesisBlock", "DiscriminatorBlock"} <= set(calls)
    for name, tensor in mappers["off"].items():
        torch.testing.assert_close(mappers["on"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def fp16_marked_models() -> TrainModels:
    """Tiny G and D whose two highest-resolution blocks are marked for float16 (NVIDIA's num_fp16_res)."""
    generator = build_generator(TINY_RESOLUTION, z_dim=TINY_W_DIM, w_dim=TINY_W_DIM, channel_base=256, channel_max=16,
                                mapping_layers=2, backend="reference", seed=0, num_fp16_res=2, conv_clamp=256)
    discriminator = build_discriminator(TINY_RESOLUTION, channel_base=256, channel_max=16, backend="reference",
                                        seed=1, num_fp16_res=2, conv_clamp=256)
    return tiny_models(generator.eval().requires_grad_(False), discriminator)


def block_dtypes(network: torch.nn.Module, seen: dict[str, set]) -> None:
    """Record the dtype of every block's first output, by block name, whenever it runs."""
    for name, module in network.named_modules():
        if type(module).__name__ in ("SynthesisBlock", "DiscriminatorBlock"):
            module.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, set()).add(
                (out[0] if isinstance(out, tuple) else out).dtype))


def test_fp16_runs_the_marked_blocks_in_float16_and_keeps_mapper_optimiser_and_losses_float32(tmp_path):
    models = fp16_marked_models()
    seen_g, seen_d = {}, {}
    block_dtypes(models.generator.synthesis, seen_g)
    block_dtypes(models.discriminator, seen_d)
    # 5 steps: the scaler skips the first ones (its 2**16 start overflows the float16 gradients) and backs off
    result = run_training(tiny_config(steps=5, precision="fp16", checkpoint_every=5), tmp_path / "run",
                          models=models, progress=False)
    marked_g = {f"b{res}" for res in models.generator.config.fp16_resolutions}
    marked_d = {f"b{res}" for res in models.discriminator.config.fp16_resolutions}
    assert marked_g == {"b8", "b16"} and marked_d == {"b8", "b16"}
    assert all(seen_g[name] == {torch.float16} for name in marked_g)
    assert all(dtypes == {torch.float32} for name, dtypes in seen_g.items() if name not in marked_g)
    assert all(seen_d[name] == {torch.float16} for name in marked_d)
    assert all(p.dtype == torch.float32 for p in result.mapper.parameters())
    assert all(p.dtype == torch.float32 for p in models.discriminator.parameters())
    checkpoint = load_latest_checkpoint(tmp_path / "run")
    optimiser_state = [t for state in checkpoint["opt_m"]["state"].values() for t in state.values() if t.ndim]
    assert optimiser_state and all(t.dtype == torch.float32 for t in optimiser_state)
    assert 0 < checkpoint["scaler"]["scale"] < 2.0 ** 16  # fp16 scales the mapper's loss, backing off on overflow
    assert set(result.final_losses) >= {"rec", "adv", "div", "d_loss", "d_gp"}
    assert all(torch.isfinite(torch.tensor(value)) for value in result.final_losses.values())


def test_fp32_runs_every_block_in_float32_even_where_the_network_would_pick_fp16(tmp_path):
    models = fp16_marked_models()
    models.generator.set_precision("fp16"), models.discriminator.set_precision("fp16")
    seen = {}
    block_dtypes(models.generator.synthesis, seen)
    run_training(tiny_config(steps=1), tmp_path / "run", models=models, progress=False)
    assert models.generator.precision == "fp32" and models.discriminator.precision == "fp32"
    assert set().union(*seen.values()) == {torch.float32}
    assert load_latest_checkpoint(tmp_path / "run")["scaler"] is None


def test_critic_backward_gives_critic_loss_gradients_and_values():
    """The two-graph backward is the one-graph loss's math: same values, gradients to float32 rounding."""
    real = torch.randn([3, 3, TINY_RESOLUTION, TINY_RESOLUTION], generator=torch.Generator().manual_seed(0))
    fake = torch.randn([3, 3, TINY_RESOLUTION, TINY_RESOLUTION], generator=torch.Generator().manual_seed(1))
    results = []
    for two_graphs in (False, True):
        D = make_tiny_discriminator(seed=1).train().requires_grad_(True)
        mix = torch.Generator().manual_seed(2)
        if two_graphs:
            loss, parts = L.critic_backward(D, real, fake, 10.0, mix, accumulation=2)
        else:
            loss, parts = L.critic_loss(D, real, fake, 10.0, mix)
            (loss / 2).backward()
        results.append((loss.detach(), parts, {n: p.grad for n, p in D.named_parameters()}))
    (loss_one, parts_one, grads_one), (loss_two, parts_two, grads_two) = results
    assert torch.equal(loss_one, loss_two) and not loss_two.requires_grad
    assert all(torch.equal(parts_one[name], parts_two[name]) for name in ("d_wasserstein", "d_gp"))
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert parts_one["d_gp"] > 0 and any(grad.abs().max() > 0 for grad in grads_two.values())
