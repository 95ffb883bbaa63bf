"""Faults injected into real processes and real files: SIGKILL, SIGINT (Ctrl-C), a full disk,
two processes writing to one folder. Each test names what must survive and what must not be left.

The kill points are drawn from a seeded random generator, so a failure reproduces; the drawn
points are printed (pytest -s). CLIP2GAN_FAULT_SEED=N draws other points (a longer hunt by hand).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, written_files
from conftest import REPO_ROOT
from file_server import write_registry

from clip2gan_cli.weights import download

FAULT_SEED = int(os.environ.get("CLIP2GAN_FAULT_SEED", "0"))
BIG = random.Random(8).randbytes(3 << 20)  # 3 MiB: many reads, several kill points
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def _env(**extra) -> dict[str, str]:
    """The test's environment (its own $CLIP2GAN_HOME) for a child process, one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its Ctrl-C handler.

    A test run started in the background of a non-interactive shell (CI) inherits SIGINT *ignored*,
    and Python keeps an ignored SIGINT ignored: the Ctrl-C tests would then test nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _clip2gan(args, env=None, **popen) -> subprocess.Popen:
    """`python -m clip2gan_cli ARGS` as a child process (stdout/stderr piped, text, default SIGINT)."""
    return subprocess.Popen([sys.executable, "-m", "clip2gan_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(**(env or {})), cwd=REPO_ROOT,
                            preexec_fn=_default_sigint, **popen)


def _wait_until(condition, timeout: float = 120.0, every: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def _download_bytes(directory: Path) -> int:
    """Bytes of the download in progress: the process temp (*.part) or the resumable .partial."""
    return sum(p.stat().st_size for p in directory.glob("*.part*") if p.is_file()) if directory.is_dir() else 0


def _temp_files(directory: Path) -> list[str]:
    """Names left behind by an interrupted write: hidden temp/staged files and download temps."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.startswith(".") or p.name.endswith((".tmp", ".part", ".staged")))


# ----------------------------------------------------------------------------------------------
# Downloads


@pytest.mark.slow
def test_download_killed_with_sigkill_at_random_points_resumes_and_verifies(server, tmp_path, clip2gan_home):
    url = server.add("/big.bin", body=BIG, seconds=1.5)  # the body trickles in, so a kill lands mid-transfer
    server.httpd.handle_error = lambda request, address: None  # a killed client is expected: no tracebacks
    registry = write_registry(tmp_path / "reg.toml", {"big": {"url": url, "sha256": BIG_SHA, "size": len(BIG)}})
    folder = clip2gan_home / "weights" / "big"
    rng = random.Random(2026 + FAULT_SEED)
    env = {"CLIP2GAN_HOME": str(clip2gan_home)}
    kill_points, expected_ranges = [], []
    for _ in range(3):
        already = _download_bytes(folder)
        if already >= len(BIG) - 1:  # (almost) every byte is here: nothing left to cut
            break
        point = already + rng.randrange(1, len(BIG) - already)  # somewhere in what is still to come
        kill_points.append(point)
        expected_ranges.append(f"bytes={already}-" if already else None)
        process = _clip2gan(["download-weights", "big", "-q", "--registry", registry], env=env)
        reached = _wait_until(lambda: _download_bytes(folder) >= point or process.poll() is not None)
        process.kill()
        process.communicate(timeout=60)
        if process.returncode == 0:  # the last bytes came in one write and it finished before the kill
            break
        assert reached and process.returncode == -signal.SIGKILL, (point, process.returncode)
        assert not (folder / "big.bin").exists(), "an unverified file got the final name"
    print("SIGKILL when the download held", kill_points, "bytes")
    already = _download_bytes(folder)
    if not (folder / "big.bin").exists() and already < len(BIG):
        expected_ranges.append(f"bytes={already}-")
    final = _clip2gan(["download-weights", "big", "-q", "--registry", registry], env=env)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    assert (folder / "big.bin").read_bytes() == BIG
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["big.bin", "big.bin.sha256"]
    # Every run continued where the killed one stopped (HTTP Range from the bytes it found), never from zero;
    # a run that found every byte only verified them.
    assert server.gets("/big.bin") == expected_ranges, kill_points


class _FullDiskFile:
    """A file object whose writes fail with ENOSPC once `room` bytes have been written."""

    def __init__(self, handle, room: list[int]):
        self.handle, self.room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room[0]:
            self.handle.write(data[: self.room[0]])
            self.room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self.handle.__exit__(*exc_info)


def test_full_disk_during_download_keeps_the_previous_file_and_resumes(server, tmp_path, cli_runner, clip2gan_home,
                                                                       monkeypatch):
    url = server.add("/big.bin", body=BIG)
    registry = write_registry(tmp_path / "reg.toml", {"big": {"url": url, "sha256": BIG_SHA}})
    target = clip2gan_home / "weights" / "big" / "big.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous version")  # a file from an older registry pin: it must survive
    room = [len(BIG) // 3]
    real_open = open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FullDiskFile(handle, room) if str(file).endswith(".part") and "b" in mode else handle

    monkeypatch.setattr(download, "open", open_on_a_full_disk, raising=False)
    result = cli_runner(["download-weights", "big", "-q", "--registry", registry])
    assert_one_line_error(result, "No space left on device")
    assert target.read_bytes() == b"previous version"
    partial = target.with_name("big.bin.partial")
    assert partial.stat().st_size == len(BIG) // 3  # what fitted is kept, resumable
    assert _temp_files(clip2gan_home) == []
    monkeypatch.setattr(download, "open", real_open, raising=False)  # space freed
    again = cli_runner(["download-weights", "big", "-q", "--registry", registry])
    assert again.exit_code == 0, again.output
    assert target.read_bytes() == BIG and server.gets("/big.bin")[-1] == f"bytes={len(BIG) // 3}-"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (a real full disk); skipped where mounting is not allowed (not root, containers)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_real_full_disk_during_download_is_one_line_and_resumes_after_space_is_freed(server, tmp_path, cli_runner,
                                                                                    small_tmpfs, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_HOME", str(small_tmpfs))
    url = server.add("/big.bin", body=BIG)  # 3 MiB into 2 MiB
    registry = write_registry(tmp_path / "reg.toml", {"big": {"url": url, "sha256": BIG_SHA}})
    result = cli_runner(["download-weights", "big", "-q", "--registry", registry])
    assert_one_line_error(result, "No space left on device")
    folder = small_tmpfs / "weights" / "big"
    assert not (folder / "big.bin").exists() and _temp_files(small_tmpfs) == []
    kept = (folder / "big.bin.partial").stat().st_size
    assert 0 < kept < len(BIG)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)  # space freed
    again = cli_runner(["download-weights", "big", "-q", "--registry", registry])
    assert again.exit_code == 0, again.output
    assert (folder / "big.bin").read_bytes() == BIG and server.gets("/big.bin")[-1] == f"bytes={kept}-"


@pytest.mark.slow
def test_ctrl_c_during_a_real_download_leaves_only_the_resumable_partial(server, tmp_path, clip2gan_home):
    url = server.add("/big.bin", body=BIG, seconds=2.0)
    server.httpd.handle_error = lambda request, address: None  # the interrupted client hangs up
    registry = write_registry(tmp_path / "reg.toml", {"big": {"url": url, "sha256": BIG_SHA}})
    folder = clip2gan_home / "weights" / "big"
    process = _clip2gan(["download-weights", "big", "-q", "--registry", registry],
                        env={"CLIP2GAN_HOME": str(clip2gan_home)})
    assert _wait_until(lambda: _download_bytes(folder) > 0 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Interrupted." in err, (process.returncode, err)
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["big.bin.partial"]


# ----------------------------------------------------------------------------------------------
# Training


TRAIN_FLAGS = ["--device", "cpu", "--no-progress", "--seed", "3", "--set", "lpips_net=none", "--set", "batch_size=2",
               "--set", "mapper_hidden_dim=32", "--set", "num_sample_images=2", "--set", "checkpoint_every=1",
               "--set", "sample_every=2", "--set", "log_every=1"]

# Runs the CLI with a checkpoint save that announces itself on stderr and then pauses before the
# rename: a test can kill the process while a save is in flight (the temp file exists, complete or not).
SLOW_SAVE = """
import os, sys, time
from clip2gan_cli.train import checkpoints as trainer
real_write = trainer.write_checkpoint_file
def announced_write(state, path):
    print(f"SAVING {state['step']}", file=sys.stderr, flush=True)
    real_write(state, path)
    time.sleep(float(os.environ.get("SAVE_PAUSE", "0")))
trainer.write_checkpoint_file = announced_write
from clip2gan_cli.cli import main
main()
"""


def _train(args, pause: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(SAVE_PAUSE=str(pause)), cwd=REPO_ROOT,
                            preexec_fn=_default_sigint)


def _kill_when(process: subprocess.Popen, wanted: str, sig=signal.SIGKILL, delay: float = 0.0,
               then=lambda: True) -> list[str]:
    """Send `sig` once stderr shows the line `wanted` and `then()` holds (after `delay` s); returns the stderr lines."""
    timer = threading.Timer(180, process.kill)  # never hang the suite
    timer.start()
    lines = []
    try:
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if line.strip() == wanted:
                assert _wait_until(then, timeout=60)
                time.sleep(delay)
                process.send_signal(sig)
                break
        rest = process.communicate(timeout=60)[1]
        lines += rest.splitlines()
    finally:
        timer.cancel()
    return lines


@pytest.mark.slow
def test_training_killed_at_random_steps_and_during_a_save_resumes_to_the_same_mapper(tiny_pack_name, tmp_path):
    steps = 6
    models = ["--pack", tiny_pack_name, "--data", "synthetic"]
    reference = _train([*models, "--out", tmp_path / "reference", "--steps", steps, *TRAIN_FLAGS])
    rng = random.Random(5 + FAULT_SEED)
    during_save = rng.randint(2, steps - 2)              # killed while writing checkpoint N (not yet renamed)
    between_saves = rng.randint(during_save, steps - 1)  # killed mid-step, once checkpoint M is complete
    pause = rng.uniform(0.0, 0.4)  # how far past checkpoint M the second kill lands (before M + 1 is renamed)
    print(f"SIGKILL during the save of step {during_save}, then {pause:.2f} s after step {between_saves}")
    run = tmp_path / "killed"

    first = _train([*models, "--out", run, "--steps", steps, *TRAIN_FLAGS], pause=0.5)
    lines = _kill_when(first, f"SAVING {during_save}")
    assert first.returncode == -signal.SIGKILL, lines
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert f"step-{during_save - 1:08d}.pt" in checkpoints and f"step-{during_save:08d}.pt" not in checkpoints, \
        checkpoints  # the interrupted save never got its final name; the previous one is whole

    second = _train(["--resume", run, "--steps", steps, "--no-progress"], pause=0.5)
    complete = run / "checkpoints" / f"step-{between_saves:08d}.pt"
    lines = _kill_when(second, f"SAVING {between_saves}", delay=pause, then=complete.exists)
    assert second.returncode == -signal.SIGKILL, lines
    assert f"Resuming {run} from step {during_save - 1} (to {steps})." in lines, lines

    third = _train(["--resume", run, "--steps", steps, "--no-progress"])
    _, err = third.communicate(timeout=180)
    assert third.returncode == 0, err
    assert f"from step {between_saves} (to {steps})" in err, err
    _, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err
    assert (run / "mapper.safetensors").read_bytes() == (tmp_path / "reference" / "mapper.safetensors").read_bytes()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, steps + 1))
    assert _temp_files(run) == []


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_save_exits_130_and_leaves_no_temp_file(tiny_pack_name, tmp_path):
    run = tmp_path / "run"
    process = _train(["--pack", tiny_pack_name, "--data", "synthetic", "--out", run, "--steps", "50", *TRAIN_FLAGS],
                     pause=1.0)
    lines = _kill_when(process, "SAVING 2", sig=signal.SIGINT, delay=0.2)  # Ctrl-C while step 2 is being saved
    assert process.returncode == 130 and "Interrupted." in lines, lines
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000001.pt"]
    assert _temp_files(run) == []


def _train_in_process(cli_runner, tiny_pack, run, steps, *extra):
    return cli_runner(["train", "--generator", tiny_pack.generator, "--clip", tiny_pack.clip_config, "--data",
                       "synthetic", "--out", run, "--steps", steps, *TRAIN_FLAGS, *extra])


def test_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(cli_runner, tiny_pack, tmp_path,
                                                                        monkeypatch):
    # torch.save reports a full disk as RuntimeError("... unexpected pos ..."), after writing part of the file.
    real_save = torch.save
    saves = []

    def save_on_a_full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    run = tmp_path / "run"
    result = _train_in_process(cli_runner, tiny_pack, run, 3, "--set", "lambda_adv=0")  # no critic: small files
    assert_one_line_error(result, "cannot write a checkpoint in", "MiB free on that disk", "--resume")
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000001.pt"]
    assert torch.load(run / "checkpoints" / "step-00000001.pt", weights_only=True)["step"] == 1
    from safetensors import safe_open

    with safe_open(str(run / "mapper.safetensors"), "pt") as handle:
        assert handle.metadata()["clip2gan.train_step"] == "1"
    assert _temp_files(run) == []
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    resumed = cli_runner(["train", "--resume", run, "--steps", "3", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output


def test_real_full_disk_during_checkpoint_and_mapper_saves(cli_runner, tiny_pack, tmp_path, small_tmpfs,
                                                           monkeypatch):
    from clip2gan_cli.train import checkpoints as trainer

    subprocess.run(["mount", "-o", "remount,size=32m", str(small_tmpfs)], check=True)  # room for a few checkpoints
    run = small_tmpfs / "run"
    filler = small_tmpfs / "filler"

    def fill_the_disk():
        try:
            with open(filler, "ab", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * 4096)
        except OSError:  # ENOSPC: the disk is full now
            pass

    real_write, real_mapper = trainer.write_checkpoint_file, trainer.save_mapper_reproducibly
    for stage in ("checkpoint", "mapper"):
        calls = []

        def write(state, path, stage=stage, calls=calls):
            calls.append(path)
            if stage == "checkpoint" and len(calls) == 2:
                fill_the_disk()
            real_write(state, path)

        def save_mapper(mapper, path, metadata, stage=stage, calls=calls):
            if stage == "mapper" and len(calls) == 2:
                fill_the_disk()
            return real_mapper(mapper, path, metadata)

        monkeypatch.setattr(trainer, "write_checkpoint_file", write)
        monkeypatch.setattr(trainer, "save_mapper_reproducibly", save_mapper)
        shutil.rmtree(run, ignore_errors=True)
        filler.unlink(missing_ok=True)
        result = _train_in_process(cli_runner, tiny_pack, run, 3, "--set", "lambda_adv=0")  # no critic: small files
        line = assert_one_line_error(result)
        assert "No space left on device" in line or "MiB free" in line, line
        good = {"checkpoint": 1, "mapper": 2}[stage]  # the mapper of step 2 fails after its checkpoint is whole
        assert max(int(p.stem[5:]) for p in (run / "checkpoints").glob("step-*.pt")) == good
        from safetensors import safe_open

        with safe_open(str(run / "mapper.safetensors"), "pt") as handle:
            assert handle.metadata()["clip2gan.train_step"] == "1"  # the previous good mapper
        assert _temp_files(run) == [], stage
        filler.unlink()  # space freed: the run resumes to the end
        monkeypatch.setattr(trainer, "write_checkpoint_file", real_write)
        monkeypatch.setattr(trainer, "save_mapper_reproducibly", real_mapper)
        resumed = cli_runner(["train", "--resume", run, "--steps", "3", "--no-progress"])
        assert resumed.exit_code == 0, resumed.output


# ----------------------------------------------------------------------------------------------
# generate: two writers, one folder; Ctrl-C


def _generate_args(tiny_pack, out, *extra):
    return ["generate", "a red circle", "-n", "3", *tiny_pack.cli_args(), "--out", out, "--json", *extra]


def test_a_second_run_into_the_same_folder_never_replaces_different_files(cli_runner, tiny_pack, tmp_path):
    out = tmp_path / "out"
    first = cli_runner(_generate_args(tiny_pack, out, "--save-latents", "--truncation", "0.5"))
    assert first.exit_code == 0, first.stderr
    before = {p: Path(p).read_bytes() for p in (json.loads(line)["path"] for line in first.stdout.splitlines())}
    # Same arguments: same bytes under the same names; nothing new is written.
    same = cli_runner(_generate_args(tiny_pack, out, "--save-latents", "--truncation", "0.5"))
    assert [json.loads(line)["path"] for line in same.stdout.splitlines()] == list(before)
    assert len(written_files(out)) == len(before)
    # Other truncation, same prompt and seed: same deterministic names, other bytes -> "-2" names.
    other = cli_runner(_generate_args(tiny_pack, out, "--save-latents", "--truncation", "1.0"))
    assert other.exit_code == 0, other.stderr
    paths = [Path(json.loads(line)["path"]) for line in other.stdout.splitlines()]
    assert all(p.stem.endswith("-2") and p.is_file() for p in paths), paths
    assert {p: Path(p).read_bytes() for p in before} == before  # the first run's files are untouched
    assert len(written_files(out)) == 2 * len(before)


@pytest.mark.slow
def test_two_generate_processes_writing_to_one_folder_keep_every_file(tiny_pack, tmp_path):
    out = tmp_path / "out"
    processes = {psi: _clip2gan(_generate_args(tiny_pack, out, "--truncation", psi)) for psi in ("0.5", "1")}
    results = {psi: process.communicate(timeout=180) for psi, process in processes.items()}
    from clip2gan_cli.imageio import read_png_metadata

    seen = set()
    for psi, (stdout, stderr) in results.items():
        assert processes[psi].returncode == 0, stderr
        for record in map(json.loads, stdout.splitlines()):
            assert record["path"] not in seen, "two processes reported the same file"
            seen.add(record["path"])
            assert float(read_png_metadata(record["path"])["truncation"]) == float(psi), record
    assert len(seen) == 2 * 4 and len(written_files(out)) == 8  # 3 images + 1 grid each
    assert _temp_files(out) == []


@pytest.mark.slow
def test_ctrl_c_during_generate_exits_130_and_leaves_no_temp_file(tiny_pack, tmp_path):
    out = tmp_path / "out"
    process = _clip2gan(["generate", "a red circle", "-n", "400", "--batch-size", "4", *tiny_pack.cli_args(),
                         "--out", out])
    assert _wait_until(lambda: out.is_dir() or process.poll() is not None)
    time.sleep(random.Random(1 + FAULT_SEED).uniform(0.5, 2.0))  # somewhere in model loading, generation or writing
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    # 130 with "Interrupted." from the command; a signal that lands while the interpreter starts or
    # shuts down ends it the way Python ends on SIGINT (-2): either way no traceback and no temp file.
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, (process.returncode, err[-2000:])
    assert _temp_files(out) == []
