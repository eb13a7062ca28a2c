"""The batch engine: a plain class that turns work items into results, usable without Celery."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gemma_batch.chat import gemma_turns
from gemma_batch.params import GenerationParams
from gemma_batch.progress import ItemResult, WorkItem

log = logging.getLogger(__name__)


@dataclass
class _Encoded:
    item: WorkItem
    ids: list[int]


class Engine:
    """Generates for many items at once: sorted by length, cut into padded micro-batches.

    A micro-batch holds as many rows as fit `batch_tokens`, counting each row as the longest
    prompt in it plus the new tokens asked for (what left padding really costs).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
        # -it models close their turn with <end_of_turn>; it ends an answer like EOS does.
        self.stop_ids = sorted(i for i in ends if i is not None and i != tokenizer.unk_token_id)

    def render(self, item: WorkItem) -> list[int]:
        """Token ids of an item: its prompt, or its messages in the model's chat format."""
        if item.prompt is not None:
            return list(self.tokenizer(item.prompt)["input_ids"])
        assert item.messages is not None
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                item.messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = gemma_turns(item.messages)
        # A chat template writes <bos> itself; the fallback leaves it to the tokenizer.
        bos = self.tokenizer.bos_token
        with_bos = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=with_bos)["input_ids"])

    def micro_batches(self, encoded: list[_Encoded], new_tokens: int) -> Iterator[list[_Encoded]]:
        batch: list[_Encoded] = []
        for row in sorted(encoded, key=lambda e: len(e.ids), reverse=True):
            # Longest first, so the first row of a batch sets its padded width.
            width = (len(batch[0].ids) if batch else len(row.ids)) + new_tokens
            if batch and (len(batch) + 1) * width > self.batch_tokens:
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def generate(
        self, items: Sequence[WorkItem], params: GenerationParams
    ) -> Iterator[list[ItemResult]]:
        """Results micro-batch by micro-batch, so callers can store progress as it comes."""
        encoded = [_Encoded(item, self.render(item)) for item in items]
        for batch in self.micro_batches(encoded, params.max_new_tokens):
            yield self._run(batch, params)

    @torch.inference_mode()
    def _run(self, batch: list[_Encoded], params: GenerationParams) -> list[ItemResult]:
        inputs = self.tokenizer.pad(
            {"input_ids": [row.ids for row in batch]}, padding=True, return_tensors="pt"
        ).to(self.model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        extra: dict[str, Any] = {}
        if params.stop:
            extra = {"stop_strings": params.stop, "tokenizer": self.tokenizer}
        output = self.model.generate(
            **inputs,
            **params.to_generate_kwargs(),
            **extra,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._result(row, tokens, params) for row, tokens in zip(batch, new, strict=True)]

    def _result(self, row: _Encoded, tokens: list[int], params: GenerationParams) -> ItemResult:
        finish = "length"
        # Rows that finish early are padded while the rest of the batch goes on.
        while tokens and tokens[-1] == self.tokenizer.pad_token_id:
            tokens = tokens[:-1]
        kept = tokens
        for position, token in enumerate(tokens):
            if token in self.stop_ids:
                finish, kept, tokens = "stop", tokens[:position], tokens[: position + 1]
                break
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in params.stop if stop in text]
        if cuts:
            finish, text = "stop", text[: min(cuts)]
        return ItemResult(
            index=row.item.index,
            output=text,
            finish_reason=finish,
            prompt_tokens=len(row.ids),
            completion_tokens=len(tokens),
        )
