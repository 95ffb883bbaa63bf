"""`download-weights --list`: the registry as tables that fit an 80-column terminal, or as JSON records.

Tables show short license labels and cut long values; the records (`--list --json`) hold every field.
"""
from __future__ import annotations

import re
from typing import Optional

from . import weights


def registry_records(registry) -> list[dict]:
    """Every file and pack of the registry as a JSON-ready dict (licenses in full)."""
    files = [{"file": entry.name, "format": entry.format, "size": entry.size, "license": entry.license,
              "sha256": entry.sha256, "cached": weights.is_cached(entry), "description": entry.description}
             for entry in registry.files.values()]
    packs = [{"pack": pack.name, "builtin": pack.builtin, "local": pack.local, "generator": pack.generator,
              "clip_model": pack.clip_model, "clip_pretrained": pack.clip_pretrained, "mapper": pack.mapper,
              "identity": pack.identity, "cached": pack_cached(registry, pack)}
             for pack in registry.packs.values()]
    return files + packs


def pack_cached(registry, pack) -> bool:
    """Whether every file a pack needs is in the cache (builtin packs ship theirs)."""
    return pack.builtin or all(weights.is_cached(entry) for entry in registry.files_for(pack.name))


def short_license(text: str) -> str:
    """A license's label for a table: its text before the first '(' or ';' ("MIT (OpenAI CLIP); ..." -> "MIT")."""
    return re.split(r"\s*[(;]", text, maxsplit=1)[0].strip() or text


def registry_tables(registry) -> tuple:
    """(files, packs) rich tables, one line per row in 80 columns: short license labels, long values cut."""
    from rich import box
    from rich.table import Table

    def table(title: str, columns: tuple[str, ...]) -> Table:
        result = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for column in columns:
            result.add_column(column, no_wrap=True, overflow="ellipsis")
        return result

    files = table(f"Files ({registry.source})", ("name", "size", "cached", "license"))
    for entry in registry.files.values():
        files.add_row(entry.name, human_size(entry.size), "yes" if weights.is_cached(entry) else "no",
                      short_license(entry.license))
    packs = table("Packs (all fields: --list --json)", ("name", "generator", "mapper", "cached"))
    for pack in registry.packs.values():
        packs.add_row(pack.name + (" (local)" if pack.local else ""), "builtin" if pack.builtin else pack.generator,
                      "builtin" if pack.builtin else pack.mapper or "not trained yet",
                      "yes" if pack_cached(registry, pack) else "no")
    return files, packs


def human_size(size: Optional[int]) -> str:
    """A byte count as "350.8 MB" (decimal units); "?" when the registry does not say."""
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} GB"
