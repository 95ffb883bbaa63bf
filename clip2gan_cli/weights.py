"""The weights registry (`weights.toml`) and the local cache of verified downloads.

The registry is data: `[files.<name>]` tables (url, mirrors, sha256, size, format, license, ...)
and `[packs.<name>]` tables (generator + CLIP + mapper + optional discriminator and identity net);
the layout is documented at the top of `weights.toml`. The parser is strict and names the line
at fault.

Cache layout (`$CLIP2GAN_HOME`, default `~/.cache/clip2gan`):

    weights/<name>/<filename>            a verified file (only ever created by an atomic rename)
    weights/<name>/<filename>.sha256     the hash it was verified against (or recorded, if unpinned)
    weights/<name>/<filename>.partial    bytes of an interrupted download, resumed with HTTP Range
    weights/<name>/<filename>.lock       flock: one process downloads a file, the others wait
    packs.toml                           local packs registered by `train --export-pack`

Downloads use urllib only. No third-party library downloads on its own: loaders take the paths
this module returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import http.client
import importlib.resources
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (tomli is pytest's own dependency there)
    import tomli as tomllib

try:
    import fcntl
except ModuleNotFoundError:  # pragma: no cover - Windows: no flock; downloads still use unique temp files
    fcntl = None

from .errors import (ChecksumError, DownloadError, OutputError, RegistryError, UserInputError,
                     WeightsNotFoundError)
from .fileutil import atomic_write_text, sha256_file

SCHEMA_VERSION = 1
FORMATS = ("nvidia-pkl", "rosinality-pt", "safetensors", "open_clip", "facenet", "inception-fid", "torchvision")
# Formats `download-weights` converts once to safetensors after fetching.
CONVERTIBLE_FORMATS = ("nvidia-pkl", "rosinality-pt")
# Which formats each pack role accepts (checked when the registry is parsed).
ROLE_FORMATS = {
    "generator": ("nvidia-pkl", "rosinality-pt", "safetensors"),
    "discriminator": ("nvidia-pkl", "rosinality-pt", "safetensors"),
    "clip_weights": ("open_clip",),
    "mapper": ("safetensors",),
    "identity": ("facenet",),
}
FILE_KEYS = ("url", "mirrors", "sha256", "size", "format", "license", "filename", "description")
PACK_KEYS = ("generator", "discriminator", "clip_model", "clip_pretrained", "clip_weights", "mapper",
             "identity", "builtin", "description")
BUILTIN_PACK_KEYS = ("builtin", "description", "clip_model", "clip_pretrained")
# Suffixes the cache uses for its own bookkeeping; a registry filename may not end with them.
_RESERVED_SUFFIXES = (".partial", ".part", ".lock", ".sha256")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class WeightEntry:
    """One downloadable file of the registry."""

    name: str
    urls: tuple[str, ...]  # primary URL first, then mirrors in the order they are tried
    sha256: str | None  # lowercase hex; None = not pinned (the first download records it)
    size: int | None  # bytes; None = unknown
    format: str  # one of FORMATS
    license: str
    filename: str  # name of the file in the cache
    description: str = ""

    @property
    def url(self) -> str:
        """The primary URL."""
        return self.urls[0]


@dataclass(frozen=True)
class PackEntry:
    """A pack: generator + CLIP (+ mapper, discriminator, identity net), by registry name or path."""

    name: str
    generator: str | None = None
    clip_model: str | None = None  # open_clip model name, e.g. ViT-B-16-quickgelu
    clip_pretrained: str | None = None  # open_clip pretrained tag, e.g. openai
    clip_weights: str | None = None  # registry file holding the CLIP checkpoint
    mapper: str | None = None  # None until a mapper is trained for this pack
    discriminator: str | None = None
    identity: str | None = None
    builtin: bool = False  # files ship inside clip2gan_cli/packs/<name>/
    description: str = ""
    local: bool = False  # registered in <cache>/packs.toml by `train --export-pack`

    def file_references(self) -> dict[str, str]:
        """Role -> reference (registry name or path) for every file this pack names."""
        refs = {role: getattr(self, role) for role in ROLE_FORMATS}
        return {role: ref for role, ref in refs.items() if ref}


@dataclass
class Registry:
    """Parsed registry: files and packs by name."""

    files: dict[str, WeightEntry]
    packs: dict[str, PackEntry]
    source: str = "weights.toml"
    notes: list[str] = field(default_factory=list)  # e.g. local packs left out, said once by the CLI

    def entry(self, name: str) -> WeightEntry:
        """The file named `name` (WeightsNotFoundError with close matches otherwise)."""
        try:
            return self.files[name]
        except KeyError:
            raise WeightsNotFoundError(f"no file named '{name}' in the registry {self.source}",
                                       hint=_suggest(name, [*self.files, *self.packs])) from None

    def pack(self, name: str) -> PackEntry:
        """The pack named `name` (UserInputError with close matches otherwise)."""
        try:
            return self.packs[name]
        except KeyError:
            raise UserInputError(f"no pack named '{name}' in the registry {self.source}",
                                 hint=_suggest(name, list(self.packs))) from None

    def files_for(self, name: str) -> list[WeightEntry]:
        """The registry files a file or pack name stands for (a builtin pack needs none)."""
        if name in self.files:
            return [self.files[name]]
        if name in self.packs:
            entries: list[WeightEntry] = []
            for ref in self.packs[name].file_references().values():
                if ref in self.files and self.files[ref] not in entries:
                    entries.append(self.files[ref])
            return entries
        raise WeightsNotFoundError(f"'{name}' is neither a file nor a pack in the registry {self.source}",
                                   hint=_suggest(name, [*self.files, *self.packs]))


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3)
    if close:
        return "did you mean " + ", ".join(close) + "?"
    return "see `clip2gan download-weights --list`"


# --------------------------------------------------------------------------------------------
# Environment


def cache_dir() -> Path:
    """The cache directory: $CLIP2GAN_HOME, default ~/.cache/clip2gan."""
    home = os.environ.get("CLIP2GAN_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".cache" / "clip2gan"


def is_offline() -> bool:
    """True when CLIP2GAN_OFFLINE asks never to touch the network."""
    return os.environ.get("CLIP2GAN_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class DownloadPolicy:
    """Retry and timeout settings (environment: CLIP2GAN_DOWNLOAD_RETRIES/_BACKOFF/_TIMEOUT)."""

    retries: int = 4  # extra attempts per URL after the first (reset whenever bytes arrive)
    backoff_s: float = 1.0  # first delay; doubles after each failed attempt
    timeout_s: float = 60.0  # socket timeout per connect/read

    @classmethod
    def from_env(cls) -> "DownloadPolicy":
        """Defaults overridden by the environment (tests use tiny backoffs)."""
        return cls(retries=int(_env_number("CLIP2GAN_DOWNLOAD_RETRIES", cls.retries)),
                   backoff_s=_env_number("CLIP2GAN_DOWNLOAD_BACKOFF", cls.backoff_s),
                   timeout_s=_env_number("CLIP2GAN_DOWNLOAD_TIMEOUT", cls.timeout_s))


def _env_number(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserInputError(f"{variable}={text!r} is not a non-negative number")
    return value


# --------------------------------------------------------------------------------------------
# Parsing


def _split_dotted(text: str) -> tuple[str, ...] | None:
    """Split a TOML dotted key (`packs."a.b"`) into its parts; None if it is not one we can read."""
    parts = re.findall(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*(?:\.|$)', text)
    rebuilt = [double or single or bare for double, single, bare in parts]
    return tuple(rebuilt) if parts else None


_HEADER_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY_RE = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


class _LineMap:
    """Where each table header and key sits in the text (tomllib reports no positions)."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.tables: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_multiline = False
        for number, line in enumerate(text.splitlines(), start=1):
            # Skip the inside of multi-line strings: their lines are not headers or keys.
            toggles = line.count('"""') + line.count("'''")
            if in_multiline:
                in_multiline = toggles % 2 == 0
                continue
            if toggles % 2 == 1:
                in_multiline = True
            header = _HEADER_RE.match(line)
            if header:
                path = _split_dotted(header.group(1))
                if path is None:
                    continue
                if path in self.tables:
                    kind = "file" if path[0] == "files" else "pack" if path[0] == "packs" else "table"
                    raise RegistryError(f"{source}:{number}: duplicate {kind} name '{'.'.join(path[1:]) or path[0]}' "
                                        f"(first defined at line {self.tables[path]})")
                self.tables[path] = number
                table = path
                continue
            key = _KEY_RE.match(line)
            if key:
                parts = _split_dotted(key.group(1)) or (key.group(1),)
                self.keys.setdefault(table + parts, number)

    def line(self, *path: str) -> int | None:
        """Line of a key (or, failing that, of its table), None if unknown."""
        for length in range(len(path), 0, -1):
            found = self.keys.get(path[:length]) or self.tables.get(path[:length])
            if found:
                return found
        return None

    def error(self, message: str, *path: str) -> RegistryError:
        """A RegistryError that starts with `file:line:`."""
        number = self.line(*path)
        where = f"{self.source}:{number}" if number else self.source
        return RegistryError(f"{where}: {message}")


def parse_registry(text: str, source: str = "weights.toml", *, local: bool = False,
                   known_files: Mapping[str, WeightEntry] | None = None,
                   unknown_references: str = "error") -> Registry:
    """Parse registry TOML text strictly; every problem is a RegistryError naming `source:line`.

    `local=True` parses a local packs file (`<cache>/packs.toml`): no [files], and file
    references may be absolute paths; registry names are looked up in `known_files`.
    `unknown_references`: "error" (default), "skip" (leave such packs out, noted in
    `Registry.notes`) or "keep" (no check; used to rewrite packs.toml).
    """
    if not isinstance(text, str):
        raise RegistryError(f"{source}: registry text must be str")
    lines = _LineMap(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        at = re.search(r"\(at line (\d+), column \d+\)", message)
        where = f"{source}:{at.group(1)}" if at else source
        raise RegistryError(f"{where}: invalid TOML: {re.sub(r' ?[(]at line.*[)]', '', message)}") from None
    allowed_top = ("schema", "packs") if local else ("schema", "files", "packs")
    for key in data:
        if key not in allowed_top:
            raise lines.error(f"unknown top-level key '{key}' (allowed: {', '.join(allowed_top)})", key)
    schema = data.get("schema", SCHEMA_VERSION if local else None)
    if type(schema) is not int or not 1 <= schema <= SCHEMA_VERSION:
        raise lines.error(f"'schema' must be an integer from 1 to {SCHEMA_VERSION}, got {schema!r}", "schema")

    files_table = _table(data, "files", lines)
    packs_table = _table(data, "packs", lines)
    files: dict[str, WeightEntry] = dict(known_files or {}) if local else {}
    if not local:
        for name, body in files_table.items():
            files[name] = _parse_file(name, body, lines)
    registry = Registry(files={} if local else files, packs={}, source=source)
    for name, body in packs_table.items():
        if not local and name in files:
            raise lines.error(f"pack '{name}' has the same name as a file (names must be unique)", "packs", name)
        pack = _parse_pack(name, body, lines, files, local, unknown_references)
        if pack is None:
            registry.notes.append(f"local pack '{name}' in {source} names files this registry does not have; "
                                  "it was left out")
            continue
        registry.packs[name] = pack
    return registry


def _table(data: dict, key: str, lines: _LineMap) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise lines.error(f"'{key}' must be a table of [{key}.<name>] tables", key)
    for name, body in table.items():
        if not _NAME_RE.fullmatch(name):
            raise lines.error(f"invalid name {name!r} (letters, digits, '.', '_', '-'; at most 100)", key, name)
        if not isinstance(body, dict):
            raise lines.error(f"'{key}.{name}' must be a table", key, name)
    return table


def _parse_file(name: str, body: dict, lines: _LineMap) -> WeightEntry:
    where = ("files", name)
    for key in body:
        if key not in FILE_KEYS:
            raise lines.error(f"file '{name}': unknown key '{key}' (allowed: {', '.join(FILE_KEYS)})", *where, key)
    for required in ("url", "format", "license"):
        if required not in body:
            raise lines.error(f"file '{name}': missing required key '{required}'", *where)
    url = _string(body, "url", name, lines, where)
    mirrors = body.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise lines.error(f"file '{name}': 'mirrors' must be a list of URL strings", *where, "mirrors")
    urls = (url, *mirrors)
    for candidate in urls:
        if not _is_http_url(candidate):
            key = "url" if candidate == url else "mirrors"
            raise lines.error(f"file '{name}': '{candidate}' is not an http(s) URL", *where, key)
    sha256 = body.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise lines.error(f"file '{name}': malformed sha256 {sha256!r} (must be 64 hex digits)",
                              *where, "sha256")
        sha256 = sha256.lower()
    size = body.get("size")
    if size is not None and (type(size) is not int or size <= 0):
        raise lines.error(f"file '{name}': bad size {size!r} (must be a positive number of bytes)", *where, "size")
    file_format = _string(body, "format", name, lines, where)
    if file_format not in FORMATS:
        raise lines.error(f"file '{name}': unknown format '{file_format}' (one of {', '.join(FORMATS)})",
                          *where, "format")
    license_note = _string(body, "license", name, lines, where)
    filename = body.get("filename", PurePosixPath(urllib.parse.urlparse(url).path).name)
    if (not isinstance(filename, str) or not filename or filename in (".", "..") or filename.startswith(".")
            or "/" in filename or "\\" in filename or filename.endswith(_RESERVED_SUFFIXES)):
        raise lines.error(f"file '{name}': unusable filename {filename!r} (set 'filename' to a plain file name)",
                          *where, "filename" if "filename" in body else "url")
    description = _string(body, "description", name, lines, where, default="")
    return WeightEntry(name=name, urls=urls, sha256=sha256, size=size, format=file_format,
                       license=license_note, filename=filename, description=description)


def _parse_pack(name: str, body: dict, lines: _LineMap, files: Mapping[str, WeightEntry], local: bool,
                unknown_references: str) -> PackEntry | None:
    where = ("packs", name)
    for key in body:
        if key not in PACK_KEYS:
            raise lines.error(f"pack '{name}': unknown key '{key}' (allowed: {', '.join(PACK_KEYS)})", *where, key)
    builtin = body.get("builtin", False)
    if not isinstance(builtin, bool):
        raise lines.error(f"pack '{name}': 'builtin' must be true or false", *where, "builtin")
    if builtin and local:
        raise lines.error(f"pack '{name}': a local pack cannot be builtin", *where, "builtin")
    values = {key: _string(body, key, name, lines, where, default=None)
              for key in PACK_KEYS if key not in ("builtin", "description")}
    description = _string(body, "description", name, lines, where, default="")
    if builtin:
        for key in body:
            if key not in BUILTIN_PACK_KEYS:
                raise lines.error(f"pack '{name}': a builtin pack ships its own files; '{key}' is not allowed "
                                  f"(allowed: {', '.join(BUILTIN_PACK_KEYS)})", *where, key)
        return PackEntry(name=name, builtin=True, description=description,
                         clip_model=values["clip_model"], clip_pretrained=values["clip_pretrained"])
    for required in ("generator", "clip_model", "clip_pretrained"):
        if not values[required]:
            raise lines.error(f"pack '{name}': missing required key '{required}'", *where)
    for role, formats in ROLE_FORMATS.items():
        ref = values[role]
        if ref is None:
            continue
        if local and _is_path_reference(ref):
            if not Path(ref).is_absolute():
                raise lines.error(f"pack '{name}': {role} path '{ref}' must be absolute", *where, role)
            continue
        if ref not in files:
            if unknown_references == "skip":
                return None
            if unknown_references == "keep":
                continue
            raise lines.error(f"pack '{name}': {role} '{ref}' is not a file in the registry", *where, role)
        if files[ref].format not in formats:
            raise lines.error(f"pack '{name}': {role} '{ref}' has format '{files[ref].format}', "
                              f"expected {' or '.join(formats)}", *where, role)
    return PackEntry(name=name, builtin=False, description=description, local=local, **values)


def _string(body: dict, key: str, name: str, lines: _LineMap, where: tuple[str, ...], default=...):
    if key not in body:
        if default is ...:
            raise lines.error(f"'{name}': missing required key '{key}'", *where)
        return default
    value = body[key]
    if not isinstance(value, str) or not value.strip():
        raise lines.error(f"'{name}': '{key}' must be a non-empty string", *where, key)
    return value


def _is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host and no whitespace or control characters."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return False
    try:
        parsed = urllib.parse.urlparse(text)
        return parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # e.g. an unbalanced '[' in the host
        return False


def _is_path_reference(ref: str) -> bool:
    """A pack reference that is a file path rather than a registry name."""
    return "/" in ref or "\\" in ref or ref.startswith("~")


# --------------------------------------------------------------------------------------------
# Loading


def default_registry_path() -> Path:
    """The packaged weights.toml (importlib.resources), falling back to the repository root."""
    packaged = importlib.resources.files("clip2gan_cli").joinpath("weights.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "weights.toml"


def local_packs_path() -> Path:
    """Where `register_local_pack` keeps local packs."""
    return cache_dir() / "packs.toml"


def _registry_path(path: str | os.PathLike | None) -> Path:
    if path is None and os.environ.get("CLIP2GAN_REGISTRY", "").strip():
        path = os.environ["CLIP2GAN_REGISTRY"].strip()
    return Path(path).expanduser() if path is not None else default_registry_path()


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Load the registry (`path`, else $CLIP2GAN_REGISTRY, else the packaged weights.toml) plus local packs."""
    registry_path = _registry_path(path)
    registry = parse_registry(_read_text(registry_path), source=str(registry_path))
    local_path = local_packs_path()
    if local_path.is_file():
        local = parse_registry(_read_text(local_path), source=str(local_path), local=True,
                               known_files=registry.files, unknown_references="skip")
        for name, pack in local.packs.items():
            if name in registry.packs or name in registry.files:
                raise RegistryError(f"{local_path}:{_LineMap(_read_text(local_path), str(local_path)).line('packs', name)}: "
                                    f"local pack '{name}' has the name of an entry of {registry.source}")
            registry.packs[name] = pack
        registry.notes.extend(local.notes)
    return registry


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"registry file {path} does not exist") from None
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise RegistryError(f"cannot read registry file {path}: {error.strerror or error}") from None


def register_local_pack(entry: PackEntry) -> Path:
    """Add (or replace) a local pack in `<cache>/packs.toml`; returns that file's path.

    Registry names are kept as names; any other reference must be an existing file and is stored
    as an absolute path. The name of a pack or file of the registry (packaged, or
    $CLIP2GAN_REGISTRY) cannot be reused.
    """
    if not _NAME_RE.fullmatch(entry.name):
        raise UserInputError(f"invalid pack name '{entry.name}' (letters, digits, '.', '_', '-')")
    if entry.builtin:
        raise UserInputError(f"pack '{entry.name}': a local pack cannot be builtin")
    base_path = _registry_path(None)
    base = parse_registry(_read_text(base_path), source=str(base_path))
    if entry.name in base.packs or entry.name in base.files:
        raise UserInputError(f"'{entry.name}' is the name of a registry entry; choose another pack name")
    refs = {}
    for role, ref in entry.file_references().items():
        if ref in base.files:
            refs[role] = ref
            continue
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise UserInputError(f"pack '{entry.name}': {role} '{ref}' is neither a registry file nor an existing file")
        refs[role] = str(path)
    entry = dataclasses.replace(entry, local=True, **refs)
    parse_check = {"generator": entry.generator, "clip_model": entry.clip_model,
                   "clip_pretrained": entry.clip_pretrained}
    missing = [key for key, value in parse_check.items() if not value]
    if missing:
        raise UserInputError(f"pack '{entry.name}': missing {', '.join(missing)}")

    target = local_packs_path()
    with _file_lock(target.with_name(target.name + ".lock")):
        packs: dict[str, PackEntry] = {}
        if target.is_file():
            packs = parse_registry(_read_text(target), source=str(target), local=True,
                                   unknown_references="keep").packs
        packs[entry.name] = entry
        atomic_write_text(target, _packs_toml(packs.values()))
    return target


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; DEL must be escaped in TOML.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _packs_toml(packs) -> str:
    out = ["# Local clip2gan packs (written by `clip2gan train --export-pack`; layout: see weights.toml).",
           f"schema = {SCHEMA_VERSION}", ""]
    for pack in packs:
        out.append(f"[packs.{_toml_string(pack.name)}]")
        for key in PACK_KEYS:
            value = getattr(pack, key)
            if key == "builtin" or value in (None, ""):
                continue
            out.append(f"{key} = {_toml_string(value)}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Cache


def cached_path(entry: WeightEntry) -> Path:
    """Where `entry` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / "weights" / entry.name / entry.filename


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _read_record(target: Path) -> str | None:
    try:
        text = _record_path(target).read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _SHA256_RE.fullmatch(text) else None


def is_cached(entry: WeightEntry) -> bool:
    """True when the file is in the cache with the expected size and a matching hash record."""
    target = cached_path(entry)
    if not target.is_file() or (entry.size is not None and target.stat().st_size != entry.size):
        return False
    recorded = _read_record(target)
    return recorded is not None and (entry.sha256 is None or recorded == entry.sha256)




def _check_cached(entry: WeightEntry, target: Path) -> tuple[bool, str | None]:
    """(usable, actual_hash): is the file at `target` the one the registry means?

    A file with a matching hash record is trusted (it only got there through verification);
    otherwise (e.g. copied in by hand for offline use) it is hashed once and the record written.
    """
    if not target.is_file():
        return False, None
    if entry.size is not None and target.stat().st_size != entry.size:
        return False, f"{target.stat().st_size} bytes"
    recorded = _read_record(target)
    expected = entry.sha256 or recorded
    if recorded is not None and recorded == expected:
        return True, recorded
    actual = sha256_file(target)
    if expected is None:
        _warn_unpinned(entry, actual, target)
    elif actual != expected:
        return False, actual
    atomic_write_text(_record_path(target), actual + "\n")
    return True, actual


def _warn_unpinned(entry: WeightEntry, actual: str, target: Path) -> None:
    _stderr(f"Warning: '{entry.name}' is not pinned in the registry; recorded its sha256 {actual} in "
            f"{_record_path(target)} (add `sha256 = \"{actual}\"` to [files.{entry.name}] to pin it).")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_reference(reference: str, registry: Registry | None = None, progress: bool = True) -> Path:
    """A pack's file reference as a local path: a registry name is fetched, a path must exist."""
    if _is_path_reference(reference):
        path = Path(reference).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"file {path} does not exist")
        return path
    return fetch(reference, registry=registry, progress=progress)


def fetch(name: str, registry: Registry | None = None, progress: bool = True,
          policy: DownloadPolicy | None = None) -> Path:
    """Path of the verified local copy of registry file `name`, downloading it if needed.

    Offline (CLIP2GAN_OFFLINE=1) a missing file is a WeightsNotFoundError naming the command that
    fetches it. Two processes asking for the same file download it once: the second waits on the
    lock and then finds the file.
    """
    registry = registry if registry is not None else load_registry()
    entry = registry.entry(name)
    target = cached_path(entry)
    usable, actual = _check_cached(entry, target)
    if usable:
        return target
    if is_offline():
        if actual is not None:
            raise ChecksumError(f"cached {target} does not match the registry: expected "
                                f"{entry.sha256 or entry.size}, found {actual}",
                                hint=f"delete it and run `clip2gan download-weights {name}` with network access")
        raise WeightsNotFoundError(f"'{name}' is not in the cache ({target}) and CLIP2GAN_OFFLINE=1 forbids "
                                   "downloading it",
                                   hint=f"run `clip2gan download-weights {name}` with network access, "
                                        f"or copy {entry.filename} to {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create cache directory {target.parent}: {error.strerror or error}") from error
    with _file_lock(target.with_name(target.name + ".lock"), waiting_for=name):
        usable, _ = _check_cached(entry, target)  # another process may have fetched it while we waited
        if not usable:
            _download(entry, target, progress, policy or DownloadPolicy.from_env())
    return target


@contextlib.contextmanager
def _file_lock(path: Path, waiting_for: str | None = None) -> Iterator[None]:
    """Exclusive flock on `path` for the duration of the block (a no-op where flock is missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")
    except OSError as error:
        raise OutputError(f"cannot create lock file {path}: {error.strerror or error}") from error
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting_for:
                    _stderr(f"Waiting for another process that is downloading '{waiting_for}'...")
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Download


class _RetryableError(Exception):
    """A failure worth another attempt at the same URL (network, 5xx, cut-off body)."""


class _UrlFailed(Exception):
    """This URL will not work (4xx, or retries used up); try the next mirror."""


def _download(entry: WeightEntry, target: Path, progress: bool, policy: DownloadPolicy) -> None:
    """Download `entry` to `target` (caller holds the lock): unique temp, resume, verify, rename."""
    partial = target.with_name(target.name + ".partial")
    temp = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    keep_bytes = True  # an interrupted download stays resumable; a wrong one is deleted
    try:
        _adopt_killed_downloads(target, partial)
        if partial.exists():
            os.replace(partial, temp)  # claim the bytes of an earlier interrupted download
        failures: list[str] = []
        with _ProgressBar(entry, progress) as bar:
            for url in entry.urls:
                try:
                    _fetch_url(url, temp, entry, bar, policy)
                    break
                except ChecksumError:
                    keep_bytes = False  # wrong bytes are never resumed
                    raise
                except _UrlFailed as failure:
                    failures.append(str(failure))
                    if url != entry.urls[-1]:
                        bar.log(f"{entry.name}: {failure}; trying the next mirror")
            else:
                raise DownloadError(f"could not download '{entry.name}': " + "; ".join(failures))
        keep_bytes = False
        digest = _verify(entry, temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        atomic_write_text(_record_path(target), digest + "\n")
    finally:
        # Never leave the process-unique temp behind: keep resumable bytes as .partial, else delete.
        if temp.exists():
            with contextlib.suppress(OSError):
                if keep_bytes and temp.stat().st_size > 0:
                    os.replace(temp, partial)
                else:
                    temp.unlink()


def _adopt_killed_downloads(target: Path, partial: Path) -> None:
    """Keep the longest process temp of a killed download as `partial`; delete the other leftovers.

    A process killed hard (SIGKILL, power loss) cannot move its `<name>.<pid>.<hex>.part` to
    `.partial`; the caller holds the lock, so every such temp is a dead process's and is safe to take.
    """
    if fcntl is None:  # no flock here: another process's temp may be live
        return
    leftovers = [path for path in target.parent.glob(f"{glob.escape(target.name)}.*.part") if path.is_file()]
    for leftover in sorted(leftovers, key=lambda path: path.stat().st_size, reverse=True):
        with contextlib.suppress(OSError):
            if not partial.exists() or leftover.stat().st_size > partial.stat().st_size:
                os.replace(leftover, partial)
            else:
                leftover.unlink()


def _verify(entry: WeightEntry, temp: Path) -> str:
    """Size, then sha256 (pinned, or recorded by an earlier download); returns the hash.

    ChecksumError names the expected and the actual value.
    """
    size = temp.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumError(f"size mismatch for '{entry.name}': expected {entry.size} bytes, got {size} "
                            "(the download was deleted)")
    actual = sha256_file(temp)
    target = cached_path(entry)
    expected = entry.sha256 or _read_record(target)
    if expected is None:
        _warn_unpinned(entry, actual, target)
    elif actual != expected:
        raise ChecksumError(f"sha256 mismatch for '{entry.name}': expected {expected}, got {actual} "
                            "(the download was deleted)")
    return actual


def _fetch_url(url: str, temp: Path, entry: WeightEntry, bar: "_ProgressBar", policy: DownloadPolicy) -> None:
    """Complete `temp` from `url`, retrying with exponential backoff; _UrlFailed when it gives up."""
    failed_attempts = 0
    while True:
        before = temp.stat().st_size if temp.exists() else 0
        try:
            _transfer(url, temp, entry, bar, policy.timeout_s)
            return
        except urllib.error.HTTPError as error:
            if error.code not in (408, 429) and error.code < 500:
                raise _UrlFailed(f"HTTP {error.code} {error.reason} from {url}") from None
            problem = f"HTTP {error.code} {error.reason}"
        except (_RetryableError, urllib.error.URLError, http.client.HTTPException, OSError) as error:
            problem = _describe(error)
        # A connection that delivered bytes is progress: its failure does not use up a retry.
        if temp.exists() and temp.stat().st_size > before:
            failed_attempts = 0
        failed_attempts += 1
        if failed_attempts > policy.retries:
            raise _UrlFailed(f"{problem} from {url} (gave up after {failed_attempts} attempts)")
        delay = policy.backoff_s * 2 ** (failed_attempts - 1)
        bar.log(f"{entry.name}: {problem}; retrying in {delay:.1f} s")
        time.sleep(delay)


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        reason = error.reason
        return str(getattr(reason, "strerror", None) or reason)
    return str(error) or type(error).__name__


def _transfer(url: str, temp: Path, entry: WeightEntry, bar: "_ProgressBar", timeout: float) -> None:
    """One HTTP request: continue `temp` from its current size (Range) or start it over."""
    offset = temp.stat().st_size if temp.exists() else 0
    if entry.size is not None and offset > entry.size:
        temp.unlink()  # longer than the file can be: not a prefix of it
        offset = 0
    if entry.size is not None and offset == entry.size:
        return  # complete already; verification decides
    headers = {"User-Agent": f"clip2gan/{_version()}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            temp.unlink()  # the server does not accept our partial: start over
            raise _RetryableError("the server refused to resume (HTTP 416); starting over") from None
        raise
    with response:
        resuming = offset > 0 and response.status == 206
        if resuming:
            content_range = response.headers.get("Content-Range", "")
            start = re.match(r"bytes (\d+)-", content_range)
            if not start or int(start.group(1)) != offset:
                temp.unlink()
                raise _RetryableError(f"the server resumed at the wrong place ({content_range!r}); starting over")
        else:
            offset = 0  # the server sent the whole file (no Range support): start over
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + length if length is not None else entry.size
        if entry.size is not None and total is not None and total != entry.size:
            raise ChecksumError(f"size mismatch for '{entry.name}': the registry says {entry.size} bytes, "
                                f"{url} serves {total}")
        bar.start(total=total, completed=offset)
        received = 0
        try:
            out = open(temp, "ab" if resuming else "wb")
        except OSError as error:
            raise OutputError(f"cannot write {temp}: {error.strerror or error}") from error
        with out:
            while chunk := response.read(_CHUNK):
                try:
                    out.write(chunk)
                except OSError as error:  # a full disk is not worth a retry
                    raise OutputError(f"cannot write {temp}: {error.strerror or error}") from error
                received += len(chunk)
                bar.advance(len(chunk))
                if entry.size is not None and offset + received > entry.size:
                    raise ChecksumError(f"size mismatch for '{entry.name}': {url} sent more than the "
                                        f"{entry.size} bytes the registry says (the download was deleted)")
    if length is not None and received < length:
        raise _RetryableError(f"connection closed after {offset + received} of {total} bytes")


def _version() -> str:
    from . import __version__

    return __version__


class _ProgressBar:
    """A rich progress bar on stderr (bytes, rate, ETA); silent when disabled."""

    def __init__(self, entry: WeightEntry, enabled: bool):
        self.entry = entry
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "_ProgressBar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.entry.name, total=self.entry.size)
        return self

    def start(self, total: int | None, completed: int) -> None:
        """(Re)start the bar at `completed` bytes of `total`."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=completed)

    def advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)

    def log(self, message: str) -> None:
        """A message above the bar (or plain stderr when the bar is off)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            _stderr(message)

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)
