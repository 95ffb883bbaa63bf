"""`clip2gan serve` over HTTP (no browser): the page's requests give the CLI's files, byte for byte;
bad input gets one line and the server keeps going; concurrent requests never mix outputs."""
from __future__ import annotations

import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error
from serve_fixtures import get, post, running_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def _download(base, url) -> bytes:
    status, body, _ = get(base, url)
    assert status == 200, body
    return body


def _run_shown_command(cli_runner, command: str, out: Path):
    """Run the command the page shows (`clip2gan ...`) in-process, writing into `out`."""
    args = shlex.split(command)
    assert args[0] == "clip2gan"
    result = cli_runner([*args[1:], "--out", out, "--json"])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_generate_downloads_are_the_cli_files_byte_for_byte(served, cli_runner, tmp_path, monkeypatch):
    base, _, _ = served
    status, answer = post(base, "/api/generate", {"prompts": "a red circle\n\na blue square", "n": 3, "seed": 7,
                                                  "truncation": 0.8, "prior": "text"})
    assert status == 200, answer
    assert [(image["prompt"], image["index"]) for image in answer["images"]] == \
        [("a red circle", i) for i in range(3)] + [("a blue square", i) for i in range(3)]
    monkeypatch.chdir(tmp_path)
    records = _run_shown_command(cli_runner, answer["command"], tmp_path / "cli")
    by_name = {Path(r["path"]).name: Path(r["path"]).read_bytes() for r in records if r["role"] == "image"}
    assert sorted(by_name) == sorted(image["name"] for image in answer["images"])
    for image in answer["images"]:
        assert _download(base, image["url"]) == by_name[image["name"]], image["name"]


@pytest.mark.parametrize("options, neutrals", [
    ({"edits": [{"text": "blue", "beta": 1.25}], "neutral": "auto", "direction": "image", "layers": "4:"},
     ["Neutral for 'blue': 'red' (inferred from the image)"]),
    ({"edits": [{"text": "blue", "beta": 1.5}, {"text": "large", "beta": -0.5}], "neutral": "none",
      "direction": "text", "layers": "all"}, []),
    ({"edits": [{"text": "green", "beta": 2}], "neutral": "text", "neutral_text": "red", "direction": "text",
      "layers": "2:6"}, []),
])
def test_edit_result_and_latent_are_the_cli_files_and_beta_round_trips(served, cli_runner, tmp_path, monkeypatch,
                                                                        options, neutrals):
    base, _, _ = served
    _, generated = post(base, "/api/generate", {"prompts": "a red circle", "n": 1, "seed": 3})
    status, source = post(base, "/api/use", {"url": generated["images"][0]["url"]})
    assert status == 200, source
    request = {"image": source["image"], **options}
    status, first = post(base, "/api/edit", request)
    assert status == 200, first
    assert first["neutrals"] == neutrals
    # the command shown reproduces the files: run it on the downloaded image
    monkeypatch.chdir(tmp_path)
    (tmp_path / source["name"]).write_bytes(_download(base, source["url"]))
    records = {r["role"]: Path(r["path"]) for r in _run_shown_command(cli_runner, first["command"], tmp_path / "cli")}
    for role in ("edited", "reconstruction", "sheet", "latent"):
        assert _download(base, first[role]) == records[role].read_bytes(), role
    # another beta changes the pixels; going back gives the same bytes again
    moved = post(base, "/api/edit", {**request, "edits": [{**options["edits"][0], "beta": 4}, *options["edits"][1:]]})[1]
    back = post(base, "/api/edit", request)[1]
    pixels = lambda url: np.asarray(Image.open(io.BytesIO(_download(base, url))))  # noqa: E731
    assert not np.array_equal(pixels(moved["edited"]), pixels(first["edited"]))
    assert _download(base, back["edited"]) == _download(base, first["edited"])
    assert np.array_equal(pixels(back["reconstruction"]), pixels(moved["reconstruction"]))  # metadata names the beta


def test_model_info_shows_the_mappers_edit_defaults_and_hashes(served):
    base, app, _ = served
    status, body, _ = get(base, "/api/model")
    info = json.loads(body)
    config = app.models.mapper.config
    assert info["pack"] == "shapes" and info["device"] == "cpu"
    assert info["hashes"] == app.models.file_hashes()
    assert info["edit_defaults"]["beta"] == config.edit_beta
    assert info["edit_defaults"]["direction"] == config.edit_direction
    assert info["edit_defaults"]["neutral"] == config.edit_neutral
    assert info["command"] == "clip2gan serve"


def test_interpolate_frames_and_gif_are_the_cli_files(served, cli_runner, tmp_path, monkeypatch):
    base, _, _ = served
    status, answer = post(base, "/api/interpolate", {"a": {"text": "a red circle"}, "b": {"text": "a blue square"},
                                                     "frames": 4, "fps": 8, "mp4": False})
    assert status == 200, answer
    assert len(answer["frames"]) == 4 and answer["gif"] and answer["mp4"] is None
    monkeypatch.chdir(tmp_path)
    records = _run_shown_command(cli_runner, answer["command"], tmp_path / "cli")
    frames = [Path(r["path"]) for r in records if r["role"] == "frame"]
    assert [_download(base, url) for url in answer["frames"]] == [path.read_bytes() for path in frames]
    assert _download(base, answer["gif"]) == (tmp_path / Path(answer["gif"]).name).read_bytes()


def test_two_sessions_at_once_never_mix_seeds(served):
    base, _, _ = served
    requests = [{"prompts": "a red circle", "n": 4, "seed": seed} for seed in (1, 2)]
    serial = [[_download(base, i["url"]) for i in post(base, "/api/generate", r)[1]["images"]] for r in requests]
    assert serial[0] != serial[1]
    results: dict[int, list] = {0: [], 1: []}

    def session(k):
        for _ in range(4):
            answer = post(base, "/api/generate", requests[k])[1]
            results[k].append([_download(base, i["url"]) for i in answer["images"]])

    threads = [threading.Thread(target=session, args=(k,)) for k in (0, 1)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for k in (0, 1):
        assert results[k] == [serial[k]] * 4


def _png(width, height, rows_kept=None) -> bytes:
    """A grey RGB PNG; rows_kept < height gives a truncated image stream under a full header."""
    raw = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height if rows_kept is None else rows_kept))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name, data, fragment", [
    ("notes.png", b"just some text", "notes.png is not an image"),
    ("bomb.png", _png(10000, 10000, rows_kept=1), "decompression bomb"),
    ("cut.png", _png(64, 64, rows_kept=10), "cut.png is truncated or corrupt"),
    ("empty.png", b"", "empty"),
])
def test_bad_uploads_get_one_line_naming_the_upload(served, name, data, fragment):
    base, _, workdir = served
    status, answer = post(base, f"/api/upload?name={name}", raw=data)
    assert status == 400 and fragment in answer["error"], answer
    assert str(workdir) not in answer["error"] and "\n" not in answer["error"]
    assert post(base, "/api/generate", {"prompts": "a red circle", "n": 1})[0] == 200  # still serving


def test_a_4000x4000_photo_is_edited(served):
    base, _, _ = served
    buffer = io.BytesIO()
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(gradient, (4000, 1))] * 3, -1)).save(buffer, format="JPEG", quality=80)
    status, source = post(base, "/api/upload?name=photo.jpg", raw=buffer.getvalue())
    assert status == 200, source
    status, answer = post(base, "/api/edit", {"image": source["image"], "edits": [{"text": "red", "beta": 1}],
                                              "neutral": "none", "direction": "text", "layers": "all"})
    assert status == 200, answer
    assert Image.open(io.BytesIO(_download(base, answer["edited"]))).size == (32, 32)


@pytest.mark.parametrize("path, payload, fragment", [
    ("/api/generate", {"prompts": "  \n "}, "empty prompt"),
    ("/api/generate", {"prompts": "a red circle", "n": 0}, "n must be between 1 and 64"),
    ("/api/generate", {"prompts": "a red circle", "n": "eight"}, "n must be a whole number"),
    ("/api/generate", {"prompts": "a red circle", "prior": "magic"}, "unknown prior"),
    ("/api/edit", {"image": "nope", "edits": [{"text": "blue", "beta": 1}]}, "no image to edit"),
    ("/api/interpolate", {"a": {"text": ""}, "b": {"text": "a blue square"}}, "empty prompt"),
    ("/api/interpolate", {"a": {"text": "a red circle"}, "b": {"text": "x"}, "frames": 1}, "frames must be"),
    ("/api/use", {"url": "/files/../../etc/passwd"}, "gone from the server"),
])
def test_bad_requests_get_one_line(served, path, payload, fragment):
    base, _, _ = served
    status, answer = post(base, path, payload)
    assert status == 400 and fragment in answer["error"], answer


def test_beta_out_of_range_and_bad_layers_in_edit(served):
    base, _, _ = served
    _, generated = post(base, "/api/generate", {"prompts": "a red circle", "n": 1})
    _, source = post(base, "/api/use", {"url": generated["images"][0]["url"]})
    request = {"image": source["image"], "edits": [{"text": "blue", "beta": 1}], "neutral": "none",
               "direction": "text", "layers": "all"}
    for change, fragment in [({"edits": [{"text": "blue", "beta": 11}]}, "between -10 and 10"),
                             ({"edits": [{"text": "blue", "beta": "NaN"}]}, "between -10 and 10"),
                             ({"edits": [{"text": " ", "beta": 1}]}, "empty edit text"),
                             ({"layers": "9:"}, "selects no rows"),
                             ({"neutral": "text", "neutral_text": ""}, "empty neutral text")]:
        status, answer = post(base, "/api/edit", {**request, **change})
        assert status == 400 and fragment in answer["error"], (change, answer)


def test_unknown_words_come_back_as_a_warning(served):
    base, _, _ = served
    status, answer = post(base, "/api/generate", {"prompts": "a glorp circle", "n": 1})
    assert status == 200 and len(answer["images"]) == 1
    assert any("glorp" in line for line in answer["warnings"]), answer["warnings"]


def test_no_typed_path_reaches_the_file_system(served, tmp_path):
    base, app, workdir = served
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(outside)
    before = sorted(p for p in tmp_path.rglob("*"))
    # a path as an interpolation end is a prompt (the file is not read); as an upload name it is only a label
    status, answer = post(base, "/api/interpolate", {"a": {"text": str(outside)}, "b": {"text": "a blue square"},
                                                     "frames": 2})
    assert status == 200, answer
    status, source = post(base, f"/api/upload?name={tmp_path}/../../my%20x.png", raw=outside.read_bytes())
    assert status == 200 and source["name"] == "my x.png"
    for url in ("/files/..%2F..%2Fetc%2Fpasswd/passwd", f"/files/{outside}", "/files/x/../../secret.png"):
        assert get(base, url)[0] == 404
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert all(workdir in path.parents for path in app._files.values())


def test_the_page_references_no_other_host(served):
    base, _, _ = served
    status, body, headers = get(base, "/")
    page = body.decode("utf-8")
    assert status == 200 and "<title>clip2gan</title>" in page
    for marker in ("http://", "https://", "//cdn", "src=\"//", "href=\"//", "@import", "url("):
        assert marker not in page, marker
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_port_in_use_is_one_line_and_exit_1(cli_runner):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli_runner(["serve", "--port", port])
    assert_one_line_error(result, f"port {port}", "in use", "--port")


def test_serve_runs_until_ctrl_c_then_exits_130_leaving_nothing(tmp_path):
    import signal

    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "clip2gan_cli", "serve", "--port", "0"], cwd=REPO_ROOT,
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert line.startswith("clip2gan serve: http://127.0.0.1:"), line
        base = line.split()[2].rstrip("/")
        assert post(base, "/api/generate", {"prompts": "a red circle", "n": 2})[0] == 200
        assert any(tmp_path.rglob("*.png"))
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert list(tmp_path.iterdir()) == []


def test_help_does_not_import_the_server():
    code = ("import sys; import clip2gan_cli.cli; "
            "print(sorted(m for m in ('torch', 'http.server', 'clip2gan_cli.serve.app', 'gradio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.stdout.strip() == "[]", result.stderr


def test_a_face_pack_upload_without_a_detectable_face_gets_one_line(tiny_pack, tmp_path, monkeypatch):
    from facenet_pytorch import InceptionResnetV1

    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.serve.app import ModelSpec, ServeApp
    from tiny_models import register_tiny_pack

    monkeypatch.setenv("CLIP2GAN_HOME", str(tmp_path / "home"))
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), tmp_path / "id.pt")
    register_tiny_pack(tiny_pack, "tinyface", identity=str(tmp_path / "id.pt"))
    app = ServeApp(models=load_pack("tinyface", device="cpu"), spec=ModelSpec(pack="tinyface"),
                   workdir=tmp_path / "work")
    flat = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 220)).save(flat, format="PNG")
    with running_server(app) as base:
        status, answer = post(base, "/api/upload?name=flat.png", raw=flat.getvalue())
        assert status == 400 and "no face found in flat.png" in answer["error"], answer
        assert "clearly visible face" in answer["error"] and "align" not in answer["error"]
        assert "\n" not in answer["error"] and str(tmp_path) not in answer["error"]
        assert post(base, "/api/generate", {"prompts": "a red circle", "n": 1})[0] == 200  # still serving
