"""Prompts for the generation workloads, made deterministically."""

from __future__ import annotations

import random

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "rivers",
    "run",
    "to",
    "the",
    "sea",
    "and",
    "old",
    "towns",
    "sleep",
    "under",
    "summer",
    "rain",
    "as",
    "children",
    "laugh",
    "near",
    "bright",
    "windows",
    "full",
    "of",
    "books",
    "music",
    "and",
    "bread",
]


def prompts(count: int, low: int = 10, high: int = 45, seed: int = 0) -> list[str]:
    """`count` prompts of `low` to `high` words."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize()
        for _ in range(count)
    ]


def lengths(count: int, low: int = 1, high: int = 128, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]
