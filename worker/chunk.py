"""Running one delivery of a chunk: grouping, isolating poison items, storing as results come."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import ItemResult, WorkItem
from gemma_batch.store.claims import Claimed, mark_started
from gemma_batch.store.results import record_results
from worker import metrics
from worker.heartbeat import with_db_retries

log = logging.getLogger(__name__)


def run_groups(engine: Any, items: list[WorkItem], spec: JobSpec) -> Iterator[list[ItemResult]]:
    """Items with their own settings (OpenAI batch lines) run in groups of equal settings.

    Only max_new_tokens may differ inside a group: the engine ends each row at its own.
    """
    groups: dict[str, list[WorkItem]] = {}
    for item in items:
        key = {k: v for k, v in (item.params or {}).items() if k != "max_new_tokens"}
        groups.setdefault(json.dumps(key if item.params else None, sort_keys=True), []).append(item)
    for group in groups.values():
        own = group[0].params
        if own is None:
            yield from engine.run(group, spec)
            continue
        params = {k: v for k, v in own.items() if k != "json_schema"}
        params["max_new_tokens"] = max(item.params["max_new_tokens"] for item in group)  # type: ignore[index]
        update = {
            "params": GenerationParams.model_validate(params),
            "json_schema": own.get("json_schema"),
        }
        yield from engine.run(group, spec.model_copy(update=update))


class Chunk:
    """One delivery's items: first-timers together, items whose run died before one by one.

    An item's attempts count runs it started. Items that were in a run that never finished
    (the worker process died) are suspects and run alone, so a poison item cannot take a batch
    down twice; one that has started max_attempts runs without finishing is failed unrun. A
    batch that raises is bisected until the item that raises is found and failed alone.
    """

    def __init__(self, engine: Any, job_id: str, spec: JobSpec, max_attempts: int) -> None:
        self.engine, self.job_id, self.spec, self.max_attempts = engine, job_id, spec, max_attempts
        self.stored = 0
        self.open_jobs: set[str] = set()

    def run(self, claimed: list[Claimed]) -> int:
        self.open_jobs = {c.job_id for c in claimed}
        doomed = [c for c in claimed if c.attempts >= self.max_attempts]
        if doomed and not self._store(
            [
                (
                    c,
                    ItemResult(
                        c.item.index,
                        error=f"the worker process died in each of this item's {c.attempts} "
                        "runs; it is not run again",
                    ),
                )
                for c in doomed
            ]
        ):
            return self.stored
        first = [c for c in claimed if c.attempts == 0]
        suspects = [[c] for c in claimed if 0 < c.attempts < self.max_attempts]
        for group in ([first] if first else []) + suspects:
            with_db_retries(partial(mark_started, item_ids=[c.item_id for c in group]))
            if not self._bisect(group):
                log.info("the jobs in this delivery (chunk of %s) are over; it stops", self.job_id)
                break
        return self.stored

    def _bisect(self, group: list[Claimed]) -> bool:
        """Run a group, or if it raises, its unanswered halves; False once its jobs are over."""
        batch = [replace(c.item, index=k) for k, c in enumerate(group)]
        answered: set[int] = set()
        results = run_groups(self.engine, batch, self.spec)
        started = time.perf_counter()
        while True:
            try:
                done = next(results)
            except StopIteration:
                return True
            except Exception as exc:
                left = [c for k, c in enumerate(group) if k not in answered]
                if len(left) == 1:
                    log.exception("item %s of job %s fails", left[0].item.index, left[0].job_id)
                    error = f"{exc.__class__.__name__}: {exc}"
                    return self._store([(left[0], ItemResult(left[0].item.index, error=error))])
                log.warning("a batch of %s items raised %r; splitting it", len(left), exc)
                half = len(left) // 2
                return self._bisect(left[:half]) and self._bisect(left[half:])
            metrics.observe(done, time.perf_counter() - started)
            answered.update(r.index for r in done)
            if not self._store(
                [(group[r.index], replace(r, index=group[r.index].item.index)) for r in done]
            ):
                return False
            started = time.perf_counter()

    def _store(self, results: list[tuple[Claimed, ItemResult]]) -> bool:
        """Write results into their own jobs; False once every job in this delivery is over.

        A cancelled job's items stop being written at once; the delivery goes on while it holds
        items of other jobs (small-job merging), so theirs are not left half-run.
        """
        by_job: dict[str, list[ItemResult]] = {}
        for claim, result in results:
            by_job.setdefault(claim.job_id, []).append(result)
        for owner, answered in by_job.items():
            if not with_db_retries(partial(record_results, job_id=owner, results=answered)):
                self.open_jobs.discard(owner)
        self.stored += len(results)
        return bool(self.open_jobs)
