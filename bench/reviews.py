"""W2's data: a few hundred short, clear reviews with their sentiment, made deterministically."""

from __future__ import annotations

import random

SUBJECTS = [
    "film",
    "hotel",
    "blender",
    "book",
    "restaurant",
    "phone",
    "concert",
    "jacket",
    "game",
    "tour",
]
GOOD = [
    "I loved this {s}, it was wonderful from start to finish.",
    "What a fantastic {s}! Highly recommended.",
    "The {s} was excellent and worth every penny.",
    "A delightful {s}; I would happily buy it again.",
    "Superb {s}, everything about it was perfect.",
]
BAD = [
    "I hated this {s}, it was a complete waste of money.",
    "What an awful {s}. Avoid it.",
    "The {s} was terrible and broke my heart.",
    "A dreadful {s}; I want a refund.",
    "Horrible {s}, everything about it went wrong.",
]


def reviews(count: int = 300, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        sentiment = "positive" if index % 2 == 0 else "negative"
        text = rng.choice(GOOD if sentiment == "positive" else BAD).format(s=rng.choice(SUBJECTS))
        rows.append({"id": f"w2-{index}", "text": text, "sentiment": sentiment})
    return rows
