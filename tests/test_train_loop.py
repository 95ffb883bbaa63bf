"""The training loop on tiny random models (CPU): learning, exact resume, atomic checkpoints, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from tiny_models import make_tiny_clip, make_tiny_discriminator, make_tiny_generator, make_tiny_pack, \
    register_tiny_pack

from clip2gan_cli import tomlio
from clip2gan_cli.errors import CheckpointError, OutputError, TrainingError, UserInputError
from clip2gan_cli.train import checkpoints, losses
from clip2gan_cli.train.config import TrainConfig
from clip2gan_cli.train.checkpoints import checkpoint_paths, load_latest_checkpoint
from clip2gan_cli.train.models import TrainModels
from clip2gan_cli.train.trainer import run_training


def tiny_config(**overrides) -> TrainConfig:
    """A config that trains in well under a second per step on the tiny models."""
    values = dict(steps=4, batch_size=2, log_every=1, sample_every=1000, checkpoint_every=2, device="cpu",
                  lpips_backbone="random", identity="off", num_sample_images=2, mapper_hidden_dim=32,
                  num_workers=0, sample_prompts=["a red circle", "a smiling woman"])
    values.update(overrides)
    return TrainConfig(**values).validate()


@pytest.fixture(scope="module")
def frozen():
    """Tiny G, CLIP and a random-trunk LPIPS shared by the tests of this module (all frozen; the
    critic, which training changes, is rebuilt per run by `models_for`)."""
    from clip2gan_cli.train.losses import build_perceptual_loss

    return make_tiny_generator(seed=0), make_tiny_clip(seed=0), build_perceptual_loss("alex", "random", seed=0)


def models_for(frozen, with_discriminator: bool = True) -> TrainModels:
    generator, clip, perceptual = frozen
    return TrainModels(generator, clip, make_tiny_discriminator(seed=1) if with_discriminator else None,
                       perceptual=perceptual, sources={"generator": "tiny", "clip_model": "tiny-clip"})


def mapper_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_run_writes_the_documented_run_directory(tmp_path, frozen):
    config = tiny_config(steps=2, sample_every=2)
    result = run_training(config, tmp_path / "run", models=models_for(frozen), progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"mapper.safetensors", "config.toml", "metrics.jsonl", "samples",
                                                "checkpoints"}
    assert [step for step, _ in checkpoint_paths(run)] == [2]
    from PIL import Image

    with Image.open(run / "samples" / "step-00000002.png") as sheet:
        # 2 columns of 16 px tiles: held-out row, reconstruction row, one row for the 2 prompts
        assert sheet.size == (2 * 18 + 2, 3 * 18 + 2)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert {"loss/rec", "loss/lpips", "loss/adv", "loss/div", "loss/d_gp"} <= set(lines[0])
    # mapper.safetensors is the EMA mapper, loadable with --mapper (clip2gan_cli.mapper.load_mapper)
    from clip2gan_cli.mapper import load_mapper

    loaded = load_mapper(result.mapper_path)
    for name, tensor in result.mapper_ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert TrainConfig.from_dict(tomlio.loads((run / "config.toml").read_text())) == config


def test_a_few_steps_lower_the_reconstruction_loss(tmp_path, frozen):
    config = tiny_config(steps=30, batch_size=4, lr=1e-3, lambda_lpips=0.0, lambda_adv=0.0, lambda_div=0.0,
                         checkpoint_every=1000, ema_decay=0.0)
    run_training(config, tmp_path / "run", models=models_for(frozen, with_discriminator=False), progress=False)
    rec = [json.loads(line)["loss/rec"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_resume_gives_the_same_mapper_as_an_uninterrupted_run(tmp_path, frozen):
    whole = tiny_config(steps=4, checkpoint_every=2)
    run_training(whole, tmp_path / "whole", models=models_for(frozen), progress=False)

    half = tiny_config(steps=2, checkpoint_every=2)
    run_training(half, tmp_path / "halves", models=models_for(frozen), progress=False)
    run_training(whole, tmp_path / "halves", resume=True, models=models_for(frozen), progress=False)

    assert (tmp_path / "whole" / "mapper.safetensors").read_bytes() == \
        (tmp_path / "halves" / "mapper.safetensors").read_bytes()
    a = load_latest_checkpoint(tmp_path / "whole")
    b = load_latest_checkpoint(tmp_path / "halves")
    for key in ("mapper", "discriminator"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # metrics of the resumed run continue without duplicates
    steps = [json.loads(line)["step"] for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_cosine_schedule_and_gradient_clipping_resume_exactly_and_clip(tmp_path, frozen, monkeypatch):
    import shutil

    config = tiny_config(steps=4, checkpoint_every=2, lr_schedule="cosine", max_grad_norm=0.05)
    run_training(config, tmp_path / "whole", models=models_for(frozen), progress=False)
    # the same run stopped after its step-2 checkpoint: resuming recomputes the step-3/4 learning rates
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    (tmp_path / "stopped" / "checkpoints" / "step-00000004.pt").unlink()
    (tmp_path / "stopped" / "mapper.safetensors").unlink()
    run_training(config, tmp_path / "stopped", resume=True, models=models_for(frozen), progress=False)
    assert (tmp_path / "whole" / "mapper.safetensors").read_bytes() == \
        (tmp_path / "stopped" / "mapper.safetensors").read_bytes()

    # the optimiser sees the clipped gradient; the log keeps the norm before clipping
    seen = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    clipped = tiny_config(steps=3, lambda_adv=0.0, max_grad_norm=0.05)
    run_training(clipped, tmp_path / "clipped", models=models_for(frozen, with_discriminator=False), progress=False)
    logged = [json.loads(line)["loss/grad_norm"] for line in (tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()]
    assert min(logged) > 0.05 and max(seen) == pytest.approx(0.05, rel=1e-4)
    seen.clear()
    run_training(tiny_config(steps=3, lambda_adv=0.0), tmp_path / "unclipped",
                 models=models_for(frozen, with_discriminator=False), progress=False)
    logged = [json.loads(line)["loss/grad_norm"] for line in (tmp_path / "unclipped" / "metrics.jsonl").read_text().splitlines()]
    assert seen == pytest.approx(logged, rel=1e-5)


def test_a_failure_during_save_keeps_the_previous_checkpoint(tmp_path, frozen, monkeypatch):
    real_write = checkpoints.write_checkpoint_file
    calls = []

    def write_then_die(state, path):
        calls.append(path)
        if len(calls) == 2:  # the second save dies half-way through writing
            path.write_bytes(b"PK\x03\x04 partial checkpoint")
            raise KeyboardInterrupt
        real_write(state, path)

    monkeypatch.setattr(checkpoints, "write_checkpoint_file", write_then_die)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(steps=4, checkpoint_every=2), run, models=models_for(frozen), progress=False)
    assert [step for step, _ in checkpoint_paths(run)] == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # temp file removed
    assert load_latest_checkpoint(run)["step"] == 2

    # A hard kill (no cleanup) can leave a temp file: resume ignores and removes it.
    (run / "checkpoints" / ".step-00000004.pt.abc123.tmp").write_bytes(b"partial")
    monkeypatch.setattr(checkpoints, "write_checkpoint_file", real_write)
    run_training(tiny_config(steps=4, checkpoint_every=2), run, resume=True, models=models_for(frozen),
                 progress=False)
    assert [step for step, _ in checkpoint_paths(run)] == [2, 4]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_naming_step_and_loss_and_keeps_the_checkpoint(tmp_path, frozen, monkeypatch):
    real_rec = losses.reconstruction_loss
    calls = []

    def rec_nan_at_step_3(real, reconstructed):
        calls.append(1)
        loss = real_rec(real, reconstructed)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "reconstruction_loss", rec_nan_at_step_3)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss rec is nan at step 3"):
        run_training(tiny_config(steps=4, checkpoint_every=2, lambda_adv=0.0), run,
                     models=models_for(frozen, False), progress=False)
    assert [step for step, _ in checkpoint_paths(run)] == [2]
    assert load_latest_checkpoint(run)["step"] == 2


def test_existing_run_directory_is_refused_without_resume(tmp_path, frozen):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already exists"):
        run_training(tiny_config(), run, models=models_for(frozen), progress=False)
    assert (run / "notes.txt").read_text() == "mine"


def test_non_writable_run_directory_is_an_output_error(tmp_path, frozen):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError):
        run_training(tiny_config(), blocker / "run", models=models_for(frozen), progress=False)


def test_resume_with_an_incompatible_generator_or_clip_is_a_checkpoint_error(tmp_path, frozen):
    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.stylegan2.networks import build_generator
    from tiny_models import tiny_clip_config

    run = tmp_path / "run"
    run_training(tiny_config(steps=2, lambda_adv=0.0, lpips_net="none"), run, models=models_for(frozen, False),
                 progress=False)
    other_generator = build_generator(16, z_dim=16, w_dim=16, channel_base=256, channel_max=16, mapping_layers=2,
                                      backend="reference", seed=3)
    with pytest.raises(CheckpointError, match="another generator"):
        run_training(tiny_config(steps=4, lambda_adv=0.0, lpips_net="none"), run, resume=True,
                     models=TrainModels(other_generator, frozen[1]), progress=False)
    clip_config = tiny_clip_config()
    clip_config["model_cfg"]["embed_dim"] = 24
    other_clip = load_clip("tiny-clip-24", pretrained=None, config=clip_config, device="cpu")
    with pytest.raises(CheckpointError, match="another CLIP"):
        run_training(tiny_config(steps=4, lambda_adv=0.0, lpips_net="none"), run, resume=True,
                     models=TrainModels(frozen[0], other_clip), progress=False)


def test_resume_past_the_end_is_refused(tmp_path, frozen):
    run = tmp_path / "run"
    run_training(tiny_config(steps=2, lambda_adv=0.0), run, models=models_for(frozen, False), progress=False)
    with pytest.raises(UserInputError, match="already at step 2"):
        run_training(tiny_config(steps=2, lambda_adv=0.0), run, resume=True, models=models_for(frozen, False),
                     progress=False)


def test_grad_accumulation_and_several_critic_steps_run(tmp_path, frozen):
    config = tiny_config(steps=1, grad_accum=2, d_steps_per_m_step=2, checkpoint_every=1)
    result = run_training(config, tmp_path / "run", models=models_for(frozen), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())


def test_cli_trains_a_pack_and_exports_it(tmp_path, cli_runner):
    paths = make_tiny_pack(tmp_path / "pack", with_mapper=False)
    register_tiny_pack(paths, "tiny")
    run = tmp_path / "run"
    result = cli_runner(["train", "--pack", "tiny", "--data", "synthetic", "--out", run, "--steps", "2",
                         "--device", "cpu", "--no-progress", "--export-pack", "tiny-trained",
                         "--set", "lpips_backbone=random", "--set", "batch_size=2", "--set", "num_workers=0",
                         "--set", "mapper_hidden_dim=32", "--set", "num_sample_images=2"])
    assert result.exit_code == 0, result.output
    assert (run / "mapper.safetensors").is_file()
    from clip2gan_cli.packs import load_pack

    pack = load_pack("tiny-trained", device="cpu")
    assert pack.mapper is not None
    assert pack.paths["mapper"].resolve() == (run / "mapper.safetensors").resolve()
    # without feature_bank_size the trained mapper has no bank: --prior retrieval says so in one line
    retrieval = cli_runner(["generate", "a red circle", "-n", "1", "--pack", "tiny-trained", "--prior", "retrieval",
                            "--out", tmp_path / "gen"])
    assert retrieval.exit_code == 1 and "no image feature bank" in retrieval.stderr
    # with one, a trained mapper generates through the retrieval prior
    banked = tmp_path / "banked"
    result = cli_runner(["train", "--pack", "tiny", "--data", "synthetic", "--out", banked, "--steps", "1",
                         "--device", "cpu", "--no-progress", "--set", "lpips_backbone=random", "--set", "batch_size=2",
                         "--set", "num_workers=0", "--set", "mapper_hidden_dim=32", "--set", "num_sample_images=2",
                         "--set", "feature_bank_size=4"])
    assert result.exit_code == 0, result.output
    generated = cli_runner(["generate", "a red circle", "-n", "2", "--mapper", banked / "mapper.safetensors",
                            "--generator", str(paths.generator), "--clip", str(paths.clip_config),
                            "--prior", "retrieval", "--out", tmp_path / "gen", "--json"])
    assert generated.exit_code == 0, generated.stderr

    again = cli_runner(["train", "--pack", "tiny", "--data", "synthetic", "--out", run, "--steps", "2"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_cli_trains_with_explicit_generator_and_local_clip(tmp_path, cli_runner):
    paths = make_tiny_pack(tmp_path / "pack", with_mapper=False)
    run = tmp_path / "run"
    result = cli_runner(["train", "--generator", paths.generator, "--clip", paths.directory, "--data", "synthetic",
                         "--out", run, "--steps", "1", "--device", "cpu", "--no-progress",
                         "--set", "lpips_net=none", "--set", "batch_size=2", "--set", "mapper_hidden_dim=32",
                         "--set", "num_sample_images=2"])
    assert result.exit_code == 0, result.output
    checkpoint = load_latest_checkpoint(run)
    assert checkpoint["sources"]["generator"] == str(paths.generator)
    assert checkpoint["sources"]["clip_model"].endswith("clip_config.json")
    assert checkpoint["discriminator"] is not None  # the G file holds no D: a fresh critic was trained
    from clip2gan_cli.stylegan2.convert import load_generator

    generator = load_generator(str(paths.generator), device="cpu")
    critic_widths = {key: value.shape[0] for key, value in checkpoint["discriminator"].items()
                     if key.endswith("conv0.weight")}
    assert critic_widths and max(critic_widths.values()) <= max(generator.config.channels_per_resolution().values())


def test_cli_data_folder_errors(tmp_path, cli_runner):
    paths = make_tiny_pack(tmp_path / "pack", with_mapper=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_runner(["train", "--generator", paths.generator, "--clip", paths.clip_config, "--data", empty,
                         "--out", tmp_path / "run", "--device", "cpu", "--set", "lpips_net=none"])
    assert result.exit_code == 1 and "no .jpg/.png/.webp files" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for index in range(3):
        (broken / f"img{index}.png").write_bytes(b"not a png")
    result = cli_runner(["train", "--generator", paths.generator, "--clip", paths.clip_config, "--data", broken,
                         "--out", tmp_path / "run2", "--device", "cpu", "--set", "lpips_net=none"])
    assert result.exit_code == 1 and "none of the 3 image files could be read (3 skipped)" in result.output


def test_bf16_autocast_trains_with_fp32_weights(tmp_path, frozen):
    config = tiny_config(steps=1, precision="bf16", checkpoint_every=1)
    result = run_training(config, tmp_path / "run", models=models_for(frozen), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    assert all(p.dtype == torch.float32 for p in result.mapper.parameters())


def test_a_feature_bank_of_fixed_generator_samples_is_saved_and_resume_keeps_it_exact(tmp_path, frozen):
    from clip2gan_cli.mapper import load_mapper
    from clip2gan_cli.train.data import STREAM_SYNTHETIC, SyntheticSource, step_generator

    generator, clip, _ = frozen
    whole = tiny_config(steps=4, checkpoint_every=2, feature_bank_size=5)
    run_training(whole, tmp_path / "whole", models=models_for(frozen), progress=False)
    run_training(tiny_config(steps=2, checkpoint_every=2, feature_bank_size=5), tmp_path / "halves",
                 models=models_for(frozen), progress=False)
    run_training(whole, tmp_path / "halves", resume=True, models=models_for(frozen), progress=False)
    assert (tmp_path / "whole" / "mapper.safetensors").read_bytes() == \
        (tmp_path / "halves" / "mapper.safetensors").read_bytes()
    bank = load_mapper(tmp_path / "whole" / "mapper.safetensors").image_feature_bank
    images = SyntheticSource(generator, whole.synthetic_truncation, torch.device("cpu")).sample(
        5, step_generator(whole.seed, STREAM_SYNTHETIC, -2))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.encode_image(images).float(), dim=-1)
    torch.testing.assert_close(bank, expected)
    plain = tiny_config(steps=2, checkpoint_every=2)  # the default: no bank (the paper)
    run_training(plain, tmp_path / "plain", models=models_for(frozen), progress=False)
    assert load_mapper(tmp_path / "plain" / "mapper.safetensors").image_feature_bank.shape[0] == 0


def test_a_feature_bank_from_a_folder_takes_each_image_once_when_it_is_small(tmp_path, frozen):
    from PIL import Image

    from clip2gan_cli.mapper import load_mapper

    data = tmp_path / "images"
    data.mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (80 * index, 40, 200)).save(data / f"{index}.png")
    config = tiny_config(steps=1, data=str(data), checkpoint_every=1, lambda_adv=0.0, num_sample_images=0,
                         feature_bank_size=10)
    messages = []
    run_training(config, tmp_path / "run", models=models_for(frozen, False), progress=False, log=messages.append)
    bank = load_mapper(tmp_path / "run" / "mapper.safetensors").image_feature_bank
    assert bank.shape[0] == 3 and any("Feature bank: CLIP features of 3 training images" in m for m in messages)
    assert len({tuple(row.tolist()) for row in bank}) == 3  # three different images


@pytest.mark.parametrize("data", ["synthetic", "folder"])
def test_no_sample_images_gives_sheets_of_the_prompts_alone(tmp_path, frozen, data):
    from PIL import Image

    if data == "folder":
        data = tmp_path / "images"
        data.mkdir()
        for index in range(3):
            Image.new("RGB", (16, 16), (80 * index, 40, 200)).save(data / f"{index}.png")
    config = tiny_config(steps=1, data=str(data), checkpoint_every=1, lambda_adv=0.0, num_sample_images=0)
    run_training(config, tmp_path / "run", models=models_for(frozen, False), progress=False)
    with Image.open(tmp_path / "run" / "samples" / "step-00000001.png") as sheet:
        assert sheet.size == (2 * 18 + 2, 18 + 2)  # one row: the two sample prompts (was a ZeroDivisionError)


def test_trains_on_an_image_folder_mixed_with_generator_samples(tmp_path, frozen):
    from PIL import Image

    data = tmp_path / "images"
    for index in range(3):
        (data / "sub").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), (80 * index, 40, 200)).save(data / "sub" / f"{index}.jpg")
    (data / "corrupt.png").write_bytes(b"nope")
    config = tiny_config(steps=1, data=str(data), synthetic_ratio=0.5, checkpoint_every=1, lambda_adv=0.0)
    messages = []
    result = run_training(config, tmp_path / "run", models=models_for(frozen, False), progress=False,
                          log=messages.append)
    assert any("3 images" in m and "(1 unreadable files skipped)" in m for m in messages), messages
    assert result.final_losses["rec"] > 0


def test_tensorboard_events_are_written_when_tensorboard_is_importable(tmp_path, frozen, monkeypatch):
    import sys
    import types

    written = []

    class RecordingWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def close(self):
            written.append(("closed", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run_training(tiny_config(steps=2, lambda_adv=0.0, lpips_net="none"), tmp_path / "run",
                 models=models_for(frozen, False), progress=False)
    assert written[0] == ("dir", str(tmp_path / "run" / "tensorboard"))
    assert ("loss/rec", 1) in written and ("loss/rec", 2) in written and written[-1] == ("closed", None)


def test_an_enabled_gradient_scaler_trains_the_same_weights_and_resumes_with_its_state(tmp_path, frozen, monkeypatch):
    """fp16's scaler path with float32 blocks: loss scaling by a power of two is exact, so the mapper
    equals the unscaled run's; the scaler's state is checkpointed and restored."""
    from clip2gan_cli.train import trainer

    config = tiny_config(steps=2, checkpoint_every=1)
    run_training(config, tmp_path / "plain", models=models_for(frozen), progress=False)
    assert load_latest_checkpoint(tmp_path / "plain")["scaler"] is None  # fp32: nothing to save
    monkeypatch.setattr(trainer, "precision",
                        lambda name, device: ("fp32", torch.amp.GradScaler("cpu", enabled=True)))
    run_training(config, tmp_path / "scaled", models=models_for(frozen), progress=False)
    assert (tmp_path / "scaled" / "mapper.safetensors").read_bytes() == \
        (tmp_path / "plain" / "mapper.safetensors").read_bytes()
    assert load_latest_checkpoint(tmp_path / "scaled")["scaler"]["scale"] == 2.0 ** 16
    run_training(tiny_config(steps=1, checkpoint_every=1), tmp_path / "halves", models=models_for(frozen),
                 progress=False)
    loaded = []
    real_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: (loaded.append(state), real_load(self, state))[1])
    run_training(config, tmp_path / "halves", resume=True, models=models_for(frozen), progress=False)
    assert [state["scale"] for state in loaded] == [2.0 ** 16]
    assert (tmp_path / "halves" / "mapper.safetensors").read_bytes() == \
        (tmp_path / "scaled" / "mapper.safetensors").read_bytes()
