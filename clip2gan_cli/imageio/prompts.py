"""Prompts from the command line, where `-` reads one per line from stdin."""
from __future__ import annotations

from typing import Sequence

from ..errors import UserInputError


def read_prompt_args(prompts: Sequence[str], stdin=None) -> list[str]:
    """The prompts of a command line: each `-` is replaced by the non-empty lines of stdin (UTF-8)."""
    texts: list[str] = []
    for prompt in prompts:
        if prompt != "-":
            texts.append(prompt)
            continue
        import sys

        stream = stdin if stdin is not None else sys.stdin
        raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserInputError(f"stdin is not UTF-8 text (byte {error.start})") from error
        texts.extend(line.strip() for line in raw.splitlines() if line.strip())
        if not texts:
            raise UserInputError("no prompts on stdin", hint="give one prompt per line")
    return texts
