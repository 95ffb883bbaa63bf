"""One exception hierarchy for clip2gan.

The CLI maps every class here to a one-line message on stderr and exit code 1
(`EXIT_CODES`); a traceback is shown only when CLIP2GAN_DEBUG=1.
Library users catch `Clip2ganError` (or a subclass) and get the same message via `str()`.
"""
from __future__ import annotations


class Clip2ganError(Exception):
    """Base class: an error the user can act on. `hint` says what to do next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message (and hint) flattened to one line for the terminal."""
        text = " ".join(str(self).split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text


class UserInputError(Clip2ganError):
    """A bad argument, prompt, image or file given by the user."""


class DeviceError(Clip2ganError):
    """The requested device, precision or backend is not available here."""


class RegistryError(Clip2ganError):
    """weights.toml (or a --registry file) is malformed."""


class WeightsNotFoundError(Clip2ganError):
    """A weight file is not in the cache and cannot be fetched (offline, unknown name)."""


class DownloadError(Clip2ganError):
    """Every URL and mirror failed, or the server answered with an error."""


class ChecksumError(DownloadError):
    """A downloaded file's size or sha256 differs from the registry."""


class CheckpointError(Clip2ganError):
    """A checkpoint cannot be read: corrupt, unknown layout, or wrong architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to import or call something outside the allow-list; nothing was executed."""


class NoMapperError(Clip2ganError):
    """The pack has no trained mapper yet."""


class TrainingError(Clip2ganError):
    """Training cannot go on (non-finite loss, incompatible resume, ...)."""


class OutputError(Clip2ganError):
    """An output file or directory cannot be written."""


class ImageError(UserInputError):
    """An input image is missing, unreadable, too small, or holds no face when one is needed."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters (its type name when empty).

    Third-party errors (torch, safetensors, Pillow) often span many lines; a one-line report keeps
    the first, and an empty message must not make the report itself fail.
    """
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


# One table: exception class -> process exit code (most specific first; Typer usage errors keep 2).
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (Clip2ganError, 1),
]


def exit_code_for(error: BaseException) -> int:
    """Exit code for an exception raised out of a command (1 for every project error)."""
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1
