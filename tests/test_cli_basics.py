"""The CLI's foundation: fast import (no torch), --version, --help, the error contract, `python -m`."""
from __future__ import annotations

import subprocess
import sys

from clip2gan_cli import __version__


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, clip2gan_cli.cli; "
            "heavy = [m for m in ('torch', 'torchvision', 'open_clip', 'numpy', 'lpips') if m in sys.modules]; "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout.split(","), f"imported at CLI import time: {result.stdout}"


def test_version(cli_runner):
    result = cli_runner(["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"clip2gan {__version__}"


def test_help_lists_download_weights(cli_runner):
    result = cli_runner(["--help"])
    assert result.exit_code == 0
    assert "download-weights" in result.stdout
    sub = cli_runner(["download-weights", "--help"])
    assert sub.exit_code == 0
    for option in ("--all", "--list", "--registry"):
        assert option in sub.stdout


def test_project_error_is_one_stderr_line_and_exit_1(tmp_path, clip2gan_subprocess):
    bad = tmp_path / "bad.toml"
    bad.write_text('schema = 1\n[files.x]\nurl = "https://example.com/x"\nformat = "zip"\nlicense = "t"\n')
    result = clip2gan_subprocess(["download-weights", "--list", "--registry", bad])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"Error: {bad}:4: file 'x': unknown format 'zip' (one of nvidia-pkl, "
                                          "rosinality-pt, safetensors, open_clip, facenet, inception-fid, torchvision)"]
    assert result.stdout == ""


def test_debug_variable_shows_the_traceback(tmp_path, clip2gan_subprocess):
    bad = tmp_path / "bad.toml"
    bad.write_text("schema = 1\n[files.x]\nnonsense = 1\n")
    result = clip2gan_subprocess(["download-weights", "--list", "--registry", bad], env={"CLIP2GAN_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RegistryError" in result.stderr and "unknown key 'nonsense'" in result.stderr


def test_python_dash_m_runs_the_cli(clip2gan_subprocess):
    result = clip2gan_subprocess(["--help"])
    assert result.returncode == 0, result.stderr
    assert "download-weights" in result.stdout and "Usage" in result.stdout


def test_usage_error_keeps_exit_code_2(cli_runner):
    result = cli_runner(["download-weights"])
    assert result.exit_code == 2
    assert "name at least one file or pack" in result.output


def test_first_line_of_an_error_message():
    from clip2gan_cli.errors import first_line

    assert first_line(RuntimeError("disk full\n  at frame 3\n  at frame 2")) == "disk full"
    assert first_line(ValueError("")) == "ValueError"  # an empty message must not break the report
    assert first_line(OSError("  \n")) == "OSError"
    assert first_line(KeyError("x" * 500), limit=10) == "'xxxxxxxxx"
