"""The shared start of many prompts (a few-shot prefix, a template's fixed text), computed once.

Its KV cache is kept between micro-batches and chunks, and each batch continues from a copy of
it, so only each row's own tokens are computed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from worker.engine.adapters import Adapters
from worker.engine.head import Head


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all rows share, leaving each row at least one token of its own."""
    shortest = min(len(row) for row in rows)
    first = rows[0]
    length = 0
    while length < shortest - 1 and all(row[length] == first[length] for row in rows):
        length += 1
    return length


class PrefixCache:
    """Holds the KV cache of the last prefix seen (jobs send the same prefix chunk after chunk),
    and runs the model with the rows' adapter, if any."""

    def __init__(self, model: Any, adapters: Adapters | None = None) -> None:
        self.model, self.adapters = model, adapters
        self._key: tuple[str | None, tuple[int, ...]] = (None, ())
        self._cache: Any = None

    def serving(self, adapter: str | None, rows: int) -> Any:
        if self.adapters is None:
            return nullcontext()
        return self.adapters.serving([adapter] * rows)

    @torch.inference_mode()
    def for_rows(self, prefix: Sequence[int], rows: int, adapter: str | None = None) -> Any:
        """A fresh cache holding `prefix` (as `adapter` computes it) for `rows` rows."""
        if (adapter, tuple(prefix)) != self._key:
            ids = torch.tensor([list(prefix)], device=self.model.device)
            with self.serving(adapter, 1):
                self._cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
            self._key = (adapter, tuple(prefix))
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(rows)
        return cache


def forward_suffixes(
    prefixes: PrefixCache,
    prefix: Sequence[int],
    suffixes: list[list[int]],
    keep: int,
    adapter: str | None = None,
) -> torch.Tensor:
    """Logits of the last `keep` positions of each row `prefix + suffix`, the prefix from cache,
    every row run with `adapter` (None: the base model).

    Rows are padded on the right, so every token sits in the cache slot of its own position
    (sliding-window layers count slots, so padding in the middle would shift their window);
    the head is applied only at the positions asked for, not to the whole vocabulary everywhere.
    """
    start, width, rows = len(prefix), max(map(len, suffixes)), len(suffixes)
    pad = prefixes.model.config.pad_token_id or 0
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, start + width), dtype=torch.long)
    mask[:, :start] = 1
    for row, suffix in enumerate(suffixes):
        input_ids[row, : len(suffix)] = torch.tensor(suffix)
        mask[row, start : start + len(suffix)] = 1
    model = prefixes.model
    device = model.device
    cache = prefixes.for_rows(prefix, rows, adapter) if start else None
    with prefixes.serving(adapter, rows):
        hidden = model.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=torch.arange(start, start + width, device=device).expand(rows, -1),
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
    lengths = torch.tensor([len(suffix) for suffix in suffixes], device=device)
    # A row shorter than `keep` repeats its first position; callers never read those.
    wanted = (lengths[:, None] - keep + torch.arange(keep, device=device)).clamp(min=0)
    picked = hidden[torch.arange(rows, device=device)[:, None], wanted]
    with prefixes.serving(adapter, rows):  # an adapter may target the head too
        return Head(model).logits(picked)
