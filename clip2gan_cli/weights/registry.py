"""The registry's data and its strict parser: `[files.<name>]` and `[packs.<name>]` tables.

The layout is documented at the top of `weights.toml`. Every problem is a RegistryError that
names the line at fault (`file:line: ...`). Nothing here touches files or the network.
"""
from __future__ import annotations

import difflib
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping

from ..errors import RegistryError, UserInputError, WeightsNotFoundError
from ..tomlio import TOMLDecodeError, loads

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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


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
# Parsing


def _split_dotted(text: str) -> tuple[str, ...] | None:
    """Split a TOML dotted key (`packs."a.b"`) into its parts; None if it is not one we can read."""
    parts = re.findall(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*(?:\.|$)', text)
    rebuilt = [double or single or bare for double, single, bare in parts]
    return tuple(rebuilt) if parts else None


_HEADER_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY_RE = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


class LineMap:
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
    lines = LineMap(text, source)
    try:
        data = loads(text)
    except TOMLDecodeError as error:
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


def _table(data: dict, key: str, lines: LineMap) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise lines.error(f"'{key}' must be a table of [{key}.<name>] tables", key)
    for name, body in table.items():
        if not NAME_RE.fullmatch(name):
            raise lines.error(f"invalid name {name!r} (letters, digits, '.', '_', '-'; at most 100)", key, name)
        if not isinstance(body, dict):
            raise lines.error(f"'{key}.{name}' must be a table", key, name)
    return table


def _parse_file(name: str, body: dict, lines: LineMap) -> WeightEntry:
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
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
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


def _parse_pack(name: str, body: dict, lines: LineMap, files: Mapping[str, WeightEntry], local: bool,
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
        if local and is_path_reference(ref):
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


def _string(body: dict, key: str, name: str, lines: LineMap, where: tuple[str, ...], default=...):
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


def is_path_reference(ref: str) -> bool:
    """A pack reference that is a file path rather than a registry name."""
    return "/" in ref or "\\" in ref or ref.startswith("~")
