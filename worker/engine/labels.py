"""Label mode: the probability of each choice, from the model's log-likelihood of the whole choice.

A choice is scored as it would follow the prompt (with a leading space where the prompt ends
without one), token by token, so multi-token choices are exact. Rows are `prompt + choice[:-1]`
for each distinct `choice[:-1]`: when every choice is one token that is a single row, so one
forward pass per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gemma_batch.domain.records import ItemResult


class ChoiceScorer:
    def __init__(self, tokenizer: Any, choices: Sequence[str]) -> None:
        self.choices = list(choices)

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        # Keyed by "does the prompt end in whitespace".
        self.tokens = {
            True: [ids(choice) for choice in choices],
            False: [ids(" " + choice) for choice in choices],
        }
        self.longest = max(len(t) for variants in self.tokens.values() for t in variants)
        # The most rows one item becomes: one per distinct choice stem.
        self.stems = max(
            len(dict.fromkeys(tokens[:-1] for tokens in variants))
            for variants in self.tokens.values()
        )

    def rows(self, ids: list[int], text: str) -> tuple[list[list[int]], list[tuple[int, ...]]]:
        """The rows one item needs, and each choice's tokens for it."""
        choice_tokens = self.tokens[text[-1:].isspace()]
        stems = list(dict.fromkeys(tokens[:-1] for tokens in choice_tokens))
        return [ids + list(stem) for stem in stems], choice_tokens

    def result(
        self,
        index: int,
        prompt_tokens: int,
        logits: torch.Tensor,
        rows: list[list[int]],
        choice_tokens: list[tuple[int, ...]],
    ) -> ItemResult:
        """`logits`: the last `self.longest` positions of each of this item's rows."""
        stems = [tuple(row[prompt_tokens:]) for row in rows]
        normaliser = torch.logsumexp(logits, dim=-1)
        scores = []
        for tokens in choice_tokens:
            row = stems.index(tokens[:-1])
            first = self.longest - len(tokens)
            positions = torch.arange(first, self.longest)
            picked = logits[row, positions, torch.tensor(tokens)]
            scores.append(float((picked - normaliser[row, positions]).sum()))
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return ItemResult(
            index=index,
            output=self.choices[best],
            label=self.choices[best],
            label_probs=dict(zip(self.choices, probs, strict=True)),
            finish_reason="stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(choice_tokens[best]),
        )
