"""Shared fixtures. Every test gets its own empty cache ($CLIP2GAN_HOME) and no inherited
offline/registry/debug settings, so no test reads or writes the user's ~/.cache/clip2gan.

Fixtures used by more than one test file live here, so no test file imports fixtures; the
helpers they build on stay in their modules (tiny_models, file_server, _nvidia_pickles).
Heavy imports (torch, open_clip) happen inside the fixtures: collecting a CLI-only test file
stays cheap."""
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


# --------------------------------------------------------------------------------------------
# Shared by several test files


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory):
    """One tiny pack on disk for the whole session (treat as read-only: copy it before changing files)."""
    from tiny_models import make_tiny_pack

    return make_tiny_pack(tmp_path_factory.mktemp("tiny_pack"))


@pytest.fixture(scope="session")
def tiny_models(tiny_pack):
    """The tiny pack loaded once per session (frozen models on the CPU)."""
    from tiny_models import load_tiny_models

    return load_tiny_models(tiny_pack)


@pytest.fixture
def tiny_pack_name(tiny_pack) -> str:
    """The tiny pack registered as `tiny` in this test's own $CLIP2GAN_HOME (--pack brings its small D)."""
    from tiny_models import register_tiny_pack

    return register_tiny_pack(tiny_pack, "tiny")


@pytest.fixture
def server():
    """A file server on 127.0.0.1 for this test (file_server.FileServer)."""
    from file_server import FileServer

    file_server = FileServer()
    yield file_server
    file_server.close()


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """The file a hostile payload would create; also a module whose import would create it."""
    from _nvidia_pickles import MARKER_MODULE, touch_code

    marker_path = tmp_path / "PWNED"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / f"{MARKER_MODULE}.py").write_text(touch_code(marker_path) + "\n")
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    return marker_path


@pytest.fixture(scope="module")
def tiny_state():
    """A small generator's NVIDIA-named tensors to hide hostile payloads among."""
    from clip2gan_cli.stylegan2 import build_generator

    G = build_generator(8, z_dim=4, w_dim=4, channel_base=16, channel_max=4, mapping_layers=1,
                        backend="reference", seed=0)
    return {name: tensor.clone() for name, tensor in G.state_dict().items()}


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights, saved as a weights file.

    Built without its loader (which would download); convolutions get He init so pool3 features
    are O(1) instead of vanishing through 90 layers.
    """
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    torch.manual_seed(0)
    with mock.patch.object(inception_module, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(inception_module.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state_dict: None):
        extractor = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in extractor.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(extractor.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, ServeApp, its temp folder) for the builtin shapes pack, one per test module."""
    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.serve.app import ModelSpec, ServeApp
    from serve_fixtures import running_server

    workdir = tmp_path_factory.mktemp("serve_work")
    app = ServeApp(models=load_pack("shapes", device="cpu"), spec=ModelSpec(), workdir=workdir)
    with running_server(app) as url:
        yield url, app, workdir
