"""imageio.py: safe reading of hostile/odd images, MTCNN alignment, PNG metadata, GIF/MP4, latents, names."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clip2gan_cli import imageio
from clip2gan_cli.errors import CheckpointError, ImageError, OutputError, UserInputError


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _noise_image(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png_with_declared_size(path, width, height):
    """A valid 16x16 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb header."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


# --- bad inputs ---
def test_missing_zero_byte_directory_and_non_image_files(tmp_path):
    cases = {
        tmp_path / "missing.png": "image not found",
        tmp_path: "not a file",
    }
    (tmp_path / "empty.png").write_bytes(b"")
    cases[tmp_path / "empty.png"] = "empty"
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    cases[tmp_path / "notes.png"] = "not an image"
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message):
            imageio.read_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    path = _save(_noise_image((128, 128)), tmp_path / f"full.{fmt.lower()}", format=fmt)
    truncated = tmp_path / f"cut.{fmt.lower()}"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        imageio.read_image(truncated)


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (20_000, 20_000)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, width, height):
    path = _png_with_declared_size(tmp_path / "bomb.png", width, height)
    with pytest.raises(ImageError, match="decompression bomb"):
        imageio.read_image(path)


def test_a_forged_png_header_over_too_little_image_data_is_refused(tmp_path):
    # 32x32 RGB data under a header claiming 129x16 with a valid checksum: Pillow decodes it quietly with
    # half its rows blank (found by hypothesis in test_fuzz_inputs)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 60)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", 129, 16)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path = tmp_path / "forged.png"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="holds 3,104 of the 6,208 bytes its 129x16 header declares"):
        imageio.read_image(path)


@pytest.mark.parametrize("mode, save", [("RGB", {}), ("RGBA", {}), ("L", {"bits": 4}), ("I;16", {}),
                                        ("P", {"bits": 2}), ("RGB", {"optimize": True})])
def test_every_valid_png_kind_holds_its_declared_rows(tmp_path, mode, save):
    image = Image.new(mode, (37, 21), 3 if mode in ("L", "P", "I;16") else (10, 200, 30))
    path = tmp_path / "ok.png"
    image.save(path, **save)
    assert imageio.read_image(path).size == (37, 21)


def test_images_smaller_than_16_px_are_refused(tmp_path):
    path = _save(Image.new("RGB", (15, 64), "red"), tmp_path / "thin.png")
    with pytest.raises(ImageError, match="at least 16 px"):
        imageio.read_image(path)


# --- odd modes become 8-bit RGB ---
@pytest.mark.parametrize("make, fmt, expected", [
    (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    (lambda: Image.fromarray(np.full((32, 32), 65535, np.uint16)), "PNG", (255, 255, 255)),
    (lambda: Image.fromarray(np.full((32, 32), 32896, np.uint16)), "PNG", (128, 128, 128)),
    (lambda: Image.new("L", (32, 32), 100), "PNG", (100, 100, 100)),
    (lambda: Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "PNG", (255, 255, 255)),
    (lambda: Image.new("RGBA", (32, 32), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
    (lambda: Image.new("LA", (32, 32), (50, 255)), "PNG", (50, 50, 50)),
])
def test_odd_modes_are_converted_to_rgb(tmp_path, make, fmt, expected):
    path = _save(make(), tmp_path / f"odd.{fmt.lower()}", format=fmt)
    image = imageio.read_image(path)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.abs(np.asarray(image)[16, 16].astype(int) - expected).max() <= 3


def test_palette_with_transparency_and_animated_gif_first_frame(tmp_path):
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    path = _save(palette, tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(imageio.read_image(path))[0, 0]) == (255, 255, 255)  # transparent -> white
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    gif = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = np.asarray(imageio.read_image(gif))[5, 5]
    assert first[0] > 200 and first[2] < 50


def test_load_image_tensor_centre_crops_and_scales_to_minus_one_one(tmp_path):
    stripes = np.zeros((32, 48, 3), np.uint8)
    stripes[:, :16] = (255, 0, 0)
    stripes[:, 16:32] = (0, 255, 0)
    stripes[:, 32:] = (0, 0, 255)
    path = _save(Image.fromarray(stripes), tmp_path / "stripes.png")
    tensor = imageio.load_image_tensor(path, 16)
    assert tensor.shape == (1, 3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1
    centre = tensor[0, :, 8, 8]
    assert centre[1] > 0.9 and centre[0] < -0.9  # green middle stripe survives the centre crop


# --- faces ---
@pytest.mark.slow
def test_mtcnn_aligns_the_astronaut_photo_like_ffhq():
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    aligned = imageio.align_face(photo, 256)
    assert aligned.size == (256, 256)
    landmarks = imageio.detect_face_landmarks(aligned)
    assert landmarks is not None
    left_eye, right_eye = landmarks[0], landmarks[1]
    assert abs(left_eye[1] - right_eye[1]) < 0.04 * 256  # eyes level after alignment
    eye_centre = (left_eye + right_eye) / 2
    assert abs(eye_centre[0] - 128) < 0.06 * 256  # face centred horizontally
    assert 0.3 * 256 < eye_centre[1] < 0.55 * 256  # eyes a little above the middle, as in FFHQ
    assert 0.2 * 256 < right_eye[0] - left_eye[0] < 0.45 * 256


def test_no_face_says_use_no_align(tmp_path):
    path = _save(Image.new("RGB", (128, 128), (90, 140, 200)), tmp_path / "sky.png")
    with pytest.raises(ImageError, match="no face found in .*sky.png; use `align=False`"):  # the CLI says --no-align
        imageio.load_image_tensor(path, 64, align=True)


# --- writing ---
def test_png_metadata_round_trip_and_no_temp_files(tmp_path):
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    path = imageio.save_png(tmp_path / "out.png", image, {"prompt": "a red circle", "seed": 3, "hashes": {"g": "ab"}})
    metadata = imageio.read_png_metadata(path)
    assert metadata["prompt"] == "a red circle" and metadata["seed"] == "3" and metadata["hashes"] == '{"g": "ab"}'
    pixels = np.asarray(Image.open(path))
    assert np.array_equal(pixels, imageio.to_uint8(image)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        imageio.save_png(tmp_path / "out.png", torch.zeros(1, 3, 16, 16), {})
    assert list(tmp_path.iterdir()) == []


def test_jpeg_keeps_metadata_as_a_json_comment(tmp_path):
    path = imageio.save_image(tmp_path / "out.jpg", torch.zeros(1, 3, 16, 16), "jpg", {"prompt": "x"})
    with Image.open(path) as image:
        assert image.format == "JPEG" and b'"prompt": "x"' in image.info["comment"]


def test_gif_has_every_frame_and_mp4_without_encoder_is_a_clear_error(tmp_path, monkeypatch):
    frames = torch.rand(5, 3, 16, 16) * 2 - 1
    path = imageio.save_gif(tmp_path / "a.gif", list(imageio.to_uint8(frames)))
    with Image.open(path) as gif:
        assert gif.n_frames == 5
    monkeypatch.setattr(imageio.video, "mp4_encoder", lambda: None)
    with pytest.raises(UserInputError, match="encoder package") as caught:
        imageio.save_mp4(tmp_path / "a.mp4", list(imageio.to_uint8(frames)))
    assert "pip install av" in caught.value.one_line()
    assert not (tmp_path / "a.mp4").exists()


def test_make_grid_tiles_images():
    grid = imageio.make_grid(torch.zeros(5, 3, 8, 8), columns=3, padding=2)
    assert grid.shape == (1, 3, 2 * 10 + 2, 3 * 10 + 2)


def test_latent_files_round_trip_and_shape_checks(tmp_path):
    w_plus = torch.randn(2, 6, 32)
    path = imageio.save_latent(tmp_path / "w.safetensors", w_plus, {"prompt": "x"})
    torch.testing.assert_close(imageio.load_latent(path, 6, 32), w_plus)
    with pytest.raises(UserInputError, match="wrong for this generator"):
        imageio.load_latent(path, 6, 64)
    with pytest.raises(UserInputError, match="wrong for this generator"):
        imageio.load_latent(path, 8, 32)
    single_w = imageio.save_latent(tmp_path / "w1.safetensors", torch.randn(32))
    assert imageio.load_latent(single_w, 6, 32).shape == (1, 6, 32)  # one W broadcast to every layer
    with pytest.raises(UserInputError, match="not found"):
        imageio.load_latent(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        imageio.load_latent(tmp_path / "bad.safetensors")


def test_slugs_are_deterministic_short_and_distinct():
    assert imageio.slugify("a red circle") == "a-red-circle"
    assert imageio.slugify("A red circle!") != imageio.slugify("a red circle")
    assert imageio.slugify("A red circle!") == imageio.slugify("A red circle!")
    assert len(imageio.slugify("x" * 10_000)) <= 48 + 7
    assert imageio.slugify("!!!").startswith("prompt-")


def test_prompts_from_stdin_lines(tmp_path):
    stdin = io.TextIOWrapper(io.BytesIO(b"a red circle\n\n  a blue square  \n"))
    assert imageio.read_prompt_args(["first", "-"], stdin) == ["first", "a red circle", "a blue square"]
    with pytest.raises(UserInputError, match="not UTF-8"):
        imageio.read_prompt_args(["-"], io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))
    with pytest.raises(UserInputError, match="no prompts on stdin"):
        imageio.read_prompt_args(["-"], io.TextIOWrapper(io.BytesIO(b"\n\n")))


def test_output_directory_that_is_a_file_or_read_only(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        imageio.check_output_dir(blocker)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        import os

        if os.access(read_only, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(OutputError, match="not writable"):
            imageio.check_output_dir(read_only / "sub")
    finally:
        read_only.chmod(0o700)


# Every public name of the former single-file imageio module (split into imageio/images, faces, latents,
# video, publish, outputs, prompts) still imports from the package.
FORMER_PUBLIC_NAMES = [
    "IMAGE_FORMATS", "LATENT_KEY", "MAX_PIXELS", "MIN_SIDE", "PNG_CHANNELS", "align_face", "center_crop_resize",
    "check_output_dir", "detect_face_landmarks", "load_image_tensor", "load_latent", "make_grid", "mp4_encoder",
    "pil_to_tensor", "publish_new_file", "read_image", "read_png_metadata", "read_prompt_args", "save_gif",
    "save_image", "save_latent", "save_mp4", "save_png", "slugify", "to_rgb", "to_uint8", "write_edit_outputs",
    "write_generate_outputs", "write_interpolation_outputs",
]


@pytest.mark.parametrize("name", FORMER_PUBLIC_NAMES)
def test_every_former_public_name_imports_from_the_package(name):
    namespace = {}
    exec(f"from clip2gan_cli.imageio import {name}", namespace)
    assert namespace[name] is getattr(imageio, name)
