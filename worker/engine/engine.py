"""The batch engine: a plain class that turns work items into results, usable without Celery."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gemma_batch.domain.chat import gemma_turns
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import ItemResult, WorkItem
from worker.engine import decoding, faults
from worker.engine.labels import ChoiceScorer
from worker.engine.prefix import PrefixCache, common_prefix, forward_suffixes
from worker.engine.structured import JsonConstraint, check_json

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    item: WorkItem
    ids: list[int]
    text: str
    new_tokens: int = 0  # the most this row may add (its own max_new_tokens)


class Engine:
    """Runs many items at once: sorted by length, cut into padded micro-batches.

    A micro-batch holds as many rows as fit `batch_tokens`, counting each row as the longest
    prompt in it plus the new tokens asked for (what left padding really costs). With `static`
    (CUDA), generation uses a static KV cache in a few fixed shapes (see worker.engine.decoding).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_tokens: int,
        static: bool = False,
        inject_faults: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.static = static
        self.inject_faults = inject_faults  # tests only: see worker.engine.faults
        # Past the largest row bucket a batch would leave the compiled shapes.
        self.max_rows = decoding.ROW_BUCKETS[-1] if static else None
        self.context = int(getattr(model.config, "max_position_embeddings", 8192))
        ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
        # -it models close their turn with <end_of_turn>; it ends an answer like EOS does.
        self.stop_ids = sorted(i for i in ends if i is not None and i != tokenizer.unk_token_id)
        self.prefixes = PrefixCache(model)
        self._json: JsonConstraint | None = None

    def render(self, item: WorkItem, spec: JobSpec | None = None) -> Encoded:
        """Token ids of an item: its prompt, or its messages in the model's chat format."""
        spec = spec or JobSpec()
        messages = item.messages
        if item.prompt is not None and spec.chat:
            messages = [{"role": "user", "content": spec.prefix + item.prompt}]
        elif messages is not None and spec.prefix:
            # The shared prefix opens the first user turn, as it opens a plain prompt.
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = [
                m | {"content": spec.prefix + m["content"]} if i == first else m
                for i, m in enumerate(messages)
            ]
        if messages is None:
            text = spec.prefix + (item.prompt or "")
            return Encoded(item, list(self.tokenizer(text)["input_ids"]), text)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = gemma_turns(messages)
        # A chat template writes <bos> itself; the fallback leaves it to the tokenizer.
        bos = self.tokenizer.bos_token
        with_bos = not (bos and text.startswith(bos))
        return Encoded(
            item, list(self.tokenizer(text, add_special_tokens=with_bos)["input_ids"]), text
        )

    def micro_batches(self, encoded: list[Encoded]) -> Iterator[list[Encoded]]:
        """Rows with like budgets and lengths together, each batch under the token budget.

        A padded batch costs rows x (longest prompt + most new tokens in it).
        """
        batch: list[Encoded] = []
        longest = most = 0
        for row in sorted(encoded, key=lambda e: (e.new_tokens, len(e.ids)), reverse=True):
            wider, more = max(longest, len(row.ids)), max(most, row.new_tokens)
            full = len(batch) == self.max_rows
            if batch and (full or (len(batch) + 1) * (wider + more) > self.batch_tokens):
                yield batch
                batch, wider, more = [], len(row.ids), row.new_tokens
            batch.append(row)
            longest, most = wider, more
        if batch:
            yield batch

    def run(self, items: Sequence[WorkItem], spec: JobSpec) -> Iterator[list[ItemResult]]:
        """Results micro-batch by micro-batch, so callers can store progress as it comes."""
        scorer = ChoiceScorer(self.tokenizer, spec.choices) if spec.choices else None
        encoded, unusable = [], []
        for item in items:
            try:
                encoded.append(self.render(item, spec))
            except Exception as exc:  # a chat template that refuses these messages, say
                unusable.append(ItemResult(item.index, error=f"cannot render the prompt: {exc}"))
        if unusable:
            yield unusable
        for e in encoded:
            own = (e.item.params or {}).get("max_new_tokens", spec.params.max_new_tokens)
            e.new_tokens = scorer.longest if scorer else own
        too_long = [e for e in encoded if len(e.ids) + e.new_tokens > self.context]
        if too_long:
            yield [
                ItemResult(
                    e.item.index,
                    error=f"the prompt is {len(e.ids)} tokens; with {e.new_tokens} new tokens it "
                    f"exceeds the model's context of {self.context}",
                )
                for e in too_long
            ]
            encoded = [e for e in encoded if len(e.ids) + e.new_tokens <= self.context]
        if not encoded:
            return
        if scorer:
            prefix = encoded[0].ids[: common_prefix([e.ids for e in encoded])]
            for batch in self.micro_batches(encoded):
                yield self._halving_on_oom(batch, lambda b: self._label(b, scorer, prefix))
            return
        for batch in self.micro_batches(encoded):
            yield self._halving_on_oom(batch, lambda b: self._generate(b, spec))

    def _halving_on_oom(
        self, batch: list[Encoded], run: Callable[[list[Encoded]], list[ItemResult]]
    ) -> list[ItemResult]:
        """Run a micro-batch; out of GPU memory, run each half instead (no item fails for it)."""
        if self.inject_faults:
            faults.inject(row.text for row in batch)
        try:
            return run(batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            log.warning(
                "out of memory with %s rows; trying %s and %s", len(batch), half, len(batch) - half
            )
            return self._halving_on_oom(batch[:half], run) + self._halving_on_oom(batch[half:], run)

    @torch.inference_mode()
    def _label(
        self, batch: list[Encoded], scorer: ChoiceScorer, prefix: list[int]
    ) -> list[ItemResult]:
        plans = [scorer.rows(e.ids, e.text) for e in batch]
        suffixes = [row[len(prefix) :] for rows, _ in plans for row in rows]
        logits = forward_suffixes(self.model, self.prefixes, prefix, suffixes, scorer.longest)
        results, first = [], 0
        for e, (rows, choice_tokens) in zip(batch, plans, strict=True):
            mine = logits[first : first + len(rows)]
            results.append(scorer.result(e.item.index, len(e.ids), mine, rows, choice_tokens))
            first += len(rows)
        return results

    @torch.inference_mode()
    def _generate(self, batch: list[Encoded], spec: JobSpec) -> list[ItemResult]:
        params = spec.params
        inputs = self.tokenizer.pad(
            {"input_ids": [row.ids for row in batch]}, padding=True, return_tensors="pt"
        ).to(self.model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        extra: dict[str, Any] = {}
        if params.stop:
            extra = {"stop_strings": params.stop, "tokenizer": self.tokenizer}
        if spec.json_schema is not None:
            extra["logits_processor"] = [self._json_constraint().processor(spec.json_schema)]
        new = decoding.generate(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            [row.new_tokens for row in batch],
            self.static,
            **params.to_generate_kwargs(),
            **extra,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        ).tolist()
        return [self._result(row, tokens, spec) for row, tokens in zip(batch, new, strict=True)]

    def _json_constraint(self) -> JsonConstraint:
        if self._json is None:
            self._json = JsonConstraint(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        return self._json

    def _result(self, row: Encoded, tokens: list[int], spec: JobSpec) -> ItemResult:
        params: GenerationParams = spec.params
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
        error = None
        if spec.json_schema is not None:
            error = check_json(text, spec.json_schema, params.max_new_tokens)
        return ItemResult(
            index=row.item.index,
            output=text,
            finish_reason=finish,
            prompt_tokens=len(row.ids),
            completion_tokens=len(tokens),
            error=error,
        )
