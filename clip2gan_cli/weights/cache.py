"""The local cache of verified files under $CLIP2GAN_HOME, its hash records and its lock.

    weights/<name>/<filename>            a verified file (only ever created by an atomic rename)
    weights/<name>/<filename>.sha256     the hash it was verified against (or recorded, if unpinned)
    weights/<name>/<filename>.partial    bytes of an interrupted download, resumed with HTTP Range
    weights/<name>/<filename>.lock       flock: one process downloads a file, the others wait
    packs.toml                           local packs registered by `train --export-pack`
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ModuleNotFoundError:  # pragma: no cover - Windows: no flock; downloads still use unique temp files
    fcntl = None

from ..errors import OutputError
from ..fileutil import atomic_write_text, sha256_file
from .registry import SHA256_RE, WeightEntry


def cache_dir() -> Path:
    """The cache directory: $CLIP2GAN_HOME, default ~/.cache/clip2gan."""
    home = os.environ.get("CLIP2GAN_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".cache" / "clip2gan"


def is_offline() -> bool:
    """True when CLIP2GAN_OFFLINE asks never to touch the network."""
    return os.environ.get("CLIP2GAN_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def cached_path(entry: WeightEntry) -> Path:
    """Where `entry` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / "weights" / entry.name / entry.filename


def record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def read_record(target: Path) -> str | None:
    try:
        text = record_path(target).read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return None
    return text if SHA256_RE.fullmatch(text) else None


def is_cached(entry: WeightEntry) -> bool:
    """True when the file is in the cache with the expected size and a matching hash record."""
    target = cached_path(entry)
    if not target.is_file() or (entry.size is not None and target.stat().st_size != entry.size):
        return False
    recorded = read_record(target)
    return recorded is not None and (entry.sha256 is None or recorded == entry.sha256)


def check_cached(entry: WeightEntry, target: Path) -> tuple[bool, str | None]:
    """(usable, actual_hash): is the file at `target` the one the registry means?

    A file with a matching hash record is trusted (it only got there through verification);
    otherwise (e.g. copied in by hand for offline use) it is hashed once and the record written.
    """
    if not target.is_file():
        return False, None
    if entry.size is not None and target.stat().st_size != entry.size:
        return False, f"{target.stat().st_size} bytes"
    recorded = read_record(target)
    expected = entry.sha256 or recorded
    if recorded is not None and recorded == expected:
        return True, recorded
    actual = sha256_file(target)
    if expected is None:
        warn_unpinned(entry, actual, target)
    elif actual != expected:
        return False, actual
    atomic_write_text(record_path(target), actual + "\n")
    return True, actual


def warn_unpinned(entry: WeightEntry, actual: str, target: Path) -> None:
    print_to_stderr(f"Warning: '{entry.name}' is not pinned in the registry; recorded its sha256 {actual} in "
                    f"{record_path(target)} (add `sha256 = \"{actual}\"` to [files.{entry.name}] to pin it).")


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def file_lock(path: Path, waiting_for: str | None = None) -> Iterator[None]:
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
                    print_to_stderr(f"Waiting for another process that is downloading '{waiting_for}'...")
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
