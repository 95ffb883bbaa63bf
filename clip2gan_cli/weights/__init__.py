"""The weights registry (`weights.toml`) and the local cache of verified downloads.

- `registry`: the data (WeightEntry, PackEntry, Registry) and the strict parser of registry TOML.
- `loading`: which registry file is read, and the local packs in `<cache>/packs.toml`.
- `cache`: where the cache is ($CLIP2GAN_HOME), what in it is verified, and its lock.
- `download`: `fetch` (urllib, resume, retries, mirrors, verification) and `resolve_reference`.
"""
from __future__ import annotations

from .cache import cache_dir, cached_path, is_cached, is_offline
from .download import DownloadPolicy, fetch, resolve_reference
from .loading import default_registry_path, load_registry, local_packs_path, register_local_pack
from .registry import (BUILTIN_PACK_KEYS, CONVERTIBLE_FORMATS, FILE_KEYS, FORMATS, PACK_KEYS, ROLE_FORMATS,
                       SCHEMA_VERSION, PackEntry, Registry, WeightEntry, parse_registry)

__all__ = [
    "BUILTIN_PACK_KEYS", "CONVERTIBLE_FORMATS", "FILE_KEYS", "FORMATS", "PACK_KEYS", "ROLE_FORMATS",
    "SCHEMA_VERSION", "DownloadPolicy", "PackEntry", "Registry", "WeightEntry", "cache_dir", "cached_path",
    "default_registry_path", "fetch", "is_cached", "is_offline", "load_registry", "local_packs_path",
    "parse_registry", "register_local_pack", "resolve_reference",
]
