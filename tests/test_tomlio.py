"""tomlio: the one TOML reader (tomllib, or tomli on Python 3.10) and the one value writer."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from clip2gan_cli import tomlio
from conftest import REPO_ROOT

# Imports every module of the package with `import tomllib` failing as it does on Python 3.10
# (a None entry in sys.modules raises ModuleNotFoundError), then checks tomlio fell back to tomli.
_IMPORT_ALL_WITHOUT_TOMLLIB = """
import importlib, pkgutil, sys
sys.modules["tomllib"] = None
import clip2gan_cli
names = [info.name for info in pkgutil.walk_packages(clip2gan_cli.__path__, "clip2gan_cli.")]
for name in names:
    importlib.import_module(name)
import tomli
from clip2gan_cli import tomlio
assert tomlio.loads is tomli.loads, "tomlio did not fall back to tomli"
print(len(names), "modules")
"""


def test_every_module_imports_when_tomllib_is_missing():
    if importlib.util.find_spec("tomli") is None:
        pytest.skip("tomli is not installed (pip install tomli: the TOML reader of Python 3.10)")
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALL_WITHOUT_TOMLLIB], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[0]) >= 30  # the walk found the package's modules, not an empty path


@pytest.mark.parametrize("value", ["plain", 'say "hi"', "back\\slash", "tab\there", "new\nline", "del\x7f",
                                   "\x00\x1f", "ünïcødé ✓", ""])
def test_strings_read_back_unchanged(value):
    text = f"v = {tomlio.toml_string(value)}\n"
    assert tomlio.loads(text)["v"] == value


def test_values_read_back_unchanged():
    values = {"flag": True, "off": False, "count": -3, "rate": 1e-05, "tenth": 0.1, "names": ["a", 'b"c'],
              "empty": []}
    text = "".join(f"{key} = {tomlio.toml_value(value, key)}\n" for key, value in values.items())
    assert tomlio.loads(text) == values


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused_by_name(value):
    with pytest.raises(ValueError, match="rate is not finite"):
        tomlio.toml_value(value, "rate")


def test_other_types_are_refused():
    with pytest.raises(TypeError, match="cannot write when="):
        tomlio.toml_value({"a": 1}, "when")
