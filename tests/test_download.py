"""download-weights / weights.fetch against a real HTTP server on 127.0.0.1 (with Range support)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from clip2gan_cli import weights
from clip2gan_cli.errors import ChecksumError, DownloadError, WeightsNotFoundError
from clip2gan_cli.weights import download
from file_server import PAYLOAD, PAYLOAD_SHA, write_registry


def leftover_files(home: Path) -> list[str]:
    """Names of every file under the cache except lock files."""
    return sorted(p.name for p in home.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_download_success_verifies_and_caches(server, tmp_path, cli_runner, clip2gan_home):
    url = server.add("/model.safetensors")
    registry = write_registry(tmp_path / "reg.toml",
                              {"tiny": {"url": url, "sha256": PAYLOAD_SHA, "size": len(PAYLOAD)}})
    result = cli_runner(["download-weights", "tiny", "--registry", registry])
    assert result.exit_code == 0, result.output
    target = clip2gan_home / "weights" / "tiny" / "model.safetensors"
    assert target.read_bytes() == PAYLOAD
    assert f"tiny: {target}" in result.stdout
    assert leftover_files(clip2gan_home) == ["model.safetensors", "model.safetensors.sha256"]
    # A cached, verified file is not fetched again.
    again = cli_runner(["download-weights", "tiny", "--registry", registry])
    assert again.exit_code == 0, again.output
    assert server.gets("/model.safetensors") == [None]


def test_resume_after_dropped_connection_sends_range(server, tmp_path, clip2gan_home):
    url = server.add("/drop.bin", mode="drop_once")
    registry = weights.load_registry(write_registry(tmp_path / "reg.toml", {"drop": {"url": url, "sha256": PAYLOAD_SHA}}))
    path = weights.fetch("drop", registry=registry, progress=False)
    assert path.read_bytes() == PAYLOAD
    ranges = server.gets("/drop.bin")
    assert ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert leftover_files(clip2gan_home) == ["drop.bin", "drop.bin.sha256"]


def test_interrupted_download_is_resumed_by_the_next_run(server, tmp_path, clip2gan_home, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_DOWNLOAD_RETRIES", "0")
    url = server.add("/flaky.bin", mode="drop_always")
    registry = weights.load_registry(write_registry(tmp_path / "reg.toml", {"flaky": {"url": url, "sha256": PAYLOAD_SHA}}))
    with pytest.raises(DownloadError, match="connection closed after"):
        weights.fetch("flaky", registry=registry, progress=False)
    # The half that arrived is kept as the resumable .partial, and no process temp is left.
    assert leftover_files(clip2gan_home) == ["flaky.bin.partial"]
    server.routes["/flaky.bin"].mode = "ok"
    assert weights.fetch("flaky", registry=registry, progress=False).read_bytes() == PAYLOAD
    assert server.gets("/flaky.bin")[-1] == f"bytes={len(PAYLOAD) // 2}-"


def test_sha256_mismatch_deletes_download_and_names_both_hashes(server, tmp_path, cli_runner, clip2gan_home):
    wrong = PAYLOAD[::-1]
    url = server.add("/wrong.bin", body=wrong)
    registry = write_registry(tmp_path / "reg.toml", {"wrong": {"url": url, "sha256": PAYLOAD_SHA}})
    result = cli_runner(["download-weights", "wrong", "--quiet", "--registry", registry])
    assert result.exit_code == 1
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("Error: sha256 mismatch")
    assert PAYLOAD_SHA in error_lines[0] and hashlib.sha256(wrong).hexdigest() in error_lines[0]
    assert "Traceback" not in result.output
    assert leftover_files(clip2gan_home) == []


def test_size_mismatch_is_a_checksum_error(server, tmp_path, clip2gan_home):
    url = server.add("/short.bin")
    registry = weights.load_registry(write_registry(tmp_path / "reg.toml", {"short": {"url": url, "size": len(PAYLOAD) + 1}}))
    with pytest.raises(ChecksumError, match=f"registry says {len(PAYLOAD) + 1} bytes"):
        weights.fetch("short", registry=registry, progress=False)
    assert leftover_files(clip2gan_home) == []


def test_404_names_url_and_status(server, tmp_path, cli_runner, clip2gan_home):
    url = server.url("/missing.bin")
    registry = write_registry(tmp_path / "reg.toml", {"missing": {"url": url, "sha256": PAYLOAD_SHA}})
    result = cli_runner(["download-weights", "missing", "--registry", registry])
    assert result.exit_code == 1
    assert "HTTP 404" in result.stderr and url in result.stderr
    assert server.gets("/missing.bin") == [None]  # a 404 is not retried
    assert leftover_files(clip2gan_home) == []


def test_mirrors_are_tried_in_order_after_failures(server, tmp_path, clip2gan_home):
    broken = server.add("/a.bin", mode="status", status=404)
    busy = server.add("/b.bin", mode="status", status=503, statuses_then_ok=1)
    registry = weights.load_registry(write_registry(
        tmp_path / "reg.toml", {"mirrored": {"url": broken, "mirrors": [busy], "sha256": PAYLOAD_SHA}}))
    assert weights.fetch("mirrored", registry=registry, progress=False).read_bytes() == PAYLOAD
    # 404 on the first URL moves on at once; the 503 on the mirror is retried after a backoff.
    assert [path for path, _ in server.requests] == ["/a.bin", "/b.bin", "/b.bin"]


def test_offline_mode_never_touches_the_network(server, tmp_path, cli_runner, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    url = server.add("/model.bin")
    registry = write_registry(tmp_path / "reg.toml", {"offline-file": {"url": url, "sha256": PAYLOAD_SHA}})
    result = cli_runner(["download-weights", "offline-file", "--registry", registry])
    assert result.exit_code == 1
    assert "'offline-file' is not in the cache" in result.stderr
    assert "clip2gan download-weights offline-file" in result.stderr
    assert server.requests == []
    with pytest.raises(WeightsNotFoundError):
        weights.fetch("offline-file", registry=weights.load_registry(registry))


def test_offline_mode_uses_a_file_copied_into_the_cache(tmp_path, clip2gan_home, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    registry = weights.load_registry(write_registry(
        tmp_path / "reg.toml", {"copied": {"url": "https://example.invalid/c.bin", "sha256": PAYLOAD_SHA}}))
    target = weights.cached_path(registry.entry("copied"))
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    assert weights.fetch("copied", registry=registry) == target  # hashed once, then trusted
    assert (target.parent / "c.bin.sha256").read_text().strip() == PAYLOAD_SHA
    target.write_bytes(PAYLOAD[:-1] + b"x")
    (target.parent / "c.bin.sha256").unlink()
    with pytest.raises(ChecksumError, match="does not match the registry"):
        weights.fetch("copied", registry=registry)


def test_unpinned_file_records_its_hash_and_warns_once(server, tmp_path, clip2gan_home, capsys):
    url = server.add("/free.bin")
    registry = weights.load_registry(write_registry(tmp_path / "reg.toml", {"free": {"url": url}}))
    path = weights.fetch("free", registry=registry, progress=False)
    first = capsys.readouterr().err
    assert "not pinned" in first and PAYLOAD_SHA in first
    assert (path.parent / "free.bin.sha256").read_text().strip() == PAYLOAD_SHA
    weights.fetch("free", registry=registry, progress=False)
    assert "not pinned" not in capsys.readouterr().err
    # Later downloads are checked against the recorded hash (trust on first use).
    path.unlink()
    server.routes["/free.bin"].body = b"changed" + PAYLOAD
    with pytest.raises(ChecksumError, match=f"expected {PAYLOAD_SHA}"):
        weights.fetch("free", registry=registry, progress=False)


def test_ctrl_c_leaves_no_process_temp_file(server, tmp_path, clip2gan_home, monkeypatch):
    url = server.add("/big.bin", body=PAYLOAD * 4)
    registry = weights.load_registry(write_registry(tmp_path / "reg.toml", {"big": {"url": url}}))
    calls = []

    def interrupt_after_first_chunk(self, count):
        calls.append(count)
        raise KeyboardInterrupt

    monkeypatch.setattr(download._ProgressBar, "advance", interrupt_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        weights.fetch("big", registry=registry, progress=False)
    # Only the resumable bytes remain, under the stable name.
    assert leftover_files(clip2gan_home) == ["big.bin.partial"]
    partial = next(clip2gan_home.rglob("big.bin.partial"))
    assert partial.stat().st_size == calls[0] > 0


def test_pack_expands_to_its_files_and_builtin_pack_needs_none(server, tmp_path, cli_runner, clip2gan_home):
    gen = server.add("/g.pkl", body=b"generator" * 100)
    clip = server.add("/clip.pt", body=b"clip" * 100)
    registry = write_registry(
        tmp_path / "reg.toml",
        {"gen": {"url": gen}, "clipw": {"url": clip, "format": "open_clip"}},
        {"faces": {"generator": "gen", "discriminator": "gen", "clip_model": "ViT-B-16-quickgelu",
                   "clip_pretrained": "openai", "clip_weights": "clipw"},
         "toys": {"builtin": True}})
    result = cli_runner(["download-weights", "faces", "toys", "-q", "--registry", registry])
    assert result.exit_code == 0, result.output
    assert sorted(path for path, _ in server.requests) == ["/clip.pt", "/g.pkl"]  # generator once
    assert "no trained mapper yet" in result.stderr and "clip2gan train --pack faces" in result.stderr
    assert "'toys' is builtin" in result.stderr
    listing = cli_runner(["download-weights", "--list", "--registry", registry])
    assert listing.exit_code == 0
    assert re.search(r"faces .*yes", listing.stdout)


def test_nvidia_pickle_is_converted_once_after_download(server, tmp_path, cli_runner, monkeypatch):
    converted = []

    def fake_convert_checkpoint(path):
        converted.append(Path(path))
        return Path(path).with_suffix(".safetensors")

    fake = types.SimpleNamespace(convert_checkpoint=fake_convert_checkpoint)
    monkeypatch.setitem(sys.modules, "clip2gan_cli.stylegan2.convert", fake)
    url = server.add("/net.pkl", body=b"pickle" * 10)
    registry = write_registry(tmp_path / "reg.toml", {"net": {"url": url, "format": "nvidia-pkl"},
                                                      "other": {"url": server.add("/x.pt"), "format": "open_clip"}})
    result = cli_runner(["download-weights", "--all", "-q", "--registry", registry])
    assert result.exit_code == 0, result.output
    assert [p.name for p in converted] == ["net.pkl"]
    assert "net.safetensors" in result.stdout


def test_usage_errors_exit_2(tmp_path, cli_runner):
    registry = write_registry(tmp_path / "reg.toml", {"a": {"url": "https://example.invalid/a.bin"}})
    assert cli_runner(["download-weights", "--registry", registry]).exit_code == 2
    assert cli_runner(["download-weights", "a", "--all", "--registry", registry]).exit_code == 2


def test_two_processes_fetch_one_file_once(server, tmp_path, clip2gan_home):
    # The server holds the first download half way until the second process says it is waiting
    # on the lock; then both must succeed with one download in all.
    gate = threading.Event()
    url = server.add("/shared.bin", gate=gate)
    registry = write_registry(tmp_path / "reg.toml", {"shared": {"url": url, "sha256": PAYLOAD_SHA}})
    args = [sys.executable, "-m", "clip2gan_cli", "download-weights", "shared", "-q", "--registry", str(registry)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert server.first_request.wait(timeout=120)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    safety = threading.Timer(120, gate.set)  # never hang the suite, even if the lock is broken
    safety.start()
    try:
        second_said = second.stderr.readline()  # blocks until it prints (or exits)
    finally:
        gate.set()
        safety.cancel()
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert "Waiting for another process that is downloading 'shared'" in second_said
    assert first.returncode == 0, err_first
    assert second.returncode == 0, second_said + err_second
    assert server.gets("/shared.bin") == [None]  # one download in all
    target = clip2gan_home / "weights" / "shared" / "shared.bin"
    assert f"shared: {target}" in out_first and f"shared: {target}" in out_second
    assert target.read_bytes() == PAYLOAD


@pytest.mark.slow
def test_downloaded_nvidia_pickle_converts_to_safetensors(server, tmp_path, cli_runner, clip2gan_home):
    """End to end with the real converter: a tiny NVIDIA-structured pickle served over HTTP."""
    pytest.importorskip("clip2gan_cli.stylegan2.convert")
    nvidia_pickles = pytest.importorskip("_nvidia_pickles")
    parity = Path(__file__).parent / "data" / "parity" / "nvidia_small.safetensors"
    if not parity.is_file():
        pytest.skip(f"parity data missing: {parity}")
    from safetensors.torch import load_file

    tensors = load_file(str(parity))
    split = {prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} for prefix in ("G.", "D.")}
    body = nvidia_pickles.dumps_snapshot(split["G."], split["D."])
    url = server.add("/small.pkl", body=body)
    registry = write_registry(tmp_path / "reg.toml", {"small": {"url": url, "format": "nvidia-pkl",
                                                                "sha256": hashlib.sha256(body).hexdigest()}})
    result = cli_runner(["download-weights", "small", "-q", "--registry", registry])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"small: {clip2gan_home / 'weights' / 'small' / 'small.pkl'}"
    converted = Path(lines[1].split(": ", 1)[1])
    assert converted.suffix == ".safetensors" and converted.is_file()
    assert len(load_file(str(converted))) > 0
