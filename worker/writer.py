"""Results go to SQL from a thread of their own, in batches, off the decode path.

The scheduler hands each finished item over and goes on decoding; the writer stores what has
gathered, one transaction for them all, riding out a database that goes away for a while. Only
pending items are written (see gemma_batch.store.results), so a result is stored once however
often it is handed over.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial

from gemma_batch.domain.records import ItemResult
from gemma_batch.store.results import record_results
from worker.heartbeat import connection_lost, with_db_retries

log = logging.getLogger(__name__)

# How long a result may wait for others to share its transaction.
GATHER_SECONDS = 0.02
GATHER_MOST = 512


class ResultWriter:
    """Stores (owner, job, result) triples; calls `stored(owners, job_open)` once they are in
    the store, or `given_up(owners)` when the database stayed away past the retries."""

    def __init__(
        self,
        stored: Callable[[list[object], str, bool], None],
        given_up: Callable[[list[object]], None],
    ) -> None:
        self._stored, self._given_up = stored, given_up
        self._queue: queue.Queue[tuple[object, str, ItemResult] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()

    def put(self, owner: object, job_id: str, result: ItemResult) -> None:
        self._queue.put((owner, job_id, result))

    def flush(self) -> None:
        """Until everything handed over so far is stored (or given up)."""
        self._queue.join()

    def close(self) -> None:
        """Store what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            deadline = time.monotonic() + GATHER_SECONDS
            while len(batch) < GATHER_MOST:
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is None:
                    closing = True
                    break
                batch.append(entry)
            self._write(batch)
            for _ in range(len(batch) + closing):
                self._queue.task_done()

    def _write(self, batch: list[tuple[object, str, ItemResult]]) -> None:
        by_job: dict[str, list[tuple[object, ItemResult]]] = {}
        for owner, job_id, result in batch:
            by_job.setdefault(job_id, []).append((owner, result))
        results = {job_id: [result for _, result in entries] for job_id, entries in by_job.items()}
        try:
            over = with_db_retries(partial(record_results, by_job=results))
        except Exception as exc:
            # The database stayed away past the retries, or refused one job's results: those
            # items stay pending and run again later.
            if len(by_job) == 1 or connection_lost(exc):
                log.exception("giving up storing %s results of %s jobs", len(batch), len(by_job))
                self._given_up([owner for owner, _, _ in batch])
                return
            # A write the store refuses outright (a value it cannot hold, say) costs only its
            # own job's items: the others go in job by job.
            log.warning("a batch of %s jobs' results failed; storing them job by job", len(by_job))
            for job_id, entries in by_job.items():
                self._write([(owner, job_id, result) for owner, result in entries])
            return
        for job_id, entries in by_job.items():
            self._stored([owner for owner, _ in entries], job_id, job_id not in over)
