"""One scheduler per worker process: it owns the model and keeps its batch full.

Rows come from the chunks delivered to this process and, whenever the batch has room, from the
SQL store itself: pending items that nobody holds, of any open job of this model, sync requests
first (gemma_batch.store.claims). Every row is leased before it runs and joins the running batch
as a slot frees up; it leaves the moment it ends, and its result goes to the writer thread
(worker.writer), off the decode path. A cancelled job's rows leave before the next step.

Poison items are kept apart as before: an item whose earlier run never finished (its worker
died) runs alone, once the batch has drained; one that has started `max_attempts` runs is failed
unrun; a group whose prefill raises is bisected until the item that raises is failed alone, and
a decode step that raises sends its rows to run one by one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from sqlalchemy import select

from gemma_batch.dispatch.finished import Announcer
from gemma_batch.domain.params import JobSpec
from gemma_batch.domain.records import FINISHED_JOB_STATES, INTERACTIVE_PRIORITY, ItemResult
from gemma_batch.settings import Settings
from gemma_batch.store.claims import Claimed, claim_next, mark_started, release_leases
from gemma_batch.store.fleet import Report
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job
from worker import metrics
from worker.heartbeat import Heartbeat, with_db_retries
from worker.writer import ResultWriter

log = logging.getLogger(__name__)

# Sync requests may take this many rows over the batch's limits, so they never wait for a slot.
RESERVED_ROWS = 4
# How often the store is asked for sync requests and for more work. Cancelled jobs are looked
# up before every step: a step can take far less than any fixed interval (a small model, a GPU).
INTERACTIVE_POLL = 0.05
PULL_POLL = 0.2
# An idle scheduler looks at the store this often, besides being woken by every delivery.
IDLE_POLL = 1.0
PULL_WARNING_EVERY = 30.0


@dataclass(eq=False)
class Ticket:
    """A delivered chunk: done when this process holds none of its items any more."""

    job_id: str
    chunk: int
    stored: int = 0


@dataclass(eq=False)
class Held:
    """An item this process holds the lease on, from its claim until its result is stored."""

    claim: Claimed
    spec: JobSpec
    ticket: Ticket | None = None
    alone: bool = False  # run it by itself (its batch raised), without counting another run
    row: Any = field(default=None, repr=False)  # the engine's row, once prepared

    @property
    def job_id(self) -> str:
        return self.claim.job_id


class Scheduler:
    """The process's batch: claims, admissions, decode steps, cancels; results to the writer."""

    def __init__(
        self, engine: Any, settings: Settings, worker: str, identity: Report | None = None
    ) -> None:
        """`identity`: how this worker shows in the fleet view (none: it does not show)."""
        self.engine, self.settings, self.worker = engine, settings, worker
        self.identity = identity
        self._done = 0  # items stored; guarded by _lock
        self._rate_since = (time.monotonic(), 0)
        self._lock = threading.Condition()
        self._held: dict[int, Held] = {}  # by item id; guarded by _lock
        self._inbox: list[Held] = []  # delivered, not yet seen by the loop; guarded by _lock
        self._over: set[str] = set()  # jobs the writer found over; guarded by _lock
        self._stopping = False
        self._backlog: deque[Held] = deque()  # the loop's own: claimed, waiting for a slot
        self._polled = {"interactive": 0.0, "pull": 0.0, "pull-warning": -1e9}
        self._announcer = Announcer(settings)  # finished sync requests, for the calls waiting
        self.writer = ResultWriter(self._stored, self._release)
        self._heartbeat = Heartbeat(
            self._held_ids, worker, settings.lease_seconds, self._report if identity else None
        )
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> Scheduler:
        self.engine.batcher.between_passes = self._between_passes
        self._heartbeat.__enter__()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Claim nothing more, give back what has not started, finish the rows in the batch,
        store their results, then stop."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()
        self.engine.batcher.between_passes = None
        self.writer.close()
        self._announcer.close()
        self._heartbeat.__exit__(None, None, None)

    # --- what the Celery tasks call --------------------------------------------------------

    def submit(self, ticket: Ticket, spec: JobSpec | None, claimed: list[Claimed]) -> None:
        """Hand over a delivered chunk's claimed items (sync requests' go ahead of the rest)."""
        with self._lock:
            for claim in claimed:
                assert spec is not None
                held = Held(claim, spec, ticket)
                self._held[claim.item_id] = held
                self._inbox.append(held)
            self._lock.notify_all()

    def wait(self, ticket: Ticket) -> None:
        """Until none of the ticket's chunk's items is held here (stored, or given back)."""
        key = (ticket.job_id, ticket.chunk)
        with self._lock:
            while any((h.job_id, h.claim.chunk) == key for h in self._held.values()):
                self._lock.wait()

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception:  # the store unreachable past its retries, say: try again soon
                log.exception("the scheduler's turn failed; trying again")
                time.sleep(IDLE_POLL)

    def _turn(self) -> bool:
        """Claim, admit, step once; False once stopping and nothing is held any more."""
        with self._lock:
            self._take_inbox()
            over, self._over = self._over, set()
            if self._stopping and not self._held:
                return False
        self._drop(over | self._cancelled())
        if self._stopping:
            self._give_back()
        else:
            self._pull()
        started = self._admit()
        if self.engine.express.rows:  # sync rows first: the main batch waits for them
            self._step(express=True)
        elif self.engine.batcher.rows:
            self._step()
        elif not started:
            with self._lock:
                if not self._inbox and not self._stopping:
                    self._lock.wait(IDLE_POLL if not self._held else PULL_POLL)
        return True

    def _take_inbox(self, sync_only: bool = False) -> None:
        """Deliveries into the backlog (the lock held): sync requests go first; other deliveries
        take their turn behind what was claimed before them, so a chunk's message cannot jump
        other tenants' pulled rows."""
        sync = [h for h in self._inbox if h.claim.priority == INTERACTIVE_PRIORITY]
        self._backlog.extendleft(reversed(sync))
        if sync_only:
            self._inbox = [h for h in self._inbox if h.claim.priority != INTERACTIVE_PRIORITY]
            return
        self._backlog.extend(h for h in self._inbox if h.claim.priority != INTERACTIVE_PRIORITY)
        self._inbox.clear()

    def _due(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now - self._polled[what] < every:
            return False
        self._polled[what] = now
        return True

    def _pull(self) -> None:
        """Top the backlog up from the store: sync requests at once, other work as room opens."""
        batcher = self.engine.batcher
        if self._due("interactive", INTERACTIVE_POLL):
            self._claim(RESERVED_ROWS, interactive=True)
        # Claimed items wait here unleased to others: hold no more than the batch can take in, so
        # other workers (and other tenants' items, pulled in their turn) are not kept waiting.
        room = batcher.capacity() - len(batcher.rows) - len(self._backlog)
        wanted = min(room, self.settings.merge_items)
        if wanted > 0 and (not self._backlog or self._due("pull", PULL_POLL)):
            self._claim(wanted, interactive=False)

    def _claim(self, limit: int, interactive: bool) -> None:
        # Pulling is a bonus, not owed work: with the store away, skip it (no retries that would
        # hold up the rows running or a shutdown) and look again on a later turn.
        try:
            with session_scope() as session:
                specs, claimed = claim_next(
                    session,
                    self.settings.model,
                    self.worker,
                    self.settings.lease_seconds,
                    limit,
                    interactive,
                )
        except Exception as exc:
            if self._due("pull-warning", PULL_WARNING_EVERY):
                log.warning("could not pull work from the store: %s", exc)
            return
        if not claimed:
            return
        log.info("claimed %s items of %s jobs from the store", len(claimed), len(specs))
        held = [Held(claim, specs[claim.job_id]) for claim in claimed]
        with self._lock:
            self._held.update((h.claim.item_id, h) for h in held)
        if interactive:
            self._backlog.extendleft(reversed(held))
        else:
            self._backlog.extend(held)

    def _cancelled(self) -> set[str]:
        """Jobs of held items that are over (cancelled, mostly), looked up before every step."""
        jobs = {row.key.owner.job_id for row in self._rows()}
        jobs |= {held.job_id for held in self._backlog}
        if not jobs:
            return set()
        try:
            with session_scope() as session:
                return set(
                    session.scalars(
                        select(Job.id).where(Job.id.in_(jobs), Job.status.in_(FINISHED_JOB_STATES))
                    )
                )
        except Exception:  # the store away: the writer finds the job over when it comes back
            return set()

    def _drop(self, jobs: set[str], express_only: bool = False) -> None:
        """Rows of jobs that are over leave the batch (or only the express one); nothing more is
        written for them."""
        if not jobs:
            return
        dropped = []
        lanes = (
            (self.engine.express,) if express_only else (self.engine.batcher, self.engine.express)
        )
        for batcher in lanes:
            leaving = [row for row in batcher.rows if row.key.owner.job_id in jobs]
            if leaving:
                batcher.leave(leaving)
            dropped += [row.key.owner for row in leaving]
        dropped += [held for held in self._backlog if held.job_id in jobs]
        self._backlog = deque(held for held in self._backlog if held.job_id not in jobs)
        if dropped:
            log.info("dropping %s items of jobs that are over: %s", len(dropped), sorted(jobs))
            self._release(dropped)

    def _rows(self) -> list[Any]:
        """Every running row, in the main batch and the express one."""
        return self.engine.batcher.rows + self.engine.express.rows

    def _give_back(self) -> None:
        """Stopping: release the leases of items not started, so others take them at once (their
        chunks' messages are still in the broker: only delivered chunks are acknowledged, and a
        delivery's task waits for its own items)."""
        if not self._backlog:
            return
        given = list(self._backlog)
        self._backlog.clear()
        ids = [held.claim.item_id for held in given]
        with_db_retries(partial(release_leases, item_ids=ids, worker=self.worker))
        log.info("stopping: gave back %s items not started", len(given))
        self._release(given)

    # --- admissions --------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Start what the batch has room for; True if anything ran."""
        started = self._admit_express()
        batcher, group = self.engine.batcher, []
        while self._backlog:
            held = self._backlog[0]
            attempts = held.claim.attempts
            if attempts >= self.settings.max_attempts:
                self._backlog.popleft()
                error = f"the worker process died in each of this item's {attempts} runs; "
                self._finish(
                    held, ItemResult(held.claim.item.index, error=error + "it is not run again")
                )
                continue
            if attempts > 0 or held.alone:
                if self._rows() or group:
                    break  # a suspect runs by itself once the batch has drained
                self._run_alone(self._backlog.popleft())
                return True
            if held.spec.choices:
                if self._rows() or group:
                    break
                self._label(self._take_labels())
                return True
            if not self._prepared(held):
                self._backlog.popleft()
                continue
            # A sync row here found the express batch full: a few rows over the limits.
            extra = RESERVED_ROWS if held.claim.priority == INTERACTIVE_PRIORITY else 0
            if not batcher.fits(held.row, group, extra):
                break
            group.append(self._backlog.popleft().row)
        if group:
            self._start(group)
            started = True
        return started

    def _start(self, group: list[Any], express: bool = False) -> None:
        """Count the rows' run, then prefill them; if the count cannot be stored, they go back
        to the backlog's front rather than being lost between it and the batch."""
        owners = [row.key.owner for row in group]
        try:
            self._mark_started(owners)
        except Exception:
            self._backlog.extendleft(reversed(owners))
            raise
        self._admit_group(group, express)

    def _prepared(self, held: Held) -> bool:
        """Make the item's row once; False if it cannot run (its result is handed over)."""
        if held.row is None:
            prepared = self.engine.prepare(held.claim.item, held.spec, owner=held)
            if isinstance(prepared, ItemResult):
                self._finish(held, prepared)
                return False
            held.row = prepared
        return True

    def _admit_express(self) -> bool:
        """Sync rows at the backlog's front into the express batch, as many as it takes."""
        express = self.engine.express
        group: list[Any] = []
        while self._backlog:
            held = self._backlog[0]
            if (
                held.claim.priority != INTERACTIVE_PRIORITY
                or held.claim.attempts
                or held.alone
                or held.spec.choices
            ):
                break  # suspects run alone, in the main batcher, as any others
            if not self._prepared(held):
                self._backlog.popleft()
                continue
            if not express.fits(held.row, group):
                break
            group.append(self._backlog.popleft().row)
        if group:
            self._start(group, express=True)
        return bool(group)

    def _between_passes(self) -> None:
        """While rows join the main batch, between two of its prefill passes: sync requests
        delivered or stored meanwhile (and while they run) decode in the express batch until it
        is empty. A sync call waits for one pass, not for a whole admission (a pulled window of
        rows on a CPU: seconds).

        Only the express batch is touched: the main one is half-way through its admission.
        """
        express = self.engine.express
        rows = express.max_rows
        try:
            while True:
                with self._lock:
                    self._take_inbox(sync_only=True)
                if not self._stopping and self._due("interactive", INTERACTIVE_POLL):
                    self._claim(RESERVED_ROWS, interactive=True)
                if not self._admit_express() and not express.rows:
                    return
                self._drop(self._cancelled(), express_only=True)
                if express.rows:
                    self._step(express=True)
        except Exception:  # the admission under way must not take it for its own failure
            log.exception("serving sync requests between prefill passes failed")
        finally:
            # Out of memory here is the half-admitted group's doing: no lasting limit from it.
            express.max_rows = rows

    def _admit_group(self, rows: list[Any], express: bool = False) -> None:
        """Prefill a group; if it raises, each half, until the row that raises fails alone."""
        try:
            ended, deferred = self.engine.admit(rows, express)
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0].key.owner, exc)
                return
            log.warning("a group of %s rows raised %r; splitting it", len(rows), exc)
            half = len(rows) // 2
            self._admit_group(rows[:half], express)
            self._admit_group(rows[half:], express)
            return
        self._backlog.extendleft(reversed([row.key.owner for row in deferred]))
        metrics.forward(len(rows) - len(deferred))
        self._finish_rows(ended, 0.0)

    def _step(self, express: bool = False) -> None:
        batcher = self.engine.express if express else self.engine.batcher
        started = time.perf_counter()
        metrics.forward(len(batcher.rows), batcher.window())
        try:
            ended = self.engine.step(express)
        except Exception as exc:
            # One row's trouble must not fail its batchmates: each runs again by itself.
            rows = list(batcher.rows)
            log.warning(
                "a decode step of %s rows raised %r; running them one by one", len(rows), exc
            )
            batcher.leave(rows)
            for row in rows:
                row.key.owner.alone, row.key.owner.row = True, None
            self._backlog.extendleft(reversed([row.key.owner for row in rows]))
            return
        self._finish_rows(ended, time.perf_counter() - started)

    def _run_alone(self, held: Held) -> None:
        """A suspect, or a row whose batch raised: by itself, from prefill to its last token."""
        # It may kill this process: what others have finished must be in the store first, or
        # they would count a run that died too.
        self.writer.flush()
        if not held.alone:
            self._mark_started([held])
        if held.spec.choices:
            self._label([held])
            return
        prepared = self.engine.prepare(held.claim.item, held.spec, owner=held)
        if isinstance(prepared, ItemResult):
            self._finish(held, prepared)
            return
        batcher = self.engine.batcher
        try:
            ended, _ = self.engine.admit([prepared])
            while batcher.rows:
                ended += self.engine.step()
        except Exception as exc:
            batcher.leave(list(batcher.rows))
            self._fail(held, exc)
            return
        self._finish_rows(ended, 0.0)

    def _take_labels(self) -> list[Held]:
        """The label items of the first job in the backlog, from its front."""
        first = self._backlog[0]
        taken = []
        while (
            self._backlog
            and self._backlog[0].job_id == first.job_id
            and self._backlog[0].claim.attempts == 0
            and not self._backlog[0].alone
        ):
            taken.append(self._backlog.popleft())
        return taken

    def _label(self, group: list[Held]) -> None:
        """Score a group of label items; a micro-batch that raises is bisected."""
        if not any(h.alone or h.claim.attempts for h in group):
            self._mark_started(group)
        self._label_bisecting(group)

    def _label_bisecting(self, group: list[Held]) -> None:
        by_index = {held.claim.item.index: held for held in group}
        answered: set[int] = set()
        started = time.perf_counter()
        try:
            for results in self.engine.label_batches(
                [held.claim.item for held in group], group[0].spec
            ):
                seconds = time.perf_counter() - started
                metrics.forward(len(results))
                self._finish_results([(by_index[r.index], r) for r in results], seconds)
                answered.update(r.index for r in results)
                started = time.perf_counter()
        except Exception as exc:
            left = [held for held in group if held.claim.item.index not in answered]
            if len(left) == 1:
                self._fail(left[0], exc)
                return
            log.warning("a label batch of %s items raised %r; splitting it", len(left), exc)
            half = len(left) // 2
            self._label_bisecting(left[:half])
            self._label_bisecting(left[half:])

    # --- results -----------------------------------------------------------------------------

    def _mark_started(self, held: list[Held]) -> None:
        """Count a run of these items before it starts: a run that kills the process counts."""
        ids = [h.claim.item_id for h in held]
        with_db_retries(partial(mark_started, item_ids=ids))

    def _fail(self, held: Held, exc: Exception) -> None:
        log.error("item %s of job %s fails: %r", held.claim.item.index, held.job_id, exc)
        error = f"{exc.__class__.__name__}: {exc}"
        self._finish(held, ItemResult(held.claim.item.index, error=error))

    def _finish_rows(self, rows: list[Any], seconds: float) -> None:
        pairs = [(row.key.owner, self.engine.result(row)) for row in rows]
        self._finish_results(pairs, seconds)

    def _finish_results(self, pairs: list[tuple[Held, ItemResult]], seconds: float) -> None:
        """Results the model computed: counted in the worker's metrics, then stored."""
        if pairs:
            metrics.observe([result for _, result in pairs], seconds)
        for held, result in pairs:
            self._finish(held, result)

    def _finish(self, held: Held, result: ItemResult) -> None:
        """Hand a result to the writer, which stores it off the decode path."""
        self.writer.put(held, held.job_id, result)

    # --- what the writer calls back ----------------------------------------------------------

    def _stored(self, owners: list[object], job_id: str, still_open: bool) -> None:
        sync = False
        with self._lock:
            for held in owners:
                assert isinstance(held, Held)
                if self._held.pop(held.claim.item_id, None) is not None and held.ticket:
                    held.ticket.stored += 1
                sync = sync or held.claim.priority == INTERACTIVE_PRIORITY
            self._done += len(owners)
            if not still_open:
                self._over.add(job_id)
            self._lock.notify_all()
        if sync and not still_open:
            self._announcer.announce(job_id)

    def _release(self, owners: list[object]) -> None:
        """Let go of items without a stored result: their leases lapse, and they run again."""
        with self._lock:
            for held in owners:
                assert isinstance(held, Held)
                self._held.pop(held.claim.item_id, None)
            self._lock.notify_all()

    def _held_ids(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def _report(self) -> Report:
        """This worker for the fleet view: items stored, their rate since the last beat, and the
        jobs it holds items of."""
        assert self.identity is not None
        with self._lock:
            done, jobs = self._done, sorted({held.job_id for held in self._held.values()})
        now = time.monotonic()
        since, before = self._rate_since
        self._rate_since = (now, done)
        rate = (done - before) / (now - since) if now > since else 0.0
        return replace(self.identity, items_done=done, rows_per_second=rate, jobs=jobs)
