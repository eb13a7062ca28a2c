"""One micro-batch through `generate`, on CUDA in a few fixed shapes so compiled decoding is reused.

With a static KV cache on CUDA, transformers compiles the decoding step (torch.compile with CUDA
graphs: about 4x faster per step than eager for Gemma). Each new (rows, cache length) shape costs
another compile or graph capture, so a worker that saw every batch size would keep compiling.
Micro-batches are padded up to a few fixed shapes instead: extra rows repeat the first row and
are dropped afterwards, and the cache is sized to a length bucket.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

ROW_BUCKETS = (1, 8, 32, 64, 128, 256)
LENGTH_BUCKETS = (256, 1024, 4096, 8192)


class RowLimits(StoppingCriteria):
    """Ends each row at its own max_new_tokens, so rows with different budgets share a batch."""

    def __init__(self, prompt_width: int, limits: list[int]) -> None:
        self.prompt_width = prompt_width
        self.limits = torch.tensor(limits)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any
    ) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_width
        return self.limits.to(input_ids.device) <= made  # type: ignore[return-value]


def bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `value`; None when none does."""
    return next((b for b in buckets if b >= value), None)


def shaped(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limits: list[int],
    static: bool,
    **kwargs: Any,
) -> dict[str, Any]:
    """`generate`'s arguments for a micro-batch: in a bucketed shape with a static KV cache when
    `static` (a batch beyond the largest bucket stays as it is), each row ending at its limit.
    """
    rows, width = input_ids.shape
    most = max(limits)
    padded_rows = bucket(rows, ROW_BUCKETS) if static else None
    cache_len = bucket(width + most, LENGTH_BUCKETS) if static else None
    if padded_rows is not None and cache_len is not None:
        extra = padded_rows - rows
        input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
        attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])
        limits = limits + [limits[0]] * extra
        kwargs |= {"cache_implementation": "static", "max_cache_len": cache_len}
    if min(limits) < most:
        kwargs["stopping_criteria"] = StoppingCriteriaList([RowLimits(width, limits)])
    return kwargs | {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": most,
    }


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limits: list[int],
    static: bool,
    **kwargs: Any,
) -> torch.Tensor:
    """New tokens of each row (rows x most new tokens, padded where a row ended early).

    `limits` holds each row's own max_new_tokens.
    """
    rows, width = input_ids.shape
    output = model.generate(**shaped(input_ids, attention_mask, limits, static, **kwargs))
    return output[:rows, width:]
