"""clip.py: local-only loading, QuickGELU for OpenAI weights, normalised features, differentiable images."""
from __future__ import annotations

import warnings

import pytest
import torch

from tiny_models import TINY_CLIP_DIM, make_tiny_clip, tiny_clip_config


@pytest.fixture(scope="module")
def clip():
    return make_tiny_clip(seed=0)


def _activation_types(model):
    return {type(module).__name__ for module in model.modules() if "GELU" in type(module).__name__}


def test_openai_tag_on_plain_vit_b_16_gets_quick_gelu():
    from clip2gan_cli.clip import build_clip_module, resolve_clip_config

    with torch.device("meta"):  # the real architecture, without allocating its 150M weights
        model = build_clip_module(resolve_clip_config("ViT-B-16", "openai"))
    assert _activation_types(model) == {"QuickGELU"}


def test_quickgelu_model_name_and_laion_tag_choose_their_own_activation():
    from clip2gan_cli.clip import build_clip_module, resolve_clip_config

    with torch.device("meta"):
        quick = build_clip_module(resolve_clip_config("ViT-B-16-quickgelu", "openai"))
        laion = build_clip_module(resolve_clip_config("ViT-B-16", "laion2b_s34b_b88k"))
    assert _activation_types(quick) == {"QuickGELU"}
    assert _activation_types(laion) == {"GELU"}


def test_pretrained_tag_without_local_weights_is_refused_not_downloaded():
    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.errors import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="no local weights"):
        load_clip("ViT-B-16", "openai", weights_path=None, device="cpu")


def test_unknown_model_name_is_a_user_error():
    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.errors import UserInputError

    with pytest.raises(UserInputError, match="unknown CLIP model"):
        load_clip("ViT-Nope-99", pretrained=None, device="cpu")


def test_features_are_unit_length_float32(clip):
    text = clip.encode_text(["a red circle", "a blue square"])
    image = clip.encode_image(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert text.shape == (2, TINY_CLIP_DIM) and image.shape == (3, TINY_CLIP_DIM)
    assert text.dtype == image.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    assert clip.embed_dim == TINY_CLIP_DIM and clip.context_length == 16


@pytest.mark.parametrize("size", [(16, 16), (40, 40), (20, 30)])
def test_encode_image_is_differentiable_at_any_size(clip, size):
    images = (torch.rand(2, 3, *size) * 2 - 1).requires_grad_(True)
    clip.encode_image(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in clip.parameters())  # frozen: only the input gets gradients


def test_preprocess_resizes_with_antialias_and_applies_mean_std(clip):
    flat = torch.full((1, 3, 64, 64), 0.0)  # mid-grey in [-1, 1] -> 0.5 -> (0.5 - 0.5) / 0.5 = 0
    out = clip.preprocess(flat)
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_long_prompts_are_truncated_with_one_warning(clip):
    long_prompt = "a red circle " * 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = clip.encode_text([long_prompt, long_prompt + "blue", "a red circle"])
    truncation = [w for w in caught if "truncated" in str(w.message)]
    assert len(truncation) == 1 and "2 prompt(s)" in str(truncation[0].message)
    assert torch.isfinite(features).all()


def test_long_prompt_with_open_clip_bpe_tokenizer_warns_once():
    config = tiny_clip_config()
    del config["tokenizer"]  # open_clip's BPE tokenizer (ships inside open_clip)
    config["model_cfg"]["text_cfg"]["vocab_size"] = 49408
    bpe_clip = make_tiny_clip(seed=1, config=config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bpe_clip.encode_text(["word " * 100])
    assert sum("truncated" in str(w.message) for w in caught) == 1


def test_unknown_words_are_named_with_the_known_vocabulary(clip):
    with pytest.warns(UserWarning, match=r"does not know the word\(s\) purple.*it knows: a, an, photo"):
        clip.encode_text(["a purple circle"])


def test_empty_prompt_is_refused(clip):
    from clip2gan_cli.errors import UserInputError

    with pytest.raises(UserInputError, match="empty prompt"):
        clip.encode_text(["  "])


def test_weights_round_trip_through_a_local_safetensors_file(clip, tmp_path):
    from safetensors.torch import save_file

    from clip2gan_cli.clip import load_clip

    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    reloaded = load_clip("tiny-clip", pretrained=None, weights_path=path, config=tiny_clip_config(), device="cpu")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(reloaded.encode_image(images), clip.encode_image(images))
    torch.testing.assert_close(reloaded.encode_text(["a red circle"]), clip.encode_text(["a red circle"]))
    assert not reloaded.training


def test_torchscript_archive_weights_load_like_openai_files(clip, tmp_path):
    from clip2gan_cli.clip import _is_torchscript_archive, load_clip

    path = tmp_path / "tiny.pt"
    tokens = clip.tokenize(["a red circle"])
    traced = torch.jit.trace(clip.model, (torch.zeros(1, 3, 16, 16), tokens), check_trace=False)
    traced.save(str(path))
    assert _is_torchscript_archive(path)
    reloaded = load_clip("tiny-clip", pretrained=None, weights_path=path, config=tiny_clip_config(), device="cpu")
    torch.testing.assert_close(reloaded.encode_text(["a red circle"]), clip.encode_text(["a red circle"]))


def test_corrupt_or_mismatched_weights_are_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    from clip2gan_cli.clip import load_clip
    from clip2gan_cli.errors import CheckpointError

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(wrong))
    for path in (garbage, wrong):
        with pytest.raises(CheckpointError, match="cannot load CLIP weights"):
            load_clip("tiny-clip", pretrained=None, weights_path=path, config=tiny_clip_config(), device="cpu")
