"""One --clip parser for every command (packs.clip_spec): train records what generate/edit load."""
from __future__ import annotations

import pytest

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.packs import parse_clip_spec


@pytest.mark.parametrize("spec", ["ViT-B-16", ":openai", "ViT-B-16:", "  "])
def test_malformed_spec_is_one_user_error_with_the_accepted_forms(spec):
    with pytest.raises(UserInputError, match="malformed `clip`") as caught:  # the CLI says --clip
        parse_clip_spec(spec)
    assert "MODEL:TAG" in caught.value.hint and "clip_config.json" in caught.value.hint


def test_missing_clip_config_names_the_path(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        parse_clip_spec(str(tmp_path / "clip_config.json"))


def test_local_forms_record_resolved_paths_as_train_sources(tmp_path):
    (tmp_path / "clip_config.json").write_text("{}")
    for spec in (str(tmp_path), str(tmp_path / "clip_config.json")):  # the directory or the file itself
        parsed = parse_clip_spec(spec)
        assert parsed.kind == "config" and parsed.config == tmp_path / "clip_config.json"
        assert parsed.sources() == {"clip_model": str((tmp_path / "clip_config.json").resolve()),
                                    "clip_pretrained": "local",
                                    "clip_weights": str((tmp_path / "clip.safetensors").resolve())}
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    parsed = parse_clip_spec(f"ViT-B-32:{weights}")
    assert parsed.kind == "file" and parsed.model == "ViT-B-32"
    assert parsed.sources() == {"clip_model": "ViT-B-32", "clip_pretrained": str(weights.resolve()),
                                "clip_weights": str(weights.resolve())}


def test_model_tag_finds_the_registry_file_and_an_unknown_tag_is_one_error():
    from clip2gan_cli.errors import WeightsNotFoundError

    parsed = parse_clip_spec("ViT-B-16:openai")  # the registry's packs name ViT-B-16-quickgelu: same weights
    assert parsed.kind == "registry" and parsed.weights == "clip-vit-b-16-openai"
    assert parsed.sources() == {"clip_model": "ViT-B-16", "clip_pretrained": "openai",
                                "clip_weights": "clip-vit-b-16-openai"}
    with pytest.raises(WeightsNotFoundError, match="no registry weights for CLIP ViT-B-16:laion"):
        parse_clip_spec("ViT-B-16:laion")
