"""The shapes pack: its CLIP exports load through clip.py, the training recipes' pieces behave,
and the shipped weights generate the requested colour and shape offline on the CPU."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2gan_cli.packs import shapes
from clip2gan_cli.packs.shapes import data
from clip2gan_cli.tokenizer import VocabTokenizer

from clip2gan_cli.recipes.shapes import build as build_shapes_pack
from clip2gan_cli.recipes.shapes import clip as shapes_clip
from clip2gan_cli.recipes.shapes import gan as shapes_gan


def test_caption_match_matrix_counts_every_consistent_image_as_a_positive():
    attributes = [dict(shape="circle", color="red", size="small", background="black"),
                  dict(shape="circle", color="blue", size="large", background="white"),
                  dict(shape="square", color="red", size="large", background="black")]
    captions = ["a red circle", "a circle on white", "a large red square on a black background", "red"]
    match = shapes_clip.caption_match_matrix(attributes, captions)
    expected = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(match, expected)


def test_soft_contrastive_loss_prefers_aligned_features():
    match = torch.eye(4, dtype=torch.bool)
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    aligned = shapes_clip.soft_contrastive_loss(features, features, torch.tensor(10.0), match)
    shuffled = shapes_clip.soft_contrastive_loss(features, features.roll(1, 0), torch.tensor(10.0), match)
    assert aligned < shuffled


@pytest.mark.slow
def test_exported_clip_loads_through_clip_py_and_warns_naming_known_words(tmp_path):
    from clip2gan_cli.clip import load_clip_from_config_file

    tokenizer = VocabTokenizer(data.vocabulary(), context_length=shapes_clip.CONTEXT_LENGTH)
    config = shapes_clip.pack_clip_config(tokenizer)
    torch.manual_seed(0)
    model = shapes_clip.build_clip(config).eval()
    shapes_clip.export_clip(model, tokenizer, tmp_path)
    clip = load_clip_from_config_file(tmp_path / "clip_config.json", device="cpu")
    images, _ = data.sample(2, seed=0)
    expected = torch.nn.functional.normalize(
        model.half().float().encode_image(shapes_clip.images_to_clip_input(images)), dim=-1)
    got = clip.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.allclose(got, expected, atol=1e-4)  # same preprocessing as in training
    with pytest.warns(UserWarning, match="purple.*knows: a, on"):
        clip.encode_text(["a purple circle"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clip.encode_text(["a red circle"]).shape == (1, 128)


def test_attribute_code_of_z_is_uniform_over_the_domain():
    z = torch.randn(20000, 32, generator=torch.Generator().manual_seed(0))
    codes = shapes_gan.attributes_from_z(z)
    for key, classes in (("shape", len(data.SHAPES)), ("color", len(data.COLORS)), ("size", 2), ("background", 2)):
        share = torch.bincount(codes[key], minlength=classes).float() / len(z)
        assert (share - 1 / classes).abs().max() < 0.02, key
    offset = codes["position"] - data.RESOLUTION / 2
    assert offset.abs().max() <= data.JITTER and offset.std() > data.JITTER / 3


def test_attribute_code_ignores_the_scale_of_z():
    z = torch.randn(64, 32)
    a, b = shapes_gan.attributes_from_z(z), shapes_gan.attributes_from_z(3 * z)
    assert all(torch.equal(a[k], b[k]) for k in ("shape", "color", "size", "background"))


def test_rendered_codes_match_the_domain_renderer():
    codes = shapes_gan.random_codes(3, torch.Generator().manual_seed(1))
    images = shapes_gan.render_codes(codes)
    first = data.render(data.SHAPES[codes["shape"][0]], list(data.COLORS)[codes["color"][0]],
                        list(data.SIZES)[codes["size"][0]], list(data.BACKGROUNDS)[codes["background"][0]],
                        x=float(codes["position"][0, 0]), y=float(codes["position"][0, 1]))
    assert images.shape == (3, 3, 32, 32)
    assert torch.allclose(images[0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)


def test_diff_augment_moves_and_masks_pixels_but_never_recolours():
    images = shapes_gan.render_codes(shapes_gan.random_codes(8, torch.Generator().manual_seed(2)))
    augmented = shapes_gan.diff_augment(images, translate_px=3, cutout=0.25)
    assert augmented.shape == images.shape
    source_colours = {tuple(c) for c in images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    for colour in {tuple(c) for c in augmented.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}:
        assert colour in source_colours or colour == (0.0, 0.0, 0.0)


def test_gan_trainer_runs_each_stage_checkpoints_resumes_and_exports(tmp_path):
    recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8},
                                  d_channels={4: 8, 8: 8, 16: 8, 32: 8}, r1_interval=2)
    trainer = shapes_gan.ShapesGanTrainer(tmp_path, recipe, log=lambda m: None)
    assert np.isfinite(trainer.decoder_step()) and np.isfinite(trainer.mapping_step())
    for step in range(2):
        losses = trainer.adversarial_step(step)
        assert all(np.isfinite(v) for v in losses.values()) and losses["r1"] >= 0
    trainer.progress["decoder"]["steps"] = 7
    trainer.save()
    resumed = shapes_gan.ShapesGanTrainer(tmp_path, recipe, log=lambda m: None)
    assert resumed.progress["decoder"]["steps"] == 7
    assert all(torch.equal(a, b) for a, b in zip(resumed.G.parameters(), trainer.G.parameters()))
    g_path, d_path = resumed.export(tmp_path / "pack")
    from clip2gan_cli.stylegan2.convert import load_discriminator, load_generator

    generator = load_generator(str(g_path), device="cpu", backend="reference")
    assert generator(torch.randn(2, recipe.z_dim)).shape == (2, 3, 32, 32)
    assert load_discriminator(str(d_path), device="cpu", backend="reference")(torch.zeros(2, 3, 32, 32)).shape == (2, 1)


def test_gan_stages_resumed_midway_give_the_weights_of_an_uninterrupted_run(tmp_path):
    recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8}, d_channels={4: 8, 8: 8, 16: 8, 32: 8},
                                  r1_interval=2, decoder_batch=2, decoder_warmup_steps=1, decoder_warmup_batch=3)
    budgets = {"decoder": 3, "mapping": 2, "adversarial": 3}
    straight = shapes_gan.ShapesGanTrainer(tmp_path / "straight", recipe, seed=5, log=lambda m: None)
    for stage, steps in budgets.items():
        straight.run_stage(stage, steps)
    interrupted = shapes_gan.ShapesGanTrainer(tmp_path / "interrupted", recipe, seed=5, log=lambda m: None)
    for stage, steps in budgets.items():
        interrupted.run_stage(stage, steps - 1)  # stop one step short, then start a new process
        interrupted = shapes_gan.ShapesGanTrainer(tmp_path / "interrupted", recipe, seed=5, log=lambda m: None)
        interrupted.run_stage(stage, steps)
    assert interrupted.progress["decoder"]["images"] == 3 + 2 * 2  # the warm-up step's batch, then the recipe's
    for name in ("G", "G_ema", "D", "E"):
        a, b = getattr(straight, name).state_dict(), getattr(interrupted, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other_seed = shapes_gan.ShapesGanTrainer(tmp_path / "other", recipe, seed=6, log=lambda m: None)
    other_seed.run_stage("decoder", 3)
    assert not torch.equal(other_seed.E.net[0].weight, straight.E.net[0].weight)


def test_clip_training_resumed_midway_gives_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    straight = shapes_clip.train(tmp_path / "straight", steps=2, batch=8, lr=1e-3, seed=3, threads=1)
    shapes_clip.train(tmp_path / "interrupted", steps=1, batch=8, lr=1e-3, seed=3, threads=1)
    resumed = shapes_clip.train(tmp_path / "interrupted", steps=2, batch=8, lr=1e-3, seed=3, threads=1)
    assert "resumed at step 1 of 2" in capsys.readouterr().out
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "clip_ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "interrupted" / "clip_ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trains, frozen, trained", [("mapping", "synthesis", "mapping"),
                                                     ("synthesis", "mapping", "synthesis")])
def test_adversarial_stage_trains_only_what_the_recipe_names(tmp_path, trains, frozen, trained):
    recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8},
                                  d_channels={4: 8, 8: 8, 16: 8, 32: 8}, r1_interval=2, adversarial_trains=trains)
    trainer = shapes_gan.ShapesGanTrainer(tmp_path, recipe, log=lambda m: None)
    parameters = lambda part: dict(getattr(trainer.G, part).named_parameters())  # noqa: E731
    before = {part: {k: v.detach().clone() for k, v in parameters(part).items()} for part in (frozen, trained)}
    for step in range(2):
        trainer.adversarial_step(step)
    assert all(torch.equal(v, parameters(frozen)[k]) for k, v in before[frozen].items())
    assert not all(torch.equal(v, parameters(trained)[k]) for k, v in before[trained].items())


def test_a_mapping_anchor_keeps_the_mapping_near_where_the_stage_began_and_resumes_exactly(tmp_path):
    def trainer_for(folder, weight):
        recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8}, g_lr=0.003,
                                      d_channels={4: 8, 8: 8, 16: 8, 32: 8}, r1_interval=2,
                                      adversarial_trains="mapping", mapping_anchor_weight=weight)
        return shapes_gan.ShapesGanTrainer(tmp_path / folder, recipe, log=lambda m: None)

    z = torch.randn(512, 32, generator=torch.Generator().manual_seed(5))
    drift, logged = {}, {}
    for weight in (0.0, 1000.0):
        trainer = trainer_for(str(weight), weight)
        start = copy.deepcopy(trainer.G.mapping)
        trainer.run_stage("adversarial", 10, eval_every=10 ** 6)
        with torch.no_grad():
            drift[weight] = torch.nn.functional.mse_loss(trainer.G.mapping(z), start(z)).item()
        logged[weight] = trainer.adversarial_step(10)["anchor"]
    assert drift[1000.0] < 0.5 * drift[0.0]
    assert logged[1000.0] > 0 and logged[0.0] == 0.0
    # the frozen start copy is in the checkpoint: 6 steps + resume to 10 equals 10 straight
    halfway = trainer_for("resumed", 1000.0)
    halfway.run_stage("adversarial", 6, eval_every=10 ** 6)
    resumed = trainer_for("resumed", 1000.0)
    resumed.run_stage("adversarial", 10, eval_every=10 ** 6)
    straight = trainer_for("straight", 1000.0)
    straight.run_stage("adversarial", 10, eval_every=10 ** 6)
    for name, tensor in straight.G.state_dict().items():
        assert torch.equal(tensor, resumed.G.state_dict()[name]), name


def test_a_trainer_starts_from_a_packs_generator_and_discriminator_files(tmp_path):
    recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8},
                                  d_channels={4: 8, 8: 8, 16: 8, 32: 8})
    source = shapes_gan.ShapesGanTrainer(tmp_path / "a", recipe, seed=1, log=lambda m: None)
    source.export(tmp_path / "pack")
    target = shapes_gan.ShapesGanTrainer(tmp_path / "b", recipe, seed=2, log=lambda m: None)
    target.load_pack_files(tmp_path / "pack")
    for mine, theirs in ((target.G, source.G_ema), (target.G_ema, source.G_ema), (target.D, source.D)):
        assert all(torch.equal(tensor, theirs.state_dict()[name]) for name, tensor in mine.state_dict().items())


def test_shipped_pack_is_complete_and_small():
    assert shapes.missing_weight_files() == []
    total = sum((shapes.PACK_DIR / name).stat().st_size for name in shapes.WEIGHT_FILES)
    assert total <= 20 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("prior", [None, "text"], ids=["pack default (retrieval)", "text (the paper)"])
def test_shipped_pack_generates_the_prompted_colour_offline_on_cpu(monkeypatch, prior):
    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.pipeline import generate

    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    pack = load_pack(device="cpu")
    assert pack.mapper.config.generation_prior == "retrieval" and pack.mapper.image_feature_bank.shape[0] == 4096
    result = generate(pack.generator, pack.clip, pack.mapper, ["a red circle", "a blue square"], n=4, seed=0,
                      prior=prior)
    images = result.images
    assert images.shape == (8, 3, 32, 32)
    # The dominant non-background hue of each image: red-ish for the first prompt, blue-ish for the second.
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).reshape(8, -1, 3)
    saturated = (pixels.max(-1).values - pixels.min(-1).values) > 100
    mean_colour = torch.stack([pixels[i][saturated[i]].mean(0) for i in range(8)])
    assert (mean_colour[:4, 0] > mean_colour[:4, 2]).float().mean() >= 0.75
    assert (mean_colour[4:, 2] > mean_colour[4:, 0]).float().mean() >= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("neutral", [[], ["--neutral", "red"]], ids=["bare word", "neutral red"])
def test_shipped_pack_edits_red_shapes_to_blue_with_its_defaults(cli_runner, tmp_path, neutral):
    """`clip2gan edit red.png blue`, no other flags: the pack's edit defaults (direction, rows, beta and
    --neutral auto, which infers "red") turn red shapes blue in place, as the explicit neutral does.
    Without a neutral (`--neutral none`) the bare word reaches 0.60 target colour (docs/shapes_pack.md)."""
    import json

    from PIL import Image

    def foreground(pixels):  # saturated pixels: the shape, on a black or white background
        pixels = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 3)
        mask = (pixels.max(-1).values - pixels.min(-1).values) > 100
        return pixels[mask].mean(0), mask

    blue, kept = 0, 0
    specs = [("circle", "large", "black", 15, 17), ("square", "large", "white", 17, 15),
             ("triangle", "large", "black", 16, 16), ("cross", "large", "white", 14, 16)]
    for index, (shape, size, background, x, y) in enumerate(specs):
        source = tmp_path / f"red_{index}.png"
        Image.fromarray(data.render(shape, "red", size, background, x, y)).save(source)
        result = cli_runner(["edit", source, "blue", *neutral, "--out", tmp_path / "out", "--json"])
        assert result.exit_code == 0, result.stderr
        assert bool(neutral) or "Neutral for 'blue': 'red' (inferred from the image)" in result.stderr
        edited = next(json.loads(line)["path"] for line in result.stdout.splitlines()
                      if json.loads(line)["role"] == "edited")
        colour, mask = foreground(Image.open(edited).convert("RGB"))
        _, source_mask = foreground(Image.open(source).convert("RGB"))
        blue += int(colour[2] > colour[0] + 50)
        kept += int((mask & source_mask).sum() / (mask | source_mask).sum() > 0.5)  # the shape stays in place
    assert blue >= 3 and kept >= 3


def test_build_state_accumulates_stage_time_and_resumes_done_stages(tmp_path):
    state = build_shapes_pack.BuildState(tmp_path / "build_state.json")
    state.record("clip", 12.5, done=False)
    state.record("clip", 7.5, done=True, zero_shot={"shape": 0.9})
    again = build_shapes_pack.BuildState(tmp_path / "build_state.json")
    assert again.done("clip") and not again.done("gan")
    assert again.times() == {"clip": 20.0}


def test_a_partial_build_keeps_the_recorded_times_of_the_stages_it_did_not_run(tmp_path):
    import json

    pack = tmp_path / "pack"
    pack.mkdir()
    # 12345 s: a time the 1-step checker stage cannot take (it once took 1.0 s, the old sentinel)
    (pack / "build_times.json").write_text(json.dumps({"stage_seconds": {"clip": 5.0, "checker": 12345.0},
                                                       "notes": {"clip": "how the CLIP was trained"}}))
    build_shapes_pack.main(["--workdir", str(tmp_path / "work"), "--pack-dir", str(pack), "--only", "checker",
                            "--checker-steps", "1"])
    times = json.loads((pack / "build_times.json").read_text())
    assert times["stage_seconds"]["clip"] == 5.0 and times["stage_seconds"]["checker"] != 12345.0
    assert times["notes"] == {"clip": "how the CLIP was trained"}
    assert times["total_seconds"] == round(sum(times["stage_seconds"].values()), 1)


def test_text_feature_shift_of_the_build_moves_captions_toward_their_images(tmp_path):
    import torch.nn.functional as F

    from clip2gan_cli.mapper import Mapper

    pack_dir = Path(shapes.__file__).parent
    image_features, text_features = build_shapes_pack.paired_clip_features(pack_dir / "clip_config.json", 2048, 7)
    assert image_features.shape == text_features.shape == (2048, image_features.shape[1])
    mapper = Mapper(clip_dim=image_features.shape[1], num_ws=2, w_dim=4, hidden_dim=8)
    mapper.set_text_feature_shift(image_features[:1024], text_features[:1024])
    # held-out pairs: the shifted captions' centre lands near the images' centre, and no pair gets worse
    # on average (captions are vague: "a circle" fits many images, so single pairs move less)
    texts, images, shifted = text_features[1024:], image_features[1024:], mapper.text_to_image_features(text_features[1024:])
    gap_before = (texts.mean(0) - images.mean(0)).norm()
    gap_after = (shifted.mean(0) - images.mean(0)).norm()
    assert gap_after < 0.5 * gap_before, (float(gap_before), float(gap_after))
    assert F.cosine_similarity(shifted, images).mean() > F.cosine_similarity(texts, images).mean()


def test_build_skips_a_finished_mapper_run_only(tmp_path):
    run = tmp_path / "mapper_run"
    assert not build_shapes_pack.mapper_run_finished(run, 10)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000005.pt").write_bytes(b"x")
    (run / "mapper.safetensors").write_bytes(b"x")
    assert not build_shapes_pack.mapper_run_finished(run, 10)
    (run / "checkpoints" / "step-00000010.pt").write_bytes(b"x")
    assert build_shapes_pack.mapper_run_finished(run, 10)


def test_discriminator_only_adversarial_stage_keeps_g_and_resumes_exactly(tmp_path):
    recipe = shapes_gan.GanRecipe(batch=4, g_channels={4: 8, 8: 8, 16: 8, 32: 8}, d_channels={4: 8, 8: 8, 16: 8, 32: 8},
                                  r1_interval=2, decoder_batch=2, decoder_warmup_steps=1, decoder_warmup_batch=3,
                                  adversarial_trains="discriminator")
    straight = shapes_gan.ShapesGanTrainer(tmp_path / "straight", recipe, seed=5, log=lambda m: None)
    straight.run_stage("decoder", 2)
    straight.run_stage("mapping", 2)
    g_before = {k: v.clone() for k, v in straight.G_ema.state_dict().items()}
    d_before = {k: v.clone() for k, v in straight.D.state_dict().items()}
    straight.run_stage("adversarial", 3)
    assert all(torch.equal(v, straight.G_ema.state_dict()[k]) for k, v in g_before.items())
    assert not all(torch.equal(v, straight.D.state_dict()[k]) for k, v in d_before.items())
    assert straight.opt_g is None

    # the same run stopped after 2 adversarial steps, resumed in a new trainer
    stopped = shapes_gan.ShapesGanTrainer(tmp_path / "stopped", recipe, seed=5, log=lambda m: None)
    stopped.run_stage("decoder", 2)
    stopped.run_stage("mapping", 2)
    stopped.run_stage("adversarial", 2)
    resumed = shapes_gan.ShapesGanTrainer(tmp_path / "stopped", recipe, seed=5, log=lambda m: None)
    resumed.run_stage("adversarial", 3)
    a, b = straight.D.state_dict(), resumed.D.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
