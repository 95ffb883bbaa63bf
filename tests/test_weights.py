"""The registry parser (strict, with the line at fault), the packaged weights.toml, local packs, the cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from clip2gan_cli import weights
from clip2gan_cli.errors import RegistryError, UserInputError, WeightsNotFoundError

GOOD_SHA = "a" * 64

VALID = f"""\
schema = 1

[files.gen]
url = "https://example.com/gen.pkl"
sha256 = "{GOOD_SHA}"
size = 10
format = "nvidia-pkl"
license = "test"

[files.clipw]
url = "https://example.com/ViT-B-16.pt"
mirrors = ["https://mirror.example.com/ViT-B-16.pt"]
format = "open_clip"
license = "test"

[packs.faces]
generator = "gen"
clip_model = "ViT-B-16-quickgelu"
clip_pretrained = "openai"
clip_weights = "clipw"
"""


def rejected(text: str) -> str:
    """The message of the RegistryError that parsing `text` raises."""
    with pytest.raises(RegistryError) as caught:
        weights.parse_registry(text, source="reg.toml")
    return str(caught.value)


def test_valid_registry_parses_into_entries():
    registry = weights.parse_registry(VALID, source="reg.toml")
    gen = registry.entry("gen")
    assert gen.urls == ("https://example.com/gen.pkl",) and gen.sha256 == GOOD_SHA and gen.size == 10
    assert gen.filename == "gen.pkl" and gen.format == "nvidia-pkl"
    assert registry.entry("clipw").urls[1] == "https://mirror.example.com/ViT-B-16.pt"
    assert registry.entry("clipw").sha256 is None
    faces = registry.pack("faces")
    assert faces.clip_model == "ViT-B-16-quickgelu" and faces.mapper is None
    assert [e.name for e in registry.files_for("faces")] == ["gen", "clipw"]


def test_unknown_key_is_rejected_with_its_line():
    text = VALID.replace('license = "test"\n\n[files.clipw]', 'license = "test"\nlicence = "typo"\n\n[files.clipw]')
    message = rejected(text)
    assert message.startswith("reg.toml:9:") and "unknown key 'licence'" in message


def test_malformed_sha256_is_rejected_with_its_line():
    message = rejected(VALID.replace(GOOD_SHA, "abc123"))
    assert message.startswith("reg.toml:5:") and "malformed sha256" in message and "64 hex" in message
    assert rejected(VALID.replace(GOOD_SHA, "g" * 64)).startswith("reg.toml:5:")
    assert rejected(VALID.replace(GOOD_SHA, GOOD_SHA + "\\n")).startswith("reg.toml:5:")  # no trailing newline


@pytest.mark.parametrize("size", ["0", "-3", '"10"', "1.5", "true"])
def test_bad_size_is_rejected_with_its_line(size):
    message = rejected(VALID.replace("size = 10", f"size = {size}"))
    assert message.startswith("reg.toml:6:") and "bad size" in message


def test_duplicate_file_name_is_rejected_with_both_lines():
    text = VALID + '\n[files."gen"]\nurl = "https://example.com/x.pkl"\nformat = "nvidia-pkl"\nlicense = "x"\n'
    message = rejected(text)
    assert message.startswith("reg.toml:22:") and "duplicate file name 'gen'" in message and "line 3" in message


def test_pack_naming_an_unknown_file_is_rejected_with_its_line():
    message = rejected(VALID.replace('clip_weights = "clipw"', 'clip_weights = "clip-nope"'))
    assert message.startswith("reg.toml:20:") and "clip_weights 'clip-nope' is not a file" in message


def test_pack_role_with_the_wrong_format_is_rejected():
    message = rejected(VALID.replace('generator = "gen"', 'generator = "clipw"'))
    assert message.startswith("reg.toml:17:") and "expected nvidia-pkl or rosinality-pt or safetensors" in message


@pytest.mark.parametrize("change, line, fragment", [
    (('format = "open_clip"', 'format = "zip"'), 13, "unknown format 'zip'"),
    (('url = "https://example.com/gen.pkl"', 'url = "ftp://example.com/gen.pkl"'), 4, "not an http(s) URL"),
    (('schema = 1', 'schema = 7'), 1, "'schema' must be"),
    (('schema = 1', 'schema = 1\nextra = 2'), 2, "unknown top-level key 'extra'"),
    (('[packs.faces]', '[packs.gen]'), 16, "same name as a file"),
    (('[packs.faces]', '[packs."bad name"]'), 16, "invalid name 'bad name'"),
    (('clip_model = "ViT-B-16-quickgelu"\n', ''), 16, "missing required key 'clip_model'"),
    (('license = "test"\n\n[files.clipw]', '\n[files.clipw]'), 3, "missing required key 'license'"),
    (('url = "https://example.com/gen.pkl"', 'url = "https://example.com/gen.pkl"\nfilename = "../x"'), 5,
     "unusable filename"),
    (('size = 10', 'size = 10\nsize = 11'), 7, "invalid TOML"),
    (('[packs.faces]', '[packs.faces'), 16, "invalid TOML"),
])
def test_other_mistakes_name_their_line(change, line, fragment):
    message = rejected(VALID.replace(*change))
    assert message.startswith(f"reg.toml:{line}:"), message
    assert fragment in message


def test_builtin_pack_may_not_name_files():
    text = VALID + '\n[packs.toys]\nbuiltin = true\ngenerator = "gen"\n'
    message = rejected(text)
    assert message.startswith("reg.toml:24:") and "builtin pack ships its own files" in message


def test_packaged_registry_lists_the_public_files_with_the_known_hashes():
    registry = weights.load_registry()
    known = {
        "stylegan2-ffhq-1024x1024": "a205a346e86a9ddaae702e118097d014b7b8bd719491396a162cca438f2f524c",
        "stylegan2-ffhq-512x512": "d2b1c92f41ce8a64c55f7a75ef06c4c0eef9e17b1eb29aae8c10fb37b3e60478",
        "stylegan2-celebahq-256x256": "8b385aa564a58cdd97b4818620edcb27aeeb614345881b2ff0be91493b53fccc",
        "stylegan2-afhqcat-512x512": "17a83abee464242f8bb40dc6363d33c2fb087066b68fc0147677fdbf21f7a7a9",
        "facenet-vggface2": "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b",
        "inception-fid": "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        "torchvision-alexnet": "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        "torchvision-vgg16": "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    }
    for name, sha256 in known.items():
        assert registry.entry(name).sha256 == sha256, name
    ngc = [e for e in registry.files.values() if e.format == "nvidia-pkl"]
    assert len(ngc) == 9 and all(e.url.startswith("https://api.ngc.nvidia.com/") for e in ngc)
    # OpenAI CLIP URLs carry the file's sha256 as a path segment: the pin must agree with it.
    for name in ("clip-vit-b-16-openai", "clip-vit-b-32-openai"):
        entry = registry.entry(name)
        assert entry.url.split("/")[-2] == entry.sha256 and entry.format == "open_clip"
    ffhq = registry.pack("ffhq-1024")
    assert ffhq.clip_model == "ViT-B-16-quickgelu" and ffhq.clip_pretrained == "openai"
    assert ffhq.discriminator == ffhq.generator == "stylegan2-ffhq-1024x1024"
    assert ffhq.identity == "facenet-vggface2" and ffhq.mapper is None
    assert registry.pack("afhqcat-512").identity is None
    assert registry.pack("shapes").builtin and registry.files_for("shapes") == []
    assert all(e.url.startswith("https://") for e in registry.files.values())


def test_unknown_names_suggest_close_matches():
    registry = weights.load_registry()
    with pytest.raises(WeightsNotFoundError) as caught:
        registry.entry("stylegan2-ffhq-1024")
    assert "stylegan2-ffhq-1024x1024" in caught.value.one_line()
    with pytest.raises(UserInputError):
        registry.pack("ffhq-2048")


def test_cache_dir_and_offline_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP2GAN_HOME", str(tmp_path / "c"))
    assert weights.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CLIP2GAN_HOME")
    assert weights.cache_dir() == Path.home() / ".cache" / "clip2gan"
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("CLIP2GAN_OFFLINE", value)
        assert weights.is_offline() is offline


def test_download_policy_rejects_bad_environment(monkeypatch):
    monkeypatch.setenv("CLIP2GAN_DOWNLOAD_RETRIES", "lots")
    with pytest.raises(UserInputError, match="CLIP2GAN_DOWNLOAD_RETRIES"):
        weights.DownloadPolicy.from_env()


def test_local_pack_is_registered_and_merged(clip2gan_home, tmp_path):
    mapper = tmp_path / "mapper.safetensors"
    mapper.write_bytes(b"m")
    pack = weights.PackEntry(name="my-faces", generator="stylegan2-ffhq-1024x1024",
                             clip_model="ViT-B-16-quickgelu", clip_pretrained="openai",
                             clip_weights="clip-vit-b-16-openai", mapper=str(mapper), description='say "hi"')
    written = weights.register_local_pack(pack)
    assert written == clip2gan_home / "packs.toml"
    loaded = weights.load_registry().pack("my-faces")
    assert loaded.local and loaded.mapper == str(mapper.resolve()) and loaded.description == 'say "hi"'
    # Registering a second pack keeps the first; re-registering replaces.
    weights.register_local_pack(weights.PackEntry(name="other", generator="stylegan2-ffhq-256x256",
                                                  clip_model="ViT-B-32-quickgelu", clip_pretrained="openai"))
    weights.register_local_pack(pack.__class__(**{**pack.__dict__, "description": "v2"}))
    registry = weights.load_registry()
    assert registry.pack("my-faces").description == "v2" and "other" in registry.packs
    assert weights.resolve_reference(registry.pack("my-faces").mapper) == mapper.resolve()


def test_local_pack_cannot_take_a_registry_name_or_a_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="name of a registry entry"):
        weights.register_local_pack(weights.PackEntry(name="ffhq-1024", generator="stylegan2-ffhq-1024x1024",
                                                      clip_model="m", clip_pretrained="t"))
    with pytest.raises(UserInputError, match="neither a registry file nor an existing file"):
        weights.register_local_pack(weights.PackEntry(name="x", generator="stylegan2-ffhq-1024x1024",
                                                      clip_model="m", clip_pretrained="t",
                                                      mapper=str(tmp_path / "absent.safetensors")))


def test_local_pack_of_another_registry_is_left_out_with_a_note(tmp_path):
    weights.register_local_pack(weights.PackEntry(name="mine", generator="stylegan2-ffhq-1024x1024",
                                                  clip_model="m", clip_pretrained="t"))
    other = tmp_path / "other.toml"
    other.write_text(VALID)
    registry = weights.load_registry(other)
    assert "mine" not in registry.packs
    assert any("'mine'" in note for note in registry.notes)


def test_malformed_local_packs_file_names_its_line(clip2gan_home):
    (clip2gan_home / "packs.toml").write_text('schema = 1\n[packs.p]\ngenerator = "stylegan2-ffhq-1024x1024"\nfoo = 1\n')
    with pytest.raises(RegistryError, match=r"packs.toml:4: .*unknown key 'foo'"):
        weights.load_registry()


def test_missing_registry_file_is_a_registry_error(tmp_path, cli_runner):
    result = cli_runner(["download-weights", "--list", "--registry", tmp_path / "nope.toml"])
    assert result.exit_code == 1 and "does not exist" in result.stderr
