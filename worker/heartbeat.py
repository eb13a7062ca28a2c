"""Holding items while they run, and riding out a database that goes away for a while."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from gemma_batch.settings import get_settings
from gemma_batch.store.claims import renew_leases
from gemma_batch.store.fleet import Report, forget_worker, report_worker
from gemma_batch.store.sessions import session_scope

log = logging.getLogger(__name__)

T = TypeVar("T")


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the database is away (retried), rather than refusing the work."""
    # OperationalError covers a server that is down, restarting or refusing connections (and
    # SQLite's "database is locked"); other DBAPI errors count only if the connection dropped.
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def with_db_retries(work: Callable[[Session], T]) -> T:
    """Run `work` in a fresh session, again with backoff while the database is unreachable.

    A batch the GPU has computed is worth waiting for: the results stay in memory until the
    database is back, for up to db_retry_seconds.
    """
    retrying = Retrying(
        retry=retry_if_exception(connection_lost),
        wait=wait_exponential(multiplier=0.5, max=10),
        stop=stop_after_delay(get_settings().db_retry_seconds),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    for attempt in retrying:
        with attempt, session_scope() as session:
            return work(session)
    raise AssertionError("tenacity either returns or raises")


class Heartbeat:
    """Renews the lease on the items a worker holds, from a thread, for as long as it holds them,
    and reports the worker to the fleet view at each beat (`report`, if given).

    Leases are short so that a dead worker's items come back soon; a live worker keeps its own
    however long they take (torch releases the GIL while it computes). `held` says which items
    those are at each beat.
    """

    def __init__(
        self,
        held: Callable[[], list[int]],
        worker: str,
        lease_seconds: float,
        report: Callable[[], Report] | None = None,
    ) -> None:
        self.held, self.worker, self.lease_seconds = held, worker, lease_seconds
        self.report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def _beat(self) -> None:
        self._report()
        while not self._stop.wait(self.lease_seconds / 3):
            self._renew()
            self._report()

    def _renew(self) -> None:
        item_ids = self.held()
        if not item_ids:
            return
        try:
            with session_scope() as session:
                renew_leases(session, item_ids, self.worker, self.lease_seconds)
        except Exception as exc:  # the database may be down; the run goes on regardless
            log.warning("could not renew the lease on %s items: %s", len(item_ids), exc)

    def _report(self) -> None:
        if self.report is None:
            return
        try:
            with session_scope() as session:
                report_worker(session, self.report())
        except Exception as exc:  # only the fleet view misses a beat
            log.warning("could not report this worker to the fleet view: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self.report is not None:  # stopped cleanly: off the fleet view at once
            try:
                with session_scope() as session:
                    forget_worker(session, self.worker)
            except Exception as exc:
                log.warning("could not take this worker off the fleet view: %s", exc)
