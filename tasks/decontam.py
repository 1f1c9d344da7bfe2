"""8-gram word-overlap decontamination of training pools against evaluation sets.

A training problem that shares any run of 8 consecutive words with an evaluation problem is
contaminated (the GPT-3 / Llama reports' criterion, at word level). Problems shorter than 8 words
are compared whole, so an exact short duplicate is still caught.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(text: str, n: int = 8) -> set[bytes]:
    tokens = words(text)
    if len(tokens) < n:
        return {_key(tokens)} if tokens else set()
    return {_key(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _key(tokens: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(tokens).encode(), digest_size=8).digest()


@dataclass(frozen=True)
class Match:
    set_name: str
    problem_id: str


class Decontaminator:
    def __init__(self, n: int = 8):
        self.n = n
        self.index: dict[bytes, Match] = {}
        self.sets: list[str] = []

    def add_set(self, name: str, problems: list[tuple[str, str]]) -> None:
        """problems: (problem_id, question) of one evaluation set."""
        self.sets.append(name)
        for problem_id, question in problems:
            for gram in ngrams(question, self.n):
                self.index.setdefault(gram, Match(name, problem_id))

    def match(self, question: str) -> Match | None:
        for gram in ngrams(question, self.n):
            hit = self.index.get(gram)
            if hit is not None:
                return hit
        return None
