"""Shared fixtures. Every test gets its own empty cache ($CLIP2GAN_HOME) and no inherited
offline/registry/debug settings, so no test reads or writes the user's ~/.cache/clip2gan."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clip2gan_home(tmp_path_factory, monkeypatch) -> Path:
    """An empty cache directory for this test, exported as CLIP2GAN_HOME."""
    home = tmp_path_factory.mktemp("clip2gan_home")
    monkeypatch.setenv("CLIP2GAN_HOME", str(home))
    for variable in ("CLIP2GAN_OFFLINE", "CLIP2GAN_REGISTRY", "CLIP2GAN_DEBUG"):
        monkeypatch.delenv(variable, raising=False)
    # Downloads in tests retry fast (the default backoff is seconds).
    monkeypatch.setenv("CLIP2GAN_DOWNLOAD_BACKOFF", "0.01")
    monkeypatch.setenv("CLIP2GAN_DOWNLOAD_TIMEOUT", "10")
    return home


@pytest.fixture
def cli_runner():
    """Invoke the clip2gan Typer app in-process: `cli_runner(["download-weights", ...])`."""
    from typer.testing import CliRunner

    from clip2gan_cli.cli import app

    runner = CliRunner()

    def invoke(args, **kwargs):
        return runner.invoke(app, [str(arg) for arg in args], **kwargs)

    return invoke


def run_clip2gan(args, env=None, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m clip2gan_cli ARGS` in a fresh process (the current environment plus `env`)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clip2gan_cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT, **kwargs)


@pytest.fixture
def clip2gan_subprocess():
    """`run_clip2gan` as a fixture, for tests that need a fresh interpreter."""
    return run_clip2gan
