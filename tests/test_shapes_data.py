"""The procedural shapes domain: attributes are what the pixels show, sampling is reproducible."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.packs.shapes import data


def test_domain_has_at_least_four_shapes_six_colours_two_sizes_two_backgrounds():
    assert len(data.SHAPES) >= 4 and len(data.COLORS) >= 6
    assert len(data.SIZES) == 2 and len(data.BACKGROUNDS) >= 2


def test_colours_are_well_separated_from_each_other_and_from_backgrounds():
    palette = list(data.COLORS.values()) + list(data.BACKGROUNDS.values())
    for a, b in itertools.combinations(palette, 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 140, (a, b)


def test_sample_returns_uint8_images_and_attribute_dicts():
    images, attributes = data.sample(40, seed=3)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert len(attributes) == 40
    for attrs in attributes:
        assert attrs["shape"] in data.SHAPES and attrs["color"] in data.COLORS
        assert attrs["size"] in data.SIZES and attrs["background"] in data.BACKGROUNDS
        assert abs(attrs["x"] - 16) <= data.JITTER and abs(attrs["y"] - 16) <= data.JITTER


def test_sample_is_reproducible_by_seed_and_differs_across_seeds():
    first, attrs_first = data.sample(16, seed=5)
    again, attrs_again = data.sample(16, seed=5)
    other, _ = data.sample(16, seed=6)
    assert np.array_equal(first, again) and attrs_first == attrs_again
    assert not np.array_equal(first, other)


def test_sample_chunks_do_not_change_the_result():
    whole, _ = data.sample(50, seed=1)
    chunked, _ = data.sample(50, seed=1, chunk=7)
    assert np.array_equal(whole, chunked)


@pytest.mark.parametrize("shape", data.SHAPES)
def test_render_shows_the_colour_at_the_centre_and_the_background_in_the_corner(shape):
    image = data.render(shape, "blue", "large", "white")
    assert tuple(image[16, 16]) == data.COLORS["blue"]
    assert tuple(image[0, 0]) == data.BACKGROUNDS["white"]
    assert tuple(image[31, 31]) == data.BACKGROUNDS["white"]


def test_sample_pixels_agree_with_their_attributes():
    images, attributes = data.sample(64, seed=11)
    for image, attrs in zip(images, attributes):
        assert tuple(image[0, 0]) == data.BACKGROUNDS[attrs["background"]]
        centre = image[int(attrs["y"]), int(attrs["x"])]
        assert np.abs(centre.astype(int) - data.COLORS[attrs["color"]]).max() <= 2


def test_the_shapes_have_distinct_outlines():
    masks = [data.render(shape, "red", "large", "black").any(axis=2) for shape in data.SHAPES]
    for a, b in itertools.combinations(masks, 2):
        assert (a != b).sum() > 30


def test_large_shapes_cover_more_pixels_than_small_ones():
    for shape in data.SHAPES:
        small = data.render(shape, "green", "small", "black").any(axis=2).sum()
        large = data.render(shape, "green", "large", "black").any(axis=2).sum()
        assert large > 2 * small


def test_render_position_moves_the_shape():
    left = data.render("circle", "red", "small", "black", x=12, y=16).any(axis=2)
    right = data.render("circle", "red", "small", "black", x=20, y=16).any(axis=2)
    cols = np.arange(32)
    assert (right.sum(0) * cols).sum() / right.sum() - (left.sum(0) * cols).sum() / left.sum() == pytest.approx(8, abs=0.5)


@pytest.mark.parametrize("kwargs", [dict(shape="hexagon"), dict(color="purple"), dict(size="huge"),
                                    dict(background="plaid")])
def test_render_rejects_unknown_attributes_with_the_allowed_names(kwargs):
    attrs = dict(shape="circle", color="red", size="small", background="black") | kwargs
    with pytest.raises(UserInputError) as raised:
        data.render(**attrs)
    assert "expected one of" in raised.value.one_line()


def test_negative_sample_size_is_a_user_error():
    with pytest.raises(UserInputError):
        data.sample(-1)


def test_captions_name_colour_and_shape_and_use_only_vocabulary_words():
    rng = np.random.default_rng(0)
    _, attributes = data.sample(50, seed=2)
    vocabulary = set(data.vocabulary())
    for attrs in attributes:
        text = data.caption(attrs, rng)
        words = text.split()
        assert attrs["color"] in words and attrs["shape"] in words
        assert set(words) <= vocabulary
        if "background" in words:
            assert attrs["background"] in words


def test_attribute_indices_match_the_constant_order():
    _, attributes = data.sample(20, seed=4)
    indices = data.attribute_indices(attributes)
    for i, attrs in enumerate(attributes):
        assert data.SHAPES[indices["shape"][i]] == attrs["shape"]
        assert list(data.COLORS)[indices["color"][i]] == attrs["color"]
