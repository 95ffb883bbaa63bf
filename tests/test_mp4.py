"""`clip2gan interpolate --mp4` writes a real H.264 MP4 (PyAV, the `[video]` extra): decodable, every frame, right size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_models import TINY_RESOLUTION

av = pytest.importorskip("av", reason="MP4 needs PyAV: pip install -e '.[video]'")


def _decode(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_interpolate_mp4_decodes_with_every_frame_at_the_generator_size(cli_runner, tiny_pack, tmp_path):
    mp4 = tmp_path / "walk.mp4"
    result = cli_runner(["interpolate", "a red circle", "a blue square", "--frames", "7", "--fps", "10",
                         "--mp4", mp4, "--json", *tiny_pack.cli_args(), "--out", tmp_path / "frames"])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["role"] for line in result.stdout.splitlines()][-1] == "mp4"
    frames = _decode(mp4)
    assert len(frames) == 7
    assert all(frame.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3) for frame in frames)
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 10
    assert not np.array_equal(frames[0], frames[-1])  # the video moves from A to B


def test_save_mp4_pads_odd_sizes_for_yuv420(tmp_path):
    from clip2gan_cli import imageio

    frames = [np.full((17, 21, 3), 40 * k, np.uint8) for k in range(3)]
    decoded = _decode(imageio.save_mp4(tmp_path / "odd.mp4", frames, fps=5))
    assert len(decoded) == 3 and decoded[0].shape == (18, 22, 3)
    assert [int(frame.mean()) for frame in decoded] == pytest.approx([0, 40, 80], abs=3)


def test_the_serve_page_offers_the_same_mp4(tmp_path):
    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.serve.app import ModelSpec, ServeApp

    app = ServeApp(models=load_pack("shapes", device="cpu"), spec=ModelSpec(), workdir=tmp_path / "work")
    answer = app.interpolate({"a": {"text": "a red circle"}, "b": {"text": "a blue square"}, "frames": 5, "mp4": True})
    assert "--mp4" in answer["command"] and answer["mp4"].endswith(".mp4")
    frames = _decode(app.file(answer["mp4"].split("/")[2]))
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
