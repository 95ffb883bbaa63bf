"""pipeline.py on tiny random models: generate, invert/edit, interpolate, and the option parsers."""
from __future__ import annotations

import pytest
import torch

from clip2gan_cli import pipeline
from clip2gan_cli.errors import UserInputError
from clip2gan_cli.mapper import perturb_clip_features
from tiny_models import TINY_RESOLUTION


def _generate(models, texts=("a red circle",), **kwargs):
    return pipeline.generate(models.generator, models.clip, models.mapper, list(texts), **kwargs)


def test_generate_shapes_ranges_and_indices(tiny_models):
    result = _generate(tiny_models, ("a red circle", "a blue square"), n=3, seed=0)
    num_ws, w_dim = tiny_models.generator.num_ws, tiny_models.generator.w_dim
    assert result.images.shape == (6, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert result.images.min() >= -1 and result.images.max() <= 1
    assert result.w_plus.shape == (6, num_ws, w_dim)
    assert result.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert result.sample_index.tolist() == [0, 1, 2, 0, 1, 2]


def test_same_seed_same_images_other_seed_other_images(tiny_models):
    first = _generate(tiny_models, n=2, seed=7)
    again = _generate(tiny_models, n=2, seed=7)
    other = _generate(tiny_models, n=2, seed=8)
    assert torch.equal(first.images, again.images) and torch.equal(first.w_plus, again.w_plus)
    assert not torch.equal(first.w_plus, other.w_plus)


def test_one_prompt_gives_distinct_images_through_the_feature_noise(tiny_models):
    noisy = _generate(tiny_models, n=4, seed=0)
    pairwise = [(noisy.images[i] - noisy.images[j]).abs().mean() for i in range(4) for j in range(i + 1, 4)]
    assert min(pairwise) > 1e-3
    plain = _generate(tiny_models, n=4, seed=0, feature_noise=("none", 0.0))
    assert torch.equal(plain.images[0], plain.images[3])  # without the noise every sample is the same


def test_generate_uses_the_mappers_noise_and_row_i_does_not_depend_on_n(tiny_models):
    models = tiny_models
    result = _generate(models, n=3, seed=5)
    text_features = models.clip.encode_text(["a red circle"])
    noise = pipeline.sample_noise(3, text_features.shape[1], 5)
    expected = models.mapper(perturb_clip_features(text_features.expand(3, -1), models.mapper.config.noise_mode,
                                                   models.mapper.config.noise_strength, noise=noise))
    torch.testing.assert_close(result.w_plus, expected)
    fewer = _generate(models, n=2, seed=5)
    torch.testing.assert_close(fewer.w_plus, result.w_plus[:2])


def test_a_generation_noise_strength_in_the_mapper_config_replaces_the_training_strength(tiny_models):
    import dataclasses

    models = tiny_models
    trained = models.mapper.config
    try:
        models.mapper.config = dataclasses.replace(trained, generation_noise_strength=0.1)
        result = _generate(models, n=3, seed=5)
    finally:
        models.mapper.config = trained
    expected = _generate(models, n=3, seed=5, feature_noise=(trained.noise_mode, 0.1))
    torch.testing.assert_close(result.w_plus, expected.w_plus)
    assert not torch.allclose(result.w_plus, _generate(models, n=3, seed=5).w_plus)


def test_generate_and_text_latents_move_text_features_by_the_mappers_shift(tiny_models):
    import torch.nn.functional as F

    models = tiny_models
    prompts = ["a red circle", "a blue square"]
    plain = _generate(models, prompts, n=2, seed=3)
    shift = torch.randn(models.mapper.clip_dim, generator=torch.Generator().manual_seed(0)) * 0.3
    models.mapper.text_feature_shift.copy_(shift)
    try:
        shifted = _generate(models, prompts, n=2, seed=3)
        latents = pipeline.text_latents(models.clip, models.mapper, prompts)
    finally:
        models.mapper.text_feature_shift.zero_()
    assert not torch.allclose(shifted.w_plus, plain.w_plus)
    with torch.no_grad():
        moved = F.normalize(models.clip.encode_text(prompts) + shift, dim=-1)
        expected = models.mapper(moved)
    torch.testing.assert_close(latents, expected)
    noise = pipeline.sample_noise(2, moved.shape[1], 3)
    with torch.no_grad():
        first = models.mapper(perturb_clip_features(moved[:1].expand(2, -1), models.mapper.config.noise_mode,
                                                    models.mapper.config.sampling_noise_strength, noise=noise))
    torch.testing.assert_close(shifted.w_plus[:2], first)


def test_a_negative_generation_noise_strength_is_refused(tiny_models):
    import dataclasses

    with pytest.raises(UserInputError, match="generation noise strength"):
        dataclasses.replace(tiny_models.mapper.config, generation_noise_strength=-0.1)


def _with_bank(models, bank, temperature):
    import copy
    import dataclasses

    mapper = copy.deepcopy(models.mapper)
    mapper.config = dataclasses.replace(mapper.config, generation_prior="retrieval", retrieval_temperature=temperature)
    mapper.set_image_feature_bank(bank)
    return models.generator, models.clip, mapper


def test_the_retrieval_prior_maps_bank_features_close_to_the_prompt(tiny_models):
    generator, clip, mapper = _with_bank(tiny_models, torch.randn(6, tiny_models.mapper.clip_dim), 1e-4)
    text_feature = clip.encode_text(["a red circle"])
    # make row 4 the prompt's own (unit) feature: at a tiny temperature every sample retrieves it
    mapper.image_feature_bank[4] = torch.nn.functional.normalize(text_feature[0], dim=-1)
    result = pipeline.generate(generator, clip, mapper, ["a red circle"], n=5, seed=0, feature_noise=("none", 0.0))
    expected = mapper(mapper.image_feature_bank[4:5]).expand(5, -1, -1)
    torch.testing.assert_close(result.w_plus, expected)
    text_prior = pipeline.generate(generator, clip, mapper, ["a red circle"], n=1, prior="text",
                                   feature_noise=("none", 0.0))
    torch.testing.assert_close(text_prior.w_plus, mapper(text_feature))  # the paper's input, on request


def test_retrieval_draws_follow_the_softmax_and_row_i_depends_only_on_seed_and_i(tiny_models):
    generator, clip, mapper = _with_bank(tiny_models, torch.randn(3, tiny_models.mapper.clip_dim), 1e6)
    text_features = clip.encode_text(["a red circle", "a blue square"])
    drawn = pipeline.retrieve_image_features(mapper, text_features, 600, seed=3)            # [2 * 600, D]
    rows = (drawn[:, None, :] - mapper.image_feature_bank[None]).abs().sum(-1).argmin(1)
    counts = torch.bincount(rows[:600], minlength=3).float() / 600
    assert counts.min() > 0.25  # a huge temperature: uniform over the 3 rows
    assert torch.equal(rows[:600], rows[600:])  # the same uniforms for every prompt: same rows at T -> inf
    fewer = pipeline.retrieve_image_features(mapper, text_features[:1], 7, seed=3)
    torch.testing.assert_close(fewer, drawn[:7])
    other = pipeline.retrieve_image_features(mapper, text_features[:1], 7, seed=4)
    assert not torch.equal(fewer, other)


def test_prompt_latents_are_generates_first_sample_without_noise(tiny_models):
    generator, clip, mapper = _with_bank(tiny_models, torch.randn(9, tiny_models.mapper.clip_dim), 0.3)
    for seed in (0, 5):
        first = pipeline.generate(generator, clip, mapper, ["a red circle", "a blue square"], n=1, seed=seed,
                                  feature_noise=("none", 0.0))
        torch.testing.assert_close(pipeline.prompt_latents(clip, mapper, ["a red circle", "a blue square"], seed=seed),
                                   first.w_plus)
    torch.testing.assert_close(pipeline.prompt_latents(clip, mapper, ["a red circle"], prior="text"),
                               pipeline.text_latents(clip, mapper, ["a red circle"]))


def test_the_retrieval_prior_needs_a_bank(tiny_models):
    models = tiny_models
    with pytest.raises(UserInputError, match="no image feature bank"):
        _generate(models, n=1, prior="retrieval")
    with pytest.raises(UserInputError, match="unknown generation prior"):
        _generate(models, n=1, prior="nearest")


def test_truncation_zero_collapses_to_the_average_latent(tiny_models):
    result = _generate(tiny_models, n=3, seed=0, truncation_psi=0.0)
    w_avg = tiny_models.generator.w_avg
    torch.testing.assert_close(result.w_plus, w_avg.expand_as(result.w_plus))
    assert torch.equal(result.images[0], result.images[2])


@pytest.mark.parametrize("texts, n, message", [
    ([], 1, "no prompt"), ([""], 1, "empty prompt"), (["  "], 1, "empty prompt"),
    (["a red circle"], 0, "`n` and `batch_size` must be at least 1"),  # the CLI says -n and --batch-size
])
def test_generate_rejects_bad_requests(tiny_models, texts, n, message):
    with pytest.raises(UserInputError, match=message):
        _generate(tiny_models, texts, n=n)


def test_edit_adds_beta_times_text_directions(tiny_models):
    models = tiny_models
    image = _generate(models, n=1, seed=0).images
    result = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 2.0), ("large", -0.5)])
    directions = pipeline.text_latents(models.clip, models.mapper, ["blue", "large"])
    torch.testing.assert_close(result.w_plus, pipeline.invert(models.clip, models.mapper, image))
    torch.testing.assert_close(result.w_plus_edited, result.w_plus + 2.0 * directions[:1] - 0.5 * directions[1:])
    assert result.edited.shape == result.reconstruction.shape == image.shape
    assert not torch.equal(result.edited, result.reconstruction)


def test_edit_with_neutral_text_uses_the_difference_of_mapped_texts(tiny_models):
    models = tiny_models
    image = _generate(models, n=1, seed=1).images
    result = pipeline.edit(models.generator, models.clip, models.mapper, image, [("a blue circle", 1.0)],
                           neutral="a circle")
    mapped = pipeline.text_latents(models.clip, models.mapper, ["a blue circle", "a circle"])
    torch.testing.assert_close(result.directions[0, 0], mapped[0] - mapped[1])
    torch.testing.assert_close(result.w_plus_edited, result.w_plus + (mapped[0] - mapped[1]))


def test_image_direction_is_the_mappers_response_at_the_image(tiny_models):
    models = tiny_models
    images = _generate(models, ["a red circle", "a blue square"], n=1, seed=4).images
    result = pipeline.edit(models.generator, models.clip, models.mapper, images, [("a green circle", 1.5)],
                           neutral="a red circle", direction="image")
    with torch.no_grad():
        features = models.clip.encode_image(images)
        offset = models.clip.encode_text(["a green circle"]) - models.clip.encode_text(["a red circle"])
        expected = models.mapper(features + offset) - models.mapper(features)
    assert result.directions.shape == (1, 2, models.generator.num_ws, models.generator.w_dim)
    torch.testing.assert_close(result.directions[0], expected)
    torch.testing.assert_close(result.w_plus_edited, result.w_plus + 1.5 * expected)
    # per image: the two images get different directions (the text form gives both the same)
    assert not torch.allclose(result.directions[0, 0], result.directions[0, 1])
    text_form = pipeline.edit(models.generator, models.clip, models.mapper, images, [("a green circle", 1.5)],
                              neutral="a red circle")
    torch.testing.assert_close(text_form.directions[0, 0], text_form.directions[0, 1])


COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square"]


def test_contrast_candidates_swap_each_contrast_word_for_every_member_of_its_set():
    assert pipeline.contrast_candidates("blue", [COLOURS, SHAPES]) == ["red", "green", "blue"]
    both = pipeline.contrast_candidates("a blue square", [COLOURS, SHAPES])
    assert both == [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    assert pipeline.contrast_candidates("a happy face", [COLOURS]) == ["a happy face"]


def test_contrast_candidates_match_whole_words_case_insensitively_and_the_first_set_owns_a_word():
    # "reddish" and "bluebell" are not contrast words; "Red" is, in the sets' spelling
    assert pipeline.contrast_candidates("a reddish bluebell, Red!", [COLOURS]) == [
        "a reddish bluebell, red!", "a reddish bluebell, green!", "a reddish bluebell, blue!"]
    # "light blue" (two words) wins over "blue" inside it; "blue" is in two sets: the first keeps it
    assert pipeline.contrast_candidates("light blue", [["light blue", "dark red"], COLOURS]) == [
        "light blue", "dark red"]
    assert pipeline.contrast_candidates("blue", [["blue", "sad"], COLOURS]) == ["blue", "sad"]


def test_contrast_candidates_refuse_too_many_combinations_and_bad_sets():
    words = [f"w{i}" for i in range(10)]
    with pytest.raises(UserInputError, match="too many contrast words"):
        pipeline.contrast_candidates(" ".join(words[:4]), [words])  # 10**4 combinations
    for bad in (["red"], ["red", "Red"], ["red", " "], "red,green"):
        with pytest.raises(UserInputError, match="contrast set"):
            pipeline.contrast_candidates("red", [bad])


class _LookupClip:
    """A CLIP stand-in whose text features are fixed unit vectors, one per known text."""

    def __init__(self, texts):
        self.features = {text: torch.nn.functional.one_hot(torch.tensor(i), len(texts)).float()
                         for i, text in enumerate(texts)}

    def encode_text(self, texts):
        return torch.stack([self.features[text] for text in texts])


def test_infer_neutrals_picks_for_each_image_the_candidate_clip_finds_closest():
    from clip2gan_cli.mapper import Mapper, MapperConfig

    texts = ["a red circle", "a green circle", "a blue circle"]
    clip = _LookupClip(texts)
    mapper = Mapper(config=MapperConfig(clip_dim=3, num_ws=2, w_dim=2, hidden_dim=4, num_layers=2))
    images = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])  # closest to green, then red
    assert pipeline.infer_neutrals(clip, mapper, "a blue circle", images, [COLOURS]) == [
        "a green circle", "a red circle"]
    assert pipeline.infer_neutrals(clip, mapper, "a blue circle", images, [["small", "large"]]) == [None, None]
    # the mapper's modality gap moves text features before they are compared: green's becomes [0, -1, 0]
    mapper.text_feature_shift.copy_(torch.tensor([0.0, -5.0, 0.0]))
    assert pipeline.infer_neutrals(clip, mapper, "a blue circle", images[:1], [COLOURS]) == ["a red circle"]


@pytest.mark.parametrize("direction", ["text", "image"])
def test_auto_neutral_edits_each_image_as_its_inferred_neutral_would(tiny_models, direction):
    models = tiny_models
    images = _generate(models, ["a red circle", "a green square", "a blue circle"], n=1, seed=3).images
    sets = [COLOURS, SHAPES]
    result = pipeline.edit(models.generator, models.clip, models.mapper, images, [("a blue circle", 1.5)],
                           neutral="auto", direction=direction, contrast_sets=sets)
    features = models.clip.encode_image(images)
    inferred = pipeline.infer_neutrals(models.clip, models.mapper, "a blue circle", features, sets)
    assert result.neutrals == [inferred]
    for index, neutral in enumerate(inferred):
        alone = pipeline.edit(models.generator, models.clip, models.mapper, images[index:index + 1],
                              [("a blue circle", 1.5)], neutral=neutral, direction=direction)
        torch.testing.assert_close(result.directions[0, index], alone.directions[0, 0])
        torch.testing.assert_close(result.w_plus_edited[index], alone.w_plus_edited[0])


def test_auto_neutral_needs_contrast_sets_and_leaves_texts_without_a_contrast_word_alone(tiny_models):
    models = tiny_models
    image = _generate(models, n=1, seed=2).images
    with pytest.raises(UserInputError, match="needs contrast sets"):
        pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 1.0)], neutral="auto")
    auto = pipeline.edit(models.generator, models.clip, models.mapper, image, [("large", 1.0)], neutral="auto",
                         contrast_sets=[COLOURS])
    plain = pipeline.edit(models.generator, models.clip, models.mapper, image, [("large", 1.0)])
    assert auto.neutrals == [[None]]
    torch.testing.assert_close(auto.w_plus_edited, plain.w_plus_edited)


def test_edit_layers_move_only_the_chosen_rows(tiny_models):
    models = tiny_models
    image = _generate(models, n=1, seed=5).images
    num_ws = models.generator.num_ws
    full = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 2.0)])
    part = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 2.0)], layers=(2, None))
    torch.testing.assert_close(part.w_plus_edited[:, :2], part.w_plus[:, :2])
    torch.testing.assert_close(part.w_plus_edited[:, 2:], full.w_plus_edited[:, 2:])
    assert not torch.allclose(full.w_plus_edited[:, :2], full.w_plus[:, :2])
    for bad in ((num_ws, None), (3, 3), (0, num_ws + 1)):
        with pytest.raises(UserInputError, match="selects no rows"):
            pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 2.0)], layers=bad)
    with pytest.raises(UserInputError, match="unknown edit direction"):
        pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 2.0)], direction="pixels")


@pytest.mark.parametrize("spec, expected", [("2:", (2, None)), (":4", (None, 4)), ("1:3", (1, 3)), (" 0 : 8 ", (0, 8))])
def test_parse_layers(spec, expected):
    assert pipeline.parse_layers(spec) == expected


@pytest.mark.parametrize("spec", ["2", "a:b", "1:2:3", "-1:", ""])
def test_parse_layers_rejects_malformed_specs(spec):
    with pytest.raises(UserInputError, match="`layers`"):  # the CLI says --layers
        pipeline.parse_layers(spec)


def test_edit_without_edits_reconstructs_and_from_a_given_latent(tiny_models):
    models = tiny_models
    generated = _generate(models, n=1, seed=2)
    result = pipeline.edit(models.generator, models.clip, models.mapper, generated.images, [],
                           w_plus=generated.w_plus)
    torch.testing.assert_close(result.reconstruction, generated.images)
    torch.testing.assert_close(result.edited, result.reconstruction)
    with pytest.raises(UserInputError, match="latent has shape"):
        pipeline.edit(models.generator, models.clip, models.mapper, generated.images, [],
                      w_plus=torch.zeros(1, 3, models.generator.w_dim))


def test_refinement_lowers_the_reconstruction_error(tiny_models):
    models = tiny_models
    target = _generate(models, n=1, seed=3).images
    start = pipeline.invert(models.clip, models.mapper, target)
    refined = pipeline.refine_inversion(models.generator, start, target, steps=15, lr=0.05)

    def error(w):
        return torch.nn.functional.mse_loss(pipeline.synthesize(models.generator, w), target)

    assert error(refined) < error(start)
    calls = []
    pipeline.refine_inversion(models.generator, start, target, steps=2,
                              lpips=lambda x, y: calls.append(1) or (x - y).abs().mean(dim=(1, 2, 3)))
    assert len(calls) == 2  # the perceptual term is used on every step when given


@pytest.mark.parametrize("spherical", [False, True])
def test_interpolate_frame_count_and_exact_endpoints(spherical):
    w_a, w_b = torch.randn(1, 6, 32), torch.randn(6, 32)
    frames = pipeline.interpolate(w_a, w_b, 7, spherical=spherical)
    assert frames.shape == (7, 6, 32)
    assert torch.equal(frames[0], w_a[0]) and torch.equal(frames[-1], w_b)
    if not spherical:
        torch.testing.assert_close(frames[3], (w_a[0] + w_b) / 2)
    else:  # lengths are interpolated linearly
        torch.testing.assert_close(frames[3].norm(dim=-1), (w_a[0].norm(dim=-1) + w_b.norm(dim=-1)) / 2)


def test_interpolate_rejects_too_few_frames_and_mismatched_codes():
    with pytest.raises(UserInputError, match="`frames` must be at least 2"):  # the CLI says --frames
        pipeline.interpolate(torch.zeros(6, 32), torch.zeros(6, 32), 1)
    with pytest.raises(UserInputError, match="shapes"):
        pipeline.interpolate(torch.zeros(6, 32), torch.zeros(4, 32), 3)


@pytest.mark.parametrize("spec, expected", [("beard:2", ("beard", 2.0)), ("blond hair:-1.5", ("blond hair", -1.5)),
                                            ("a:b:0.5", ("a:b", 0.5)), (" smile : 3 ", ("smile", 3.0))])
def test_parse_edit_valid(spec, expected):
    assert pipeline.parse_edit(spec) == expected


@pytest.mark.parametrize("spec", ["beard", "beard:", ":2", "beard:two", "beard:nan", "beard:inf", ""])
def test_parse_edit_malformed(spec):
    with pytest.raises(UserInputError, match="`edit`|beta"):  # the CLI says --edit
        pipeline.parse_edit(spec)


def test_parse_beta_rejects_non_numbers():
    assert pipeline.parse_beta("-0.5") == -0.5
    with pytest.raises(UserInputError, match="`beta` must be a number"):  # the CLI says --beta
        pipeline.parse_beta("strong")


def test_parse_edit_round_trips_any_text_and_finite_beta():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    texts = st.text(min_size=1, max_size=40).filter(lambda t: t.strip() and t == t.strip())
    betas = st.floats(allow_nan=False, allow_infinity=False, width=32)

    @settings(max_examples=200, deadline=None)
    @given(texts, betas)
    def check(text, beta):
        assert pipeline.parse_edit(f"{text}:{beta!r}") == (text, beta)

    check()


# --- the mapper file's edit defaults: one resolver, explicit values win ---
def _with_edit_defaults(monkeypatch, mapper, **defaults):
    import dataclasses

    monkeypatch.setattr(mapper, "config", dataclasses.replace(mapper.config, **defaults))


def test_edit_settings_fill_what_is_left_out_from_the_mapper_file(tiny_models, monkeypatch):
    mapper = tiny_models.mapper
    assert pipeline.edit_settings(mapper, [("blue", None)]).edits == [("blue", pipeline.DEFAULT_EDIT_BETA)]
    _with_edit_defaults(monkeypatch, mapper, edit_beta=1.25, edit_direction="image", edit_layers=(2, None),
                        edit_neutral="auto", edit_contrast_sets=[COLOURS])
    filled = pipeline.edit_settings(mapper, [("blue", None), ("red", -1.0)])
    assert filled == pipeline.EditSettings(edits=[("blue", 1.25), ("red", -1.0)], neutral="auto", direction="image",
                                           layers=(2, None), contrast_sets=[COLOURS])
    given = pipeline.edit_settings(mapper, [("blue", 0.5)], neutral="none", direction="text", layers=(None, None))
    assert given == pipeline.EditSettings(edits=[("blue", 0.5)], neutral=None, direction="text",
                                          layers=(None, None), contrast_sets=None)
    assert pipeline.edit_settings(mapper, [("blue", 1.0)], neutral="a red circle").neutral == "a red circle"
    assert pipeline.edit_settings(mapper, [("blue", 1.0)], contrast_sets=[["big", "small"]]).contrast_sets == [
        ["big", "small"]]  # given sets replace the mapper's


def test_edit_settings_refuse_contrast_sets_without_auto_naming_parameters(tiny_models):
    with pytest.raises(UserInputError, match="`contrast_sets` is used only with `neutral` auto"):
        pipeline.edit_settings(tiny_models.mapper, [("blue", 1.0)], contrast_sets=[COLOURS])
    with pytest.raises(UserInputError, match="`neutral` auto needs contrast sets"):
        pipeline.edit_settings(tiny_models.mapper, [("blue", 1.0)], neutral="auto")
    with pytest.raises(UserInputError, match="unknown edit direction"):
        pipeline.edit_settings(tiny_models.mapper, [("blue", 1.0)], direction="pixels")


def test_edit_with_nothing_given_equals_edit_with_the_mapper_files_values(tiny_models, monkeypatch):
    models = tiny_models
    image = _generate(models, n=1, seed=4).images
    explicit = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 1.25)],
                             neutral="auto", direction="image", layers=(2, None), contrast_sets=[COLOURS])
    plain = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 1.25)])
    _with_edit_defaults(monkeypatch, models.mapper, edit_beta=1.25, edit_direction="image", edit_layers=(2, None),
                        edit_neutral="auto", edit_contrast_sets=[COLOURS])
    defaulted = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", None)])
    assert defaulted.settings == explicit.settings and defaulted.neutrals == explicit.neutrals
    torch.testing.assert_close(defaulted.w_plus_edited, explicit.w_plus_edited, rtol=0, atol=0)
    overridden = pipeline.edit(models.generator, models.clip, models.mapper, image, [("blue", 1.25)],
                               neutral="none", direction="text", layers=(None, None))
    torch.testing.assert_close(overridden.w_plus_edited, plain.w_plus_edited, rtol=0, atol=0)
    assert not torch.equal(defaulted.w_plus_edited, plain.w_plus_edited)
