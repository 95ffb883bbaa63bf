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


def test_registry_tables_fit_80_columns_one_line_per_row():
    import io

    from rich.console import Console

    from clip2gan_cli import weights
    from clip2gan_cli.registry_listing import registry_tables, short_license

    registry = weights.load_registry()
    assert short_license("NVIDIA Source Code License-NC (non-commercial research use only)") == \
        "NVIDIA Source Code License-NC"
    assert short_license("MIT (OpenAI CLIP); model card: research use") == "MIT"
    output = io.StringIO()
    console = Console(file=output, width=80, color_system=None)
    files, packs = registry_tables(registry)
    console.print(files)
    console.print(packs)
    lines = output.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for entry in registry.files.values():  # each row is one line holding its name and whole license label
        rows = [line for line in lines if line.startswith(entry.name + " ")]
        assert len(rows) == 1 and short_license(entry.license) in rows[0], rows
    for pack in registry.packs.values():
        assert len([line for line in lines if line.startswith(pack.name + " ")]) == 1
    # header, rule, rows and a blank line per table (titles may wrap: a long registry path)
    assert sum(1 for line in lines if line.strip()) <= len(registry.files) + len(registry.packs) + 4 + 4


def test_list_json_gives_every_field_and_the_full_license(cli_runner):
    import json

    from clip2gan_cli import weights

    result = cli_runner(["download-weights", "--list", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    registry = weights.load_registry()
    files = {record["file"]: record for record in records if "file" in record}
    assert set(files) == set(registry.files)
    assert all(files[name]["license"] == entry.license and files[name]["format"] == entry.format
               for name, entry in registry.files.items())
    assert {record["pack"] for record in records if "pack" in record} == set(registry.packs)


def test_library_parameters_become_flags_in_cli_errors():
    from clip2gan_cli.cli import as_flags

    assert as_flags("`frames` must be at least 2, got 1") == "--frames must be at least 2, got 1"
    assert as_flags("`n` and `batch_size` must be at least 1") == "-n and --batch-size must be at least 1"
    assert as_flags("no face found in a.png; use `align=False`") == "no face found in a.png; use --no-align"
    # names it does not know, and commands in backquotes, are left as they are
    assert as_flags("`other` is odd; run `clip2gan download-weights x`") == \
        "`other` is odd; run `clip2gan download-weights x`"


def _backquoted_names_in_library_messages() -> dict[str, str]:
    """Each `name` in the string literals of the package's error, warning and log calls -> where it stands."""
    import ast
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "clip2gan_cli"
    names = {}
    for path in sorted(package.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (ast.unparse(node.func).endswith("Error")
                                               or ast.unparse(node.func) in ("warn", "log", "warnings.warn")):
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        for name in re.findall(r"`([^`\s]+)`", part.value):
                            names.setdefault(name, f"{path.relative_to(package)}:{node.lineno}")
    return names


def test_every_parameter_a_library_message_names_has_a_flag():
    # A name missing from PARAMETER_FLAGS would reach the terminal in backquotes instead of as its flag.
    from clip2gan_cli.cli import PARAMETER_FLAGS

    names = _backquoted_names_in_library_messages()
    assert {"fid_mode", "data", "clip", "frames"} <= set(names)  # the scan sees the messages it is about
    unmapped = {name: where for name, where in names.items() if name not in PARAMETER_FLAGS}
    assert not unmapped, f"library messages name parameters the CLI cannot map to a flag: {unmapped}"
