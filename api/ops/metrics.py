"""Prometheus metrics of the store and the queues, for the API's /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from kombu.exceptions import ChannelError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from gemma_batch.dispatch.queues import celery_app, queue_name
from gemma_batch.domain.records import OPEN_JOB_STATES, ItemStatus, JobStatus
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job, db_now


class StoreCollector(Collector):
    """Jobs by status, items by state, and the depth of each model's queue.

    Read from the jobs' own counters (maintained as results are written) and from the index of
    leased items, never by counting every item; no tenant is named. Scrapes that arrive while a
    reading runs wait for it and share it, so many scrapers at once cost one reading.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished_at = 0.0
        self._families: list[GaugeMetricFamily] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        arrived = time.monotonic()
        with self._lock:
            if self._finished_at < arrived:  # no reading ran on while this scrape waited
                self._families = self._read()
                self._finished_at = time.monotonic()
            families = self._families
        yield from families

    def _read(self) -> list[GaugeMetricFamily]:
        left = Job.total - Job.completed - Job.failed
        with session_scope() as session:
            per_status = session.execute(
                select(
                    Job.status,
                    func.count(),
                    func.coalesce(func.sum(Job.completed), 0),
                    func.coalesce(func.sum(Job.failed), 0),
                    func.coalesce(func.sum(left), 0),
                ).group_by(Job.status)
            ).all()
            running = session.scalar(
                select(func.count())
                .select_from(Item)
                .where(Item.status == ItemStatus.PENDING, Item.lease_until > db_now(session))
            )
            models = session.scalars(
                select(Job.model).distinct().where(Job.status.in_(OPEN_JOB_STATES))
            ).all()
        jobs = {status: count for status, count, *_ in per_status}
        items = {"done": 0, "failed": 0, "cancelled": 0, "queued": 0, "running": running or 0}
        for status, _count, completed, failed, remaining in per_status:
            items["done"] += completed
            items["failed"] += failed
            if status == JobStatus.CANCELLED:
                items["cancelled"] += remaining
            elif status in OPEN_JOB_STATES:
                items["queued"] += remaining
        items["queued"] = max(0, items["queued"] - items["running"])
        by_status = GaugeMetricFamily("gemma_batch_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], jobs.get(status.value, 0))
        by_state = GaugeMetricFamily("gemma_batch_items", "Items by state", labels=["state"])
        for name in ("queued", "running", "done", "failed", "cancelled"):
            by_state.add_metric([name], items[name])
        depth = GaugeMetricFamily(
            "gemma_batch_queue_depth", "Chunk tasks waiting in the broker", labels=["model"]
        )
        with celery_app.connection_for_read() as connection:
            channel = connection.default_channel
            for model in sorted(models):
                try:
                    waiting = channel.queue_declare(queue_name(model), passive=True).message_count
                except ChannelError:  # Redis drops an emptied list: nothing waits
                    waiting = 0
                depth.add_metric([model], waiting)
        return [by_status, by_state, depth]
