"""Bounded property-based fuzzing of every parser that reads user text or user files.

Each property is "a clean result or the project's own error, never anything else": the registry
parser (RegistryError), `TEXT:BETA` (UserInputError), prompt slugs (file-name safe, injective),
stdin prompt decoding (UserInputError for non-UTF-8) and image loading (ImageError for random
bytes and mutated PNG/JPEG/GIF files). Examples are few and deadlines off, so the whole file runs
in a few seconds in CI (CLIP2GAN_FUZZ_EXAMPLES raises the count for a longer run); the database
is off, so nothing is written into the repository.
"""
from __future__ import annotations

import io
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip2gan_cli import imageio, weights
from clip2gan_cli.errors import ImageError, RegistryError, UserInputError
from clip2gan_cli.pipeline import parse_beta, parse_edit, validate_prompts

# CLIP2GAN_FUZZ_EXAMPLES=2000 runs a longer fuzz session by hand; CI uses the small default.
FUZZ = settings(max_examples=int(os.environ.get("CLIP2GAN_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SHA = "a" * 64

# ----------------------------------------------------------------------------------------------
# Registry parser


REGISTRY_LINES = [
    "schema = 1", "schema = 2", "schema = 'one'", "[files.a]", "[files.b]", "[files.a]", "[packs.p]", "[packs.a]",
    "[files]", "[other]", 'url = "https://example.com/a.bin"', 'url = "ftp://x"', f'sha256 = "{SHA}"',
    'sha256 = "xyz"', "size = 10", "size = -1", 'format = "safetensors"', 'format = "exe"', 'license = "MIT"',
    'generator = "a"', 'generator = "missing"', 'clip_model = "ViT-B-16"', 'clip_pretrained = "openai"',
    "builtin = true", 'mirrors = ["https://m.example.com/a.bin"]', "unknown = 1", '"quoted.key" = 1',
    "[files.'odd name']", "[files.\"x.y\"]", "a.b.c = 1", '"""', "x = '''", "# comment", "", "=", "[", "]]",
    "\x00", "files = 3", "packs = []",
]


@FUZZ
@given(st.lists(st.sampled_from(REGISTRY_LINES), max_size=14))
def test_registry_made_of_plausible_lines_parses_or_names_a_registry_error(lines):
    text = "\n".join(lines)
    try:
        registry = weights.parse_registry(text, source="fuzz.toml")
    except RegistryError as error:
        assert str(error).startswith("fuzz.toml"), str(error)
        return
    for entry in registry.files.values():  # whatever parses is well-formed
        assert entry.urls and all(url.startswith(("http://", "https://")) for url in entry.urls)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)


@FUZZ
@given(st.text(max_size=300))
def test_registry_from_arbitrary_text_parses_or_is_a_registry_error(text):
    try:
        weights.parse_registry(text, source="fuzz.toml")
    except RegistryError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_registry_file_of_random_bytes_is_a_registry_error(data):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "reg.toml"
        path.write_bytes(data)
        try:
            weights.load_registry(path)
        except RegistryError:
            pass


@FUZZ
@given(st.sampled_from(["files", "packs"]), st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True))
def test_registry_with_a_duplicate_name_names_both_lines(kind, name):
    body = 'url = "https://example.com/a.bin"\nformat = "safetensors"\nlicense = "x"\n'
    if kind == "files":
        text = f"schema = 1\n[files.{name}]\n{body}\n[files.{name}]\n{body}"
    else:
        text = f"schema = 1\n[files.g]\n{body}\n[packs.{name}]\ngenerator = \"g\"\n[packs.{name}]\ngenerator = \"g\"\n"
    with pytest.raises(RegistryError, match=rf"duplicate .*'{re.escape(name)}' \(first defined at line \d+\)"):
        weights.parse_registry(text, source="fuzz.toml")


# ----------------------------------------------------------------------------------------------
# TEXT:BETA and --beta


@FUZZ
@given(st.text(max_size=80))
def test_edit_spec_parses_to_text_and_finite_beta_or_is_a_user_error(spec):
    try:
        text, beta = parse_edit(spec)
    except UserInputError as error:
        assert "\n" not in error.one_line()
        return
    assert text and text == text.strip() and math.isfinite(beta)
    assert spec.rpartition(":")[0].strip() == text


@FUZZ
@given(st.one_of(st.text(max_size=30), st.floats().map(repr), st.integers().map(str)))
def test_beta_is_a_finite_float_or_a_user_error(text):
    try:
        value = parse_beta(text)
    except UserInputError as error:
        assert "`beta`" in str(error)  # the CLI says --beta
        return
    assert math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Prompts: slugs and stdin


SLUG_RE = re.compile(r"(?:[a-z0-9]+(?:-[a-z0-9]+)*|prompt)(?:-[0-9a-f]{6})?")


@FUZZ
@given(st.text(max_size=10_000))
def test_slug_is_file_name_safe_short_and_deterministic(text):
    slug = imageio.slugify(text)
    assert SLUG_RE.fullmatch(slug), slug
    assert len(slug) <= 48 + 7
    assert imageio.slugify(text) == slug


@FUZZ
@given(st.text(max_size=60), st.text(max_size=60))
def test_different_prompts_never_share_a_slug(a, b):
    if a != b:
        assert imageio.slugify(a) != imageio.slugify(b), (a, b)


@FUZZ
@given(st.binary(max_size=400))
def test_stdin_bytes_give_prompts_or_a_user_error(data):
    try:
        prompts = validate_prompts(imageio.read_prompt_args(["-"], stdin=io.BytesIO(data)))
    except UserInputError as error:
        assert "stdin" in str(error) or "prompt" in str(error)
        return
    assert prompts == [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def test_non_utf8_stdin_names_the_byte():
    with pytest.raises(UserInputError, match=r"stdin is not UTF-8 text \(byte 2\)"):
        imageio.read_prompt_args(["-"], stdin=io.BytesIO(b"ok\xff\xfe\n"))


# ----------------------------------------------------------------------------------------------
# Image loading


def _image_bytes(fmt: str, mode: str = "RGB", size=(32, 32), **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 100)
    for x in range(0, size[0], 4):  # some texture so compressed formats have real content
        image.putpixel((x, x % size[1]), (x * 7 % 256, 5, 9) if mode == "RGB" else x % 256)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


VALID = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}


def _read_bytes(data: bytes, suffix: str = ".png"):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            image = imageio.read_image(path)
        except ImageError as error:
            assert "\n" not in error.one_line()
            return None
        assert image.mode == "RGB" and min(image.size) >= imageio.MIN_SIDE
        return image


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".png", ".jpg", ".gif", ".bin"]))
def test_random_bytes_are_an_image_error(data, suffix):
    _read_bytes(data, suffix)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.data())
def test_mutated_image_files_load_or_are_an_image_error(fmt, data):
    raw = bytearray(VALID[fmt])
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(raw) - 1), label="position")
        raw[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(1, len(raw)), label="keep")
    _read_bytes(bytes(raw[:cut]))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans())
def test_png_header_with_any_declared_size_is_refused_or_read(width, height, fix_crc):
    import struct
    import zlib

    raw = bytearray(VALID["PNG"])
    raw[16:24] = struct.pack(">II", width, height)  # IHDR width/height
    if fix_crc:  # a forger fixes the checksum so the header looks valid
        raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    image = _read_bytes(bytes(raw))
    if image is not None:
        # Read only as the declared size, and only when the real pixel data (32 rows of a filter byte
        # + 32 RGB pixels) holds every declared row: a forged smaller size decodes from that data.
        assert image.size == (width, height)
        assert height * (1 + 3 * width) <= 32 * (1 + 3 * 32)
