"""VocabTokenizer: open_clip-compatible token rows over a compact word vocabulary."""
from __future__ import annotations

import pytest
import torch

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.tokenizer import VocabTokenizer

WORDS = ["a", "red", "blue", "circle", "square", "on", "black", "background"]


def test_rows_are_sot_words_eot_then_padding():
    tokenizer = VocabTokenizer(WORDS, context_length=8)
    tokens = tokenizer(["a red circle"])
    assert tokens.dtype == torch.long and tokens.shape == (1, 8)
    row = tokens[0].tolist()
    assert row[0] == tokenizer.sot_id and row[4] == tokenizer.eot_id and row[5:] == [0, 0, 0]
    assert tokenizer.decode(row) == "a red circle"


def test_eot_has_the_largest_id_so_argmax_pooling_finds_it():
    tokenizer = VocabTokenizer(WORDS)
    tokens = tokenizer(["a blue square on black background", "circle"])
    assert (tokens.argmax(dim=1) == torch.tensor([7, 2])).all()
    assert tokenizer.eot_id == tokenizer.vocab_size - 1


def test_unknown_words_become_unk_and_are_reported_once():
    tokenizer = VocabTokenizer(WORDS)
    tokens = tokenizer(["a purple circle", "purple hexagon"])
    assert tokens[0, 2].item() == tokenizer.unk_id
    assert tokenizer.unknown_words(["a purple circle", "purple hexagon"]) == ["purple", "hexagon"]
    assert tokenizer.unknown_words("a red circle") == []


def test_case_and_punctuation_are_ignored():
    tokenizer = VocabTokenizer(WORDS)
    assert torch.equal(tokenizer(["A Red, circle!"]), tokenizer(["a red circle"]))


def test_long_texts_are_truncated_keeping_eot_last():
    tokenizer = VocabTokenizer(WORDS, context_length=5)
    row = tokenizer(["a red blue circle square on black"])[0].tolist()
    assert row == [tokenizer.sot_id, *[tokenizer.stoi[w] for w in ("a", "red", "blue")], tokenizer.eot_id]
    shorter = tokenizer(["a red blue circle"], context_length=4)[0].tolist()
    assert shorter[-1] == tokenizer.eot_id and len(shorter) == 4


def test_single_string_is_one_row():
    assert VocabTokenizer(WORDS)("red").shape == (1, 16)


def test_round_trip_through_dict():
    tokenizer = VocabTokenizer(WORDS, context_length=12)
    again = VocabTokenizer.from_dict(tokenizer.to_dict())
    assert again.words == tokenizer.words and again.context_length == 12
    assert torch.equal(again(["a red circle"]), tokenizer(["a red circle"]))


@pytest.mark.parametrize("words,context", [([], 16), (["a", "a"], 16), (["Two words"], 16), (["a"], 2)])
def test_bad_vocabularies_are_user_errors(words, context):
    with pytest.raises(UserInputError):
        VocabTokenizer(words, context_length=context)


def test_malformed_dict_is_a_user_error():
    with pytest.raises(UserInputError):
        VocabTokenizer.from_dict({"context_length": 16})


def test_open_clip_text_tower_reads_the_words_through_this_tokenizer():
    import open_clip

    tokenizer = VocabTokenizer(WORDS, context_length=8)
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 8, "patch_size": 4, "layers": 1, "width": 32,
                                                     "head_width": 16},
                           text_cfg={"context_length": 8, "vocab_size": tokenizer.vocab_size, "width": 32,
                                     "heads": 2, "layers": 1}).eval()
    with torch.no_grad():
        features = model.encode_text(tokenizer(["a red circle", "a blue circle", "a red circle"]))
    assert features.shape == (3, 16)
    assert torch.allclose(features[0], features[2])
    assert not torch.allclose(features[0], features[1])
