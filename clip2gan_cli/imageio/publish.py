"""Publishing finished files: atomic writes, and names that never replace a different file."""
from __future__ import annotations

import contextlib
import errno
import filecmp
import itertools
import os
import secrets
from pathlib import Path

from ..errors import OutputError
from ..fileutil import atomic_path


def publish_new_file(source: Path, path: Path) -> Path:
    """Give the finished file `source` the name `path` without ever replacing a different file.

    A hard link claims a name atomically (it fails when the name exists), so two processes that
    write the same deterministic name cannot overwrite each other. When `path` already holds the
    same bytes it is kept (a rerun changes nothing); when it holds other bytes the file is published
    as `<stem>-2<suffix>`, `-3`, ... Returns the name used; `source` is left for the caller to remove.
    """
    for number in itertools.count(1):
        candidate = path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        try:
            os.link(source, candidate)
            return candidate
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise OutputError(f"cannot write {candidate}: {error.strerror or error}") from error
            if not candidate.exists():  # no hard links on this file system: check, then rename (racy)
                os.replace(source, candidate)
                return candidate
        if candidate.is_file() and filecmp.cmp(source, candidate, shallow=False):
            return candidate


def write_output(path: Path, write, no_clobber: bool) -> Path:
    """Run `write(tmp)` on a temp file, then publish it at `path` (replacing it) or, with
    `no_clobber`, through `publish_new_file`. Returns the path written."""
    if not no_clobber:
        with atomic_path(path) as tmp:
            write(tmp)
        return path
    staged = path.with_name(f".{path.name}.{secrets.token_hex(6)}.staged")  # complete, fsynced, hidden
    try:
        with atomic_path(staged) as tmp:
            write(tmp)
        return publish_new_file(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
