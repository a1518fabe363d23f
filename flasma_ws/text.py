"""Wording shared by messages: counts with the right plural ("1 query", "2 queries")."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and the noun, plural only for plurals; `plural` for irregular ones (queries)."""
    word = noun if count == 1 else (plural or f"{noun}s")
    return f"{count:,} {word}"
