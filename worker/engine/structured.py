"""Structured output: generation constrained by a JSON Schema, through xgrammar.

xgrammar compiles a schema into a token mask applied at every step, runs on the CPU as well as
on CUDA; the batcher keeps one matcher per row and masks that row's logits at every step.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import xgrammar as xgr

from gemma_batch.domain.json_schema import first_violation


class JsonConstraint:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        # The grammar must end an answer on the same tokens the engine stops on.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self.compiler = xgr.GrammarCompiler(info)

    @lru_cache(maxsize=16)  # noqa: B019 - one engine per process; schemas repeat chunk after chunk
    def _compiled(self, schema: str) -> xgr.CompiledGrammar:
        # Compact JSON: whitespace the schema does not need only spends the token budget.
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, schema: dict[str, Any]) -> xgr.GrammarMatcher:
        """A fresh matcher for one row: it follows the row's tokens and masks the next one."""
        return xgr.GrammarMatcher(self._compiled(json.dumps(schema, sort_keys=True)))


def check_json(text: str, schema: dict[str, Any], max_new_tokens: int) -> str | None:
    """Why `text` is not a valid answer, or None when it parses and validates."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return f"the JSON answer did not complete within max_new_tokens={max_new_tokens}"
    problem = first_violation(value, schema)
    return None if problem is None else f"the answer does not match the schema: {problem}"
