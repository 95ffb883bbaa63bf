"""Helpers shared by the generate/edit/interpolate CLI tests."""
from __future__ import annotations

from pathlib import Path


def error_lines(result) -> list[str]:
    """The `Error: ...` lines a command printed on stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 1, exactly one `Error:` line on stderr containing every fragment; returns the line."""
    lines = error_lines(result)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def written_files(directory: Path) -> list[str]:
    """Every file (temp files included) under `directory`, or [] when it does not exist."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
