"""mapper.py: the 12-layer CLIP->W+ network, its file format, compatibility checks, feature noise."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clip2gan_cli.errors import CheckpointError, UserInputError
from clip2gan_cli.mapper import (CONFIG_METADATA_KEY, Mapper, MapperConfig, check_compatible, load_mapper,
                                 perturb_clip_features, read_mapper_metadata, save_mapper)


def _features(n=4, dim=32, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_paper_architecture_twelve_linear_layers_each_followed_by_leaky_relu():
    mapper = Mapper(clip_dim=32, num_ws=6, w_dim=16, hidden_dim=24)
    assert len(mapper.layers) == 12
    assert mapper.layers[0].in_features == 32 and mapper.layers[-1].out_features == 6 * 16
    pre_activations = []
    mapper.layers[-1].register_forward_hook(lambda module, args, out: pre_activations.append(out))
    mapper.w_offset.fill_(0.5)
    w_plus = mapper(_features())
    assert w_plus.shape == (4, 6, 16)
    expected = F.leaky_relu(pre_activations[0], 0.2).view(4, 6, 16) + 0.5  # LeakyReLU after the last layer too
    torch.testing.assert_close(w_plus, expected)


def test_linear_last_layer_option_and_offset_centre():
    mapper = Mapper(clip_dim=8, num_ws=2, w_dim=4, final_activation=False, output_gain=0.0)
    w_avg = torch.arange(4.0)
    mapper.set_w_offset(w_avg)
    # With a zero-scaled last layer the output is exactly the generator's average latent.
    torch.testing.assert_close(mapper(_features(3, 8)), w_avg.expand(3, 2, 4))


def test_wrong_feature_size_is_a_clear_error():
    with pytest.raises(UserInputError, match=r"CLIP features \[N, 32\]"):
        Mapper(clip_dim=32, num_ws=2, w_dim=4)(torch.zeros(2, 31))


def test_save_and_load_round_trip_rebuilds_without_flags(tmp_path):
    mapper = Mapper(clip_dim=16, num_ws=4, w_dim=8, hidden_dim=12, num_layers=5, noise_mode="additive",
                    noise_strength=0.3)
    mapper.set_w_offset(torch.randn(8))
    path = save_mapper(mapper, tmp_path / "m.safetensors", metadata={"steps": 10})
    loaded = load_mapper(path)
    assert loaded.config == mapper.config
    torch.testing.assert_close(loaded(_features(3, 16)), mapper(_features(3, 16)))
    metadata = read_mapper_metadata(path)
    assert metadata["steps"] == "10"
    assert json.loads(metadata[CONFIG_METADATA_KEY])["noise_mode"] == "additive"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_text_feature_shift_is_the_mean_gap_is_saved_and_old_files_load_without_one(tmp_path):
    from safetensors.torch import load_file, save_file

    mapper = Mapper(clip_dim=16, num_ws=2, w_dim=4, hidden_dim=8)
    text = _features(5, 16, seed=1)
    assert torch.equal(mapper.text_to_image_features(text), text)  # no shift stored: unchanged
    images = _features(5, 16, seed=2)
    mapper.set_text_feature_shift(images, text)
    torch.testing.assert_close(mapper.text_feature_shift, images.mean(0) - text.mean(0))
    shifted = mapper.text_to_image_features(text)
    torch.testing.assert_close(shifted, F.normalize(text + images.mean(0) - text.mean(0), dim=-1))
    # moving the captions' mean text feature by the shift lands on the images' mean feature (direction)
    centre = mapper.text_to_image_features(text.mean(0, keepdim=True))
    torch.testing.assert_close(centre, F.normalize(images.mean(0, keepdim=True), dim=-1))

    path = save_mapper(mapper, tmp_path / "m.safetensors")
    torch.testing.assert_close(load_mapper(path).text_to_image_features(text), shifted)
    # a file written before the shift existed: same weights, no shift
    tensors = load_file(str(path))
    del tensors["text_feature_shift"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=read_mapper_metadata(path))
    old = load_mapper(tmp_path / "old.safetensors")
    assert not old.text_feature_shift.any()
    torch.testing.assert_close(old(text), mapper(text))
    with pytest.raises(UserInputError, match="paired features"):
        mapper.set_text_feature_shift(images, text[:3])


def test_load_errors_are_one_line_project_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserInputError, match="mapper file not found"):
        load_mapper(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        load_mapper(garbage)
    no_config = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(no_config))
    with pytest.raises(CheckpointError, match="not a clip2gan mapper"):
        load_mapper(no_config)
    lying = tmp_path / "lying.safetensors"
    header = json.dumps({"__metadata__": {CONFIG_METADATA_KEY: "{}"},
                         "w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    lying.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with pytest.raises(CheckpointError):
        load_mapper(lying)


def test_edit_defaults_round_trip_and_bad_ones_are_refused(tmp_path):
    mapper = Mapper(config=MapperConfig(clip_dim=4, num_ws=3, w_dim=2, hidden_dim=4, num_layers=2,
                                        edit_direction="image", edit_layers=(1, None), edit_beta=1.25,
                                        edit_neutral="auto", edit_contrast_sets=[["red", "blue"], ["big", "small"]]))
    loaded = load_mapper(save_mapper(mapper, tmp_path / "m.safetensors"))
    assert (loaded.config.edit_direction, loaded.config.edit_layers, loaded.config.edit_beta) == ("image", (1, None), 1.25)
    assert loaded.config.edit_neutral == "auto"
    assert loaded.config.edit_contrast_sets == [["red", "blue"], ["big", "small"]]
    base = {"clip_dim": 4, "num_ws": 2, "w_dim": 2}
    for bad, message in (({"edit_direction": "pixels"}, "unknown edit direction"),
                         ({"edit_layers": [1, 2, 3]}, "edit layers"), ({"edit_layers": ["a", None]}, "edit layers"),
                         ({"edit_beta": float("nan")}, "finite"), ({"edit_neutral": "red"}, "edit neutral"),
                         ({"edit_contrast_sets": "red,blue"}, "list of word lists"),
                         ({"edit_contrast_sets": [["red"]]}, "two distinct"),
                         ({"edit_contrast_sets": [["red", 3]]}, "list of words")):
        with pytest.raises(UserInputError, match=message):
            MapperConfig.from_dict({**base, **bad})
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    config = {**json.loads(read_mapper_metadata(path)[CONFIG_METADATA_KEY]), "edit_direction": "pixels"}
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"),
              metadata={**read_mapper_metadata(path), CONFIG_METADATA_KEY: json.dumps(config)})
    with pytest.raises(CheckpointError, match="invalid config: unknown edit direction"):
        load_mapper(tmp_path / "bad.safetensors")


def test_config_from_a_newer_version_names_the_unknown_key():
    with pytest.raises(CheckpointError, match="unknown key.*wings"):
        MapperConfig.from_dict({"clip_dim": 4, "num_ws": 2, "w_dim": 2, "wings": 2})


def test_mapper_for_another_generator_or_clip_is_refused():
    class FakeGenerator:
        num_ws, w_dim = 18, 512

    class FakeClip:
        embed_dim = 512

    check_compatible(Mapper(clip_dim=512, num_ws=18, w_dim=512, hidden_dim=8, num_layers=2), FakeGenerator(),
                     FakeClip())
    with pytest.raises(CheckpointError, match="mapper for another generator"):
        check_compatible(Mapper(clip_dim=512, num_ws=14, w_dim=512, hidden_dim=8, num_layers=2), FakeGenerator())
    with pytest.raises(CheckpointError, match="mapper for another CLIP"):
        check_compatible(Mapper(clip_dim=768, num_ws=18, w_dim=512, hidden_dim=8, num_layers=2), FakeGenerator(),
                         FakeClip())


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_perturbation_is_unit_length_seeded_and_close_to_the_feature(mode):
    features = _features(64, 512)
    one = perturb_clip_features(features, mode, 0.6, generator=torch.Generator().manual_seed(1))
    same = perturb_clip_features(features, mode, 0.6, generator=torch.Generator().manual_seed(1))
    other = perturb_clip_features(features, mode, 0.6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(64))
    assert torch.equal(one, same) and not torch.equal(one, other)
    cosine = (one * features).sum(-1)
    # N(1, 0.36) per dimension keeps cos ~ 1/sqrt(1.36) ~ 0.86; additive at the same strength ~ 0.86 too.
    assert 0.75 < cosine.mean() < 0.95


def test_perturbation_none_and_bad_inputs():
    features = _features()
    assert perturb_clip_features(features, "none", 0.6) is features
    with pytest.raises(UserInputError, match="unknown noise mode"):
        perturb_clip_features(features, "gaussian", 0.6)
    with pytest.raises(UserInputError, match="noise shape"):
        perturb_clip_features(features, "additive", 0.6, noise=torch.zeros(1, 3))
    with pytest.raises(UserInputError, match="unknown noise mode"):
        MapperConfig(4, 2, 2, noise_mode="gaussian")


def test_an_image_feature_bank_round_trips_and_older_files_load_without_one(tmp_path):
    config = MapperConfig(clip_dim=4, num_ws=3, w_dim=2, hidden_dim=4, num_layers=2, generation_prior="retrieval",
                          retrieval_temperature=0.05)
    mapper = Mapper(config=config)
    bank = torch.randn(5, 4)
    mapper.set_image_feature_bank(bank)
    loaded = load_mapper(save_mapper(mapper, tmp_path / "m.safetensors"))
    torch.testing.assert_close(loaded.image_feature_bank, F.normalize(bank, dim=-1))
    assert (loaded.config.generation_prior, loaded.config.retrieval_temperature) == ("retrieval", 0.05)
    from safetensors.torch import load_file, save_file

    older = {k: v for k, v in load_file(str(tmp_path / "m.safetensors")).items() if k != "image_feature_bank"}
    save_file(older, str(tmp_path / "old.safetensors"), metadata=read_mapper_metadata(tmp_path / "m.safetensors"))
    assert load_mapper(tmp_path / "old.safetensors").image_feature_bank.shape == (0, 4)
    for bad in (torch.randn(5, 3), torch.randn(0, 4), torch.full((2, 4), float("nan"))):
        with pytest.raises(UserInputError, match="image feature bank"):
            mapper.set_image_feature_bank(bad)
    base = {"clip_dim": 4, "num_ws": 2, "w_dim": 2}
    for bad, message in (({"generation_prior": "nearest"}, "unknown generation prior"),
                         ({"retrieval_temperature": 0.0}, "retrieval temperature"),
                         ({"retrieval_temperature": float("inf")}, "retrieval temperature")):
        with pytest.raises(UserInputError, match=message):
            MapperConfig.from_dict({**base, **bad})
