"""A compact word-level tokenizer for small packs (the shipped `shapes` CLIP).

open_clip's BPE vocabulary has 49,408 tokens; its embedding table alone would be most of a
tiny pack. A pack whose captions use a few dozen words instead ships its word list, and this
tokenizer maps text to the same kind of tensor open_clip tokenizers return:
`tokenizer(["a red circle"]) -> LongTensor [N, context_length]`, laid out as
`<sot> words... <eot> <pad>...`. `<eot>` has the largest id, so open_clip's text tower (which
pools the position of the argmax token id) reads the features at the end of the text.
Words the vocabulary lacks become `<unk>`; `unknown_words` reports them so the CLI can warn.
"""
from __future__ import annotations

import re
from typing import Iterable

from .errors import UserInputError

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
_WORD = re.compile(r"[a-z0-9]+")


class VocabTokenizer:
    """Lower-cased word tokenizer over a fixed vocabulary; ids: pad 0, unk 1, sot 2, words, eot last."""

    def __init__(self, words: Iterable[str], context_length: int = 16):
        words = [w.lower() for w in words]
        if not words:
            raise UserInputError("a VocabTokenizer needs at least one word")
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad:
            raise UserInputError(f"vocabulary words must be lower-case letters/digits, got {bad[:3]}")
        if len(set(words)) != len(words):
            raise UserInputError("vocabulary words must be unique")
        if context_length < 3:
            raise UserInputError(f"context_length must be >= 3, got {context_length}")
        self.words = tuple(words)
        self.context_length = int(context_length)
        self.itos = (PAD, UNK, SOT, *self.words, EOT)
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.sot_id, self.eot_id = 0, 1, 2, len(self.itos) - 1

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the text tower's embedding rows)."""
        return len(self.itos)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case a text and split it into words (punctuation is dropped)."""
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        """Token ids of one text without padding: sot, words (truncated to fit), eot."""
        ids = [self.stoi.get(word, self.unk_id) for word in self.split(text)]
        ids = ids[: self.context_length - 2]
        return [self.sot_id, *ids, self.eot_id]

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        """Tokenize like open_clip: LongTensor [N, context_length], zero-padded."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        tokens = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length:  # a shorter context than the vocabulary's: keep eot last
                ids = ids[: length - 1] + [self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def unknown_words(self, texts: str | list[str]) -> list[str]:
        """Words in the texts that are not in the vocabulary (each once, in order of appearance)."""
        if isinstance(texts, str):
            texts = [texts]
        unknown: list[str] = []
        for text in texts:
            for word in self.split(text):
                if word not in self.stoi and word not in unknown:
                    unknown.append(word)
        return unknown

    def decode(self, ids) -> str:
        """The words of a token row (special tokens dropped, unknown words shown as <unk>)."""
        out = []
        for token_id in [int(i) for i in ids]:
            if token_id in (self.pad_id, self.sot_id, self.eot_id):
                continue
            out.append(self.itos[token_id] if 0 <= token_id < len(self.itos) else UNK)
        return " ".join(out)

    def to_dict(self) -> dict:
        """JSON-ready description (stored in a pack's clip_config.json)."""
        return {"type": "vocab", "words": list(self.words), "context_length": self.context_length}

    @classmethod
    def from_dict(cls, data: dict) -> "VocabTokenizer":
        """Rebuild from `to_dict()` output."""
        try:
            return cls(data["words"], context_length=int(data.get("context_length", 16)))
        except (KeyError, TypeError) as error:
            raise UserInputError(f"malformed vocabulary tokenizer description: {error}") from error

    def __repr__(self) -> str:
        return f"VocabTokenizer(words={len(self.words)}, context_length={self.context_length})"
