"""Fetching registry files into the cache: urllib only, resumed with HTTP Range, retried with
backoff, tried mirror by mirror, verified (size, sha256) before an atomic rename.

No third-party library downloads on its own: loaders take the paths `fetch` returns.
"""
from __future__ import annotations

import contextlib
import glob
import http.client
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChecksumError, DownloadError, OutputError, UserInputError, WeightsNotFoundError
from ..fileutil import atomic_write_text, sha256_file
from .cache import (cached_path, check_cached, fcntl, file_lock, is_offline, print_to_stderr, read_record,
                    record_path, warn_unpinned)
from .loading import load_registry
from .registry import Registry, WeightEntry, is_path_reference

_CHUNK = 1 << 20


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


def resolve_reference(reference: str, registry: Registry | None = None, progress: bool = True) -> Path:
    """A pack's file reference as a local path: a registry name is fetched, a path must exist."""
    if is_path_reference(reference):
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
    usable, actual = check_cached(entry, target)
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
    with file_lock(target.with_name(target.name + ".lock"), waiting_for=name):
        usable, _ = check_cached(entry, target)  # another process may have fetched it while we waited
        if not usable:
            _download(entry, target, progress, policy or DownloadPolicy.from_env())
    return target


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
        atomic_write_text(record_path(target), digest + "\n")
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
    expected = entry.sha256 or read_record(target)
    if expected is None:
        warn_unpinned(entry, actual, target)
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
    from .. import __version__

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
            print_to_stderr(message)

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)
