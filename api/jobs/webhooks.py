"""Job webhooks: when a job is over, POST its summary to the job's callback URL, signed.

The signature is `X-Gemma-Batch-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed with
the job's tenant's own webhook secret, or GEMMA_BATCH_WEBHOOK_SECRET for a tenant without one;
with neither, the webhook goes unsigned. Each job's webhook is claimed in SQL before it is
sent, so several API processes never send it twice; a receiver that fails is retried with
backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import httpx
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool
from tenacity import retry, stop_after_attempt, wait_exponential

from api.auth import webhook_secret_of
from api.jobs.schemas import job_read
from gemma_batch.domain.records import FINISHED_JOB_STATES
from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gemma-Batch-Signature"
ATTEMPTS = 5


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@retry(
    stop=stop_after_attempt(ATTEMPTS), wait=wait_exponential(multiplier=0.5, max=8), reraise=True
)
def _post(url: str, body: bytes, headers: dict[str, str]) -> None:
    httpx.post(url, content=body, headers=headers, timeout=10).raise_for_status()


def deliver_due(settings: Settings) -> int:
    """Send the webhooks of finished jobs that have not had theirs; returns how many were sent."""
    with session_scope() as session:
        due = session.scalars(
            select(Job.id)
            .where(
                Job.callback_url.is_not(None),
                Job.webhook_sent_at.is_(None),
                Job.status.in_(FINISHED_JOB_STATES),
            )
            .limit(50)
        ).all()
    sent = 0
    for job_id in due:
        with session_scope() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_sent_at.is_(None))
                .values(webhook_sent_at=utcnow())
            ).rowcount
            session.commit()
            job = session.get(Job, job_id)
            if not claimed or job is None or job.callback_url is None:
                continue
            body = job_read(job).model_dump_json().encode()
            url = job.callback_url
            secret = webhook_secret_of(session, job.tenant) or (
                settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
            )
        headers = {"content-type": "application/json"}
        if secret:
            headers[SIGNATURE_HEADER] = sign(body, secret)
        try:
            _post(url, body, headers)
            sent += 1
        except Exception as exc:  # whatever the receiver did, record it and go on to the next
            log.warning("webhook of job %s to %s failed: %s", job_id, url, exc)
            with session_scope() as session:
                session.execute(
                    update(Job).where(Job.id == job_id).values(webhook_error=str(exc)[:1000])
                )
                session.commit()
    return sent


async def deliver_forever(settings: Settings, interval: float = 1.0) -> None:
    """The API's background loop (started with the app)."""
    while True:
        try:
            await run_in_threadpool(deliver_due, settings)
        except Exception:  # a broken round must not end the loop; the next one tries again
            log.exception("webhook round failed")
        await asyncio.sleep(interval)
