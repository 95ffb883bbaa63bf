"""Which registry is read (a path, $CLIP2GAN_REGISTRY, else the packaged weights.toml), plus the
local packs that `train --export-pack` registers in `<cache>/packs.toml`."""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path

from ..errors import RegistryError, UserInputError
from ..fileutil import atomic_write_text
from ..tomlio import toml_string
from .cache import cache_dir, file_lock
from .registry import NAME_RE, PACK_KEYS, SCHEMA_VERSION, LineMap, PackEntry, Registry, parse_registry


def default_registry_path() -> Path:
    """The weights.toml shipped inside the package (the top-level weights.toml links to it)."""
    return Path(str(importlib.resources.files("clip2gan_cli").joinpath("weights.toml")))


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
                raise RegistryError(f"{local_path}:{LineMap(_read_text(local_path), str(local_path)).line('packs', name)}: "
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
    if not NAME_RE.fullmatch(entry.name):
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
    with file_lock(target.with_name(target.name + ".lock")):
        packs: dict[str, PackEntry] = {}
        if target.is_file():
            packs = parse_registry(_read_text(target), source=str(target), local=True,
                                   unknown_references="keep").packs
        packs[entry.name] = entry
        atomic_write_text(target, _packs_toml(packs.values()))
    return target


def _packs_toml(packs) -> str:
    out = ["# Local clip2gan packs (written by `clip2gan train --export-pack`; layout: see weights.toml).",
           f"schema = {SCHEMA_VERSION}", ""]
    for pack in packs:
        out.append(f"[packs.{toml_string(pack.name)}]")
        for key in PACK_KEYS:
            value = getattr(pack, key)
            if key == "builtin" or value in (None, ""):
                continue
            out.append(f"{key} = {toml_string(value)}")
        out.append("")
    return "\n".join(out)
