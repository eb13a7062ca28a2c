"""Prometheus metrics of the store and the queues, read fresh at each scrape (for the API)."""

from __future__ import annotations

from collections.abc import Iterator

from kombu.exceptions import ChannelError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from gemma_batch.dispatch.queues import celery_app, queue_name
from gemma_batch.domain.records import FINISHED_JOB_STATES, ItemStatus, JobStatus
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job, utcnow


class StoreCollector(Collector):
    """Jobs by status, items by state, and the depth of each model's queue."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with session_scope() as session:
            jobs = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            state = case(
                (Item.status == ItemStatus.COMPLETED, "done"),
                (Item.status == ItemStatus.FAILED, "failed"),
                (Item.status == ItemStatus.CANCELLED, "cancelled"),
                (Item.lease_until > utcnow(), "running"),  # a live worker holds it
                else_="queued",
            )
            items = dict(session.execute(select(state, func.count()).group_by(state)).all())
            models = session.scalars(
                select(Job.model).distinct().where(Job.status.not_in(FINISHED_JOB_STATES))
            ).all()
        by_status = GaugeMetricFamily("gemma_batch_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], jobs.get(status.value, 0))
        yield by_status
        by_state = GaugeMetricFamily("gemma_batch_items", "Items by state", labels=["state"])
        for name in ("queued", "running", "done", "failed", "cancelled"):
            by_state.add_metric([name], items.get(name, 0))
        yield by_state
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
        yield depth
