"""TOML in and out: the standard library's reader (tomli on Python 3.10) and the one writer of values.

Every module that reads TOML takes `loads` / `TOMLDecodeError` from here, so the 3.10 fallback
lives in one place; every module that writes TOML formats its values with `toml_value`.
"""
from __future__ import annotations

import math
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

loads = tomllib.loads
TOMLDecodeError = tomllib.TOMLDecodeError


def toml_string(text: str) -> str:
    """A TOML basic string with the escapes TOML requires."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == '"':
            out.append('\\"')
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any, key: str) -> str:
    """Format one value as TOML: bool, int, float, str, or a list of those.

    `key` only names the value in errors: ValueError for a non-finite float (TOML's inf/nan would
    read back, but no config of ours means them), TypeError for any other type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key} is not finite ({value})")
        return repr(value)  # repr round-trips floats exactly; TOML accepts '1e-05' and '0.1'
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise TypeError(f"cannot write {key}={value!r} as TOML")
