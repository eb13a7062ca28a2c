"""The engine: a plain class that turns work items into results, usable without Celery.

Generation runs through continuous batching (worker.engine.batcher): rows join as slots free up
and leave the moment they end. Labels are one forward pass per micro-batch of choice rows
(worker.engine.labels), with the shared prefix computed once. The worker's scheduler drives the
same primitives (`prepare`, `admit`, `step`, `result`, `label`) from the SQL store; `run`
drives them over a list of items, for tests and benchmarks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma_batch.domain.chat import gemma_turns
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import ItemResult, WorkItem
from worker.engine import faults
from worker.engine.adapters import AdapterError, Adapters
from worker.engine.batcher import Batcher, Row, Sampling, TokenLogprob
from worker.engine.labels import ChoiceScorer
from worker.engine.prefix import PrefixCache, common_prefix, forward_suffixes
from worker.engine.structured import JsonConstraint, check_json

log = logging.getLogger(__name__)

# Most rows decoded together (the largest batch the benchmarks showed still gaining).
MAX_ROWS = 256
EXPRESS_ROWS = 8  # sync requests decoding at once, apart from the main batch
# A shared prefix shorter than this is cheaper to compute again than to copy in.
MIN_SHARED_PREFIX = 16


@dataclass
class Encoded:
    item: WorkItem
    ids: list[int]
    text: str


@dataclass(eq=False)
class Request:
    """What the engine keeps of an item while its row runs: the row's key in the batcher."""

    owner: Any  # the caller's handle on the item
    encoded: Encoded
    params: GenerationParams
    json_schema: dict[str, Any] | None


def item_settings(item: WorkItem, spec: JobSpec) -> tuple[GenerationParams, dict[str, Any] | None]:
    """An item's own generation settings (OpenAI batch lines carry theirs), else its job's."""
    if item.params is None:
        return spec.params, spec.json_schema
    own = {key: value for key, value in item.params.items() if key != "json_schema"}
    return GenerationParams.model_validate(own), item.params.get("json_schema")


class Engine:
    """The model, its tokenizer and its batcher.

    `batch_tokens` bounds a batch: rows x (the widest row's prompt + new tokens), for label
    micro-batches and for the rows decoding together alike. Jobs may name a LoRA adapter of
    this model, read from `adapter_dir` (the model cache) on first use; `max_adapters` stay
    loaded.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_tokens: int,
        inject_faults: bool = False,
        adapter_dir: Path | None = None,
        max_adapters: int = 8,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.inject_faults = inject_faults  # tests only: see worker.engine.faults
        self.context = int(getattr(model.config, "max_position_embeddings", 8192))
        ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
        # -it models close their turn with <end_of_turn>; it ends an answer like EOS does.
        self.stop_ids = sorted(i for i in ends if i is not None and i != tokenizer.unk_token_id)
        self.adapter_dir = adapter_dir
        self.adapters = Adapters(model, max_adapters)
        self.batcher = Batcher(
            model, self.stop_ids, batch_tokens, MAX_ROWS, self._decode, self.adapters
        )
        # Sync requests decode in a small batch of their own, stepped ahead of the main one:
        # where a step costs in proportion to its rows (a CPU), a sync row in a full batch would
        # wait a full batch's step for each of its tokens. Its cache grows only when used.
        self.express = Batcher(
            model, self.stop_ids, batch_tokens, EXPRESS_ROWS, self._decode, self.adapters
        )
        self.prefixes = PrefixCache(model, self.adapters)
        self._json: JsonConstraint | None = None
        self._shared: dict[tuple[str, bool], list[int]] = {}
        self._admitting: list[Row] = []  # rows joining the main batch, while they prefill

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

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

    def _shared_prefix(self, ids: list[int], spec: JobSpec) -> tuple[int, ...]:
        """The leading ids this row shares with every row of its job: the job's prefix as
        rendered (in a chat, up to the prefix inside the first user turn)."""
        if not spec.prefix:
            return ()
        key = (spec.prefix, spec.chat)
        if key not in self._shared:
            self._shared[key] = self.render(WorkItem(0, "", None), spec).ids
        length = common_prefix([ids, self._shared[key]])
        return tuple(ids[:length]) if length >= MIN_SHARED_PREFIX else ()

    def use_adapter(self, name: str | None, joining: Sequence[Row] = ()) -> None:
        """Load an adapter before its rows run (a no-op for the base, or once loaded), keeping
        those of the running rows and of the rows `joining` with it."""
        if name is None or self.adapters.touch(name):
            return
        if self.adapter_dir is None:
            raise AdapterError(f"adapter '{name}' asked for, but this engine has no adapter cache")
        # Only a load may evict, so only then are the adapters in use gathered.
        rows = [*self.batcher.rows, *self.express.rows, *self._admitting, *joining]
        in_use = {row.adapter for row in rows if row.adapter}
        self.adapters.load(name, self.adapter_dir / name, in_use)

    def prepare(self, item: WorkItem, spec: JobSpec, owner: Any = None) -> Row | ItemResult:
        """A generation row for the item, or the result that says why it cannot run."""
        try:
            self.use_adapter(spec.adapter)
        except AdapterError as exc:
            return ItemResult(item.index, error=f"cannot load adapter {spec.adapter}: {exc}")
        try:
            encoded = self.render(item, spec)
        except Exception as exc:  # a chat template that refuses these messages, say
            return ItemResult(item.index, error=f"cannot render the prompt: {exc}")
        params, schema = item_settings(item, spec)
        budget = params.max_new_tokens
        if len(encoded.ids) + budget > self.context:
            return ItemResult(
                item.index,
                error=f"the prompt is {len(encoded.ids)} tokens; with {budget} new tokens it "
                f"exceeds the model's context of {self.context}",
            )
        sampling = Sampling(params.temperature, params.top_p, params.top_k)
        return Row(
            key=Request(owner, encoded, params, schema),
            ids=encoded.ids,
            budget=budget,
            sampling=sampling,
            seed=params.seed,
            stops=params.stop,
            top_logprobs=params.top_logprobs if params.logprobs else None,
            constraint=None if schema is None else self._json_constraint().matcher(schema),
            prefix=self._shared_prefix(encoded.ids, spec),
            adapter=spec.adapter,
        )

    def admit(self, rows: list[Row], express: bool = False) -> tuple[list[Row], list[Row]]:
        """Prefill rows into the running batch (or the express one): the rows that ended at
        once, and those put off because the device ran out of memory (half the group at a time
        is tried)."""
        batcher = self.express if express else self.batcher
        if self.inject_faults:
            faults.inject(row.key.encoded.text for row in rows)
        # Loaded when prepared, but another row's adapter may have pushed it out since.
        for adapter in {row.adapter for row in rows}:
            self.use_adapter(adapter, rows)
        try:
            if not express:  # their adapters stay loaded for sync rows served between passes
                self._admitting = rows
            return batcher.admit(rows), []
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(rows) == 1 and not batcher.rows:
                if batcher.max_rows == 1:
                    raise
                # The cache is sized for all the rows the batch may hold: try one row's.
                log.warning("out of memory admitting a row alone; the batch holds one row now")
                batcher.max_rows = 1
                return self.admit(rows, express)
            keep = len(rows) // 2
            log.warning("out of memory admitting %s rows; trying %s", len(rows), keep)
            # Fewer rows from now on: the batch that ran out of memory stays out of reach.
            batcher.max_rows = max(1, len(batcher.rows) + keep)
            if not keep:
                return [], rows
            ended, deferred = self.admit(rows[:keep], express)
            return ended, deferred + rows[keep:]
        finally:
            if not express:
                self._admitting = []

    def step(self, express: bool = False) -> list[Row]:
        """Decode steps of every running row (of the express batch, if asked; see
        Batcher.step); returns the rows that ended."""
        return (self.express if express else self.batcher).step()

    def result(self, row: Row) -> ItemResult:
        """A finished row's answer: its text up to a stop, why it ended, its token counts."""
        request: Request = row.key
        params = request.params
        tokens, kept = row.tokens, row.tokens
        finish = row.finish or "length"
        for position, token in enumerate(tokens):
            if token in self.stop_ids:
                kept, tokens = tokens[:position], tokens[: position + 1]
                break
        text = self._decode(kept)
        cuts = [text.find(stop) for stop in params.stop if stop in text]
        if cuts:
            finish, text = "stop", text[: min(cuts)]
        error = None
        if request.json_schema is not None:
            error = check_json(text, request.json_schema, params.max_new_tokens)
        return ItemResult(
            index=request.encoded.item.index,
            output=text,
            finish_reason=finish,
            prompt_tokens=len(row.ids),
            completion_tokens=len(tokens),
            logprobs=self._logprobs(row.logprobs[: len(tokens)]) if params.logprobs else None,
            error=error,
        )

    def _logprobs(self, steps: list[TokenLogprob]) -> list[dict[str, Any]]:
        """Per token made: its text, log-probability and the top alternatives (OpenAI's terms)."""

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._decode([token])
            return {"token": text, "bytes": list(text.encode()), "logprob": logprob}

        return [
            entry(step.token, step.logprob)
            | {"top_logprobs": [entry(token, logprob) for token, logprob in step.top]}
            for step in steps
        ]

    def label_batches(self, items: Sequence[WorkItem], spec: JobSpec) -> Iterator[list[ItemResult]]:
        """Label mode: results micro-batch by micro-batch, each under the token budget counted
        in the rows an item becomes (one per distinct choice stem)."""
        assert spec.choices
        try:
            self.use_adapter(spec.adapter)
        except AdapterError as exc:
            error = f"cannot load adapter {spec.adapter}: {exc}"
            yield [ItemResult(item.index, error=error) for item in items]
            return
        scorer = ChoiceScorer(self.tokenizer, spec.choices)
        encoded, failed = [], []
        for item in items:
            try:
                encoded.append(self.render(item, spec))
            except Exception as exc:  # a chat template that refuses these messages, say
                failed.append(ItemResult(item.index, error=f"cannot render the prompt: {exc}"))
        too_long = [e for e in encoded if len(e.ids) + scorer.longest > self.context]
        failed += [
            ItemResult(
                e.item.index,
                error=f"the prompt is {len(e.ids)} tokens; with {scorer.longest} new tokens it "
                f"exceeds the model's context of {self.context}",
            )
            for e in too_long
        ]
        if failed:
            yield failed
        encoded = [e for e in encoded if len(e.ids) + scorer.longest <= self.context]
        if not encoded:
            return
        prefix = encoded[0].ids[: common_prefix([e.ids for e in encoded])]
        for batch in self._label_micro_batches(encoded, scorer, len(prefix)):
            yield self._halving_on_oom(
                batch, lambda b: self._label(b, scorer, prefix, spec.adapter)
            )

    def _label_micro_batches(
        self, encoded: list[Encoded], scorer: ChoiceScorer, shared: int
    ) -> Iterator[list[Encoded]]:
        """Items by length, each batch's rows (an item's stems) x width under the budget."""
        stems = scorer.stems
        batch: list[Encoded] = []
        widest = 0
        for row in sorted(encoded, key=lambda e: len(e.ids), reverse=True):
            wider = max(widest, len(row.ids) - shared + scorer.longest)
            if batch and (len(batch) + 1) * stems * wider > self.batch_tokens:
                yield batch
                batch, wider = [], len(row.ids) - shared + scorer.longest
            batch.append(row)
            widest = wider
        if batch:
            yield batch

    def _halving_on_oom(self, batch: list[Encoded], run: Any) -> list[ItemResult]:
        """Run a label micro-batch; out of GPU memory, each half instead (no item fails for it)."""
        if self.inject_faults:
            faults.inject(row.text for row in batch)
        try:
            return list(run(batch))
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

    def run(self, items: Sequence[WorkItem], spec: JobSpec) -> Iterator[list[ItemResult]]:
        """Results as they come: continuous batching over `items` (or label micro-batches)."""
        if spec.choices:
            yield from self.label_batches(items, spec)
            return
        prepared = [self.prepare(item, spec) for item in items]
        unusable = [p for p in prepared if isinstance(p, ItemResult)]
        if unusable:
            yield unusable
        yield from self.generate([p for p in prepared if isinstance(p, Row)])

    def generate(self, rows: Sequence[Row]) -> Iterator[list[ItemResult]]:
        """Results of prepared rows (of any jobs and adapters) as they end, each row joining
        the running batch as soon as it fits."""
        waiting = deque(rows)
        while waiting or self.batcher.rows:
            group = []
            while waiting and self.batcher.fits(waiting[0], group):
                group.append(waiting.popleft())
            ended: list[Row] = []
            if group:
                ended, deferred = self.admit(group)
                waiting.extendleft(reversed(deferred))
            if self.batcher.rows:
                ended += self.step()
            if ended:
                yield [self.result(row) for row in ended]

    @torch.inference_mode()
    def _label(
        self, batch: list[Encoded], scorer: ChoiceScorer, prefix: list[int], adapter: str | None
    ) -> list[ItemResult]:
        plans = [scorer.rows(e.ids, e.text) for e in batch]
        suffixes = [row[len(prefix) :] for rows, _ in plans for row in rows]
        logits = forward_suffixes(self.prefixes, prefix, suffixes, scorer.longest, adapter)
        results, first = [], 0
        for e, (rows, choice_tokens) in zip(batch, plans, strict=True):
            mine = logits[first : first + len(rows)]
            results.append(scorer.result(e.item.index, len(e.ids), mine, rows, choice_tokens))
            first += len(rows)
        return results

    def _json_constraint(self) -> JsonConstraint:
        if self._json is None:
            self._json = JsonConstraint(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        return self._json
