"""Job webhooks: when a job is over, POST its summary to the job's callback URL, signed.

The signature is `X-Gemma-Batch-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed with
the job's tenant's own webhook secret, or GEMMA_BATCH_WEBHOOK_SECRET for a tenant without one;
with neither, the webhook goes unsigned.

Delivery runs from an outbox in SQL (the job's webhook columns): at least once, retried with
backoff for GEMMA_BATCH_WEBHOOK_RETRY_HOURS, and many receivers at once, each request with a total
timeout, so one slow receiver never delays another tenant's webhook. A callback URL comes from a
tenant, so it may only reach public addresses (or those GEMMA_BATCH_WEBHOOK_ALLOW admits): checked
at submit, and again at send time against the very address connected to, so a DNS answer that
changes in between cannot point the request inside.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import or_, select, update
from starlette.concurrency import run_in_threadpool

from api.auth import webhook_secret_of
from api.jobs.schemas import job_read
from gemma_batch.domain.records import FINISHED_JOB_STATES
from gemma_batch.settings import Settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Job, as_utc, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gemma-Batch-Signature"
REQUEST_SECONDS = 10.0  # the whole request, however slowly the receiver trickles its answer
CLAIM_SECONDS = 60.0  # a claimed webhook is left to its sender this long (if it dies, resent)
MAX_BACKOFF = 600.0
ROUND = 50  # webhooks taken per round

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """A callback URL the service will not call."""


@dataclass(frozen=True)
class Allowlist:
    """GEMMA_BATCH_WEBHOOK_ALLOW: host names, and networks, that may be internal."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, text: str) -> Allowlist:
        hosts, networks = set(), []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower())
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, address: Address) -> bool:
        return host.lower() in self.hosts or any(address in net for net in self.networks)


def _internal(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    # Not global covers loopback, private, link-local, shared, reserved and unspecified ranges.
    return not address.is_global or address.is_multicast


def check_address(host: str, address: Address, allow: Allowlist) -> None:
    if _internal(address) and not allow.admits(host, address):
        raise TargetRefused(
            f"its host resolves to {address}, an internal address "
            "(an operator may admit it with GEMMA_BATCH_WEBHOOK_ALLOW)"
        )


def allowed_addresses(host: str, infos: list[tuple], allow: Allowlist) -> list[Address]:  # type: ignore[type-arg]
    """The addresses in getaddrinfo's answer for `host`, once each is allowed; else
    TargetRefused (one internal address is enough to refuse the host)."""
    found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in found:
        check_address(host, address, allow)
    return found


def check_url(url: httpx.URL, allow: Allowlist) -> None:
    """Refuse (TargetRefused) a callback URL that is not plain http(s) to allowed addresses."""
    if url.scheme not in ("http", "https"):
        raise TargetRefused("only http and https callback URLs are allowed")
    if url.userinfo:
        raise TargetRefused("a callback URL may not carry a user name or password")
    try:
        infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
    except OSError:
        raise TargetRefused(f"its host '{url.host}' cannot be resolved") from None
    allowed_addresses(url.host, infos, allow)


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    body: bytes
    headers: dict[str, str]


def _claim_due(settings: Settings) -> list[Delivery]:
    """Take the webhooks that are due, each claimed in SQL so no other API process sends it too."""
    now = utcnow()
    due = or_(Job.webhook_next_at.is_(None), Job.webhook_next_at <= now)
    with session_scope() as session:
        ids = session.scalars(
            select(Job.id)
            .where(Job.webhook_status == "pending", Job.status.in_(FINISHED_JOB_STATES), due)
            .limit(ROUND)
        ).all()
        deliveries = []
        for job_id in ids:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_status == "pending", due)
                .values(
                    webhook_next_at=now + timedelta(seconds=CLAIM_SECONDS),
                    webhook_attempts=Job.webhook_attempts + 1,
                )
            ).rowcount
            session.commit()
            job = session.get(Job, job_id)
            if not claimed or job is None or job.callback_url is None:
                continue
            body = job_read(job).model_dump_json().encode()
            headers = {"content-type": "application/json"}
            secret = webhook_secret_of(session, job.tenant) or (
                settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
            )
            if secret:
                headers[SIGNATURE_HEADER] = sign(body, secret)
            deliveries.append(Delivery(job_id, job.callback_url, body, headers))
    return deliveries


async def _send(client: httpx.AsyncClient, delivery: Delivery, allow: Allowlist) -> str | None:
    """POST one webhook; None when it was received, else why not (never the URL, which may hold
    a token)."""
    url = httpx.URL(delivery.url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            url.host, url.port or (443 if url.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
        address = allowed_addresses(url.host, infos, allow)[0]
    except OSError:
        return f"host '{url.host}' cannot be resolved"
    except TargetRefused as exc:
        return str(exc)
    # Connect to the address just checked; Host header and TLS name stay the URL's own.
    pinned = url.copy_with(host=str(address))
    headers = delivery.headers | {"host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    try:
        async with asyncio.timeout(REQUEST_SECONDS):
            request = client.build_request(
                "POST", pinned, content=delivery.body, headers=headers, extensions=extensions
            )
            # The answer's body is never read: a receiver cannot make the API hold its bytes.
            response = await client.send(request, stream=True)
            await response.aclose()
    except TimeoutError:
        return f"no answer within {REQUEST_SECONDS:.0f} s"
    except httpx.HTTPError as exc:
        return f"could not connect ({type(exc).__name__})"
    if response.status_code >= 300:
        return f"the receiver answered {response.status_code}"
    return None


def _record(settings: Settings, delivery: Delivery, error: str | None) -> bool:
    """Note how the attempt went; the next one waits twice as long as the last, up to a limit."""
    now = utcnow()
    with session_scope() as session:
        job = session.get(Job, delivery.job_id)
        if job is None:
            return False
        if error is None:
            job.webhook_status, job.webhook_sent_at, job.webhook_error = "delivered", now, None
        else:
            host = httpx.URL(delivery.url).host
            log.warning("webhook of job %s to host %s failed: %s", job.id, host, error)
            job.webhook_error = error
            finished = as_utc(job.finished_at) or now
            if now - finished > timedelta(hours=settings.webhook_retry_hours):
                job.webhook_status = "failed"
            else:
                wait = min(2.0 ** (job.webhook_attempts - 1), MAX_BACKOFF)
                job.webhook_next_at = now + timedelta(seconds=wait)
        session.commit()
    return error is None


async def _deliver(
    client: httpx.AsyncClient, settings: Settings, allow: Allowlist, delivery: Delivery
) -> bool:
    error = await _send(client, delivery, allow)
    return await run_in_threadpool(_record, settings, delivery, error)


def _client() -> httpx.AsyncClient:
    # No redirects (they could lead inside) and no proxy settings from the environment.
    return httpx.AsyncClient(follow_redirects=False, trust_env=False)


async def deliver_due(settings: Settings) -> int:
    """One round: send every webhook that is due, all at once; how many were received."""
    allow = Allowlist.parse(settings.webhook_allow)
    deliveries = await run_in_threadpool(_claim_due, settings)
    async with _client() as client:
        done = await asyncio.gather(*(_deliver(client, settings, allow, d) for d in deliveries))
    return sum(done)


async def deliver_forever(settings: Settings, interval: float = 1.0) -> None:
    """The API's background loop (started with the app): each webhook is sent in its own task,
    so a slow receiver holds up nobody else's."""
    allow = Allowlist.parse(settings.webhook_allow)
    running: set[asyncio.Task[bool]] = set()
    async with _client() as client:
        while True:
            try:
                for delivery in await run_in_threadpool(_claim_due, settings):
                    task = asyncio.create_task(_deliver(client, settings, allow, delivery))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except Exception:  # a broken round must not end the loop; the next one tries again
                log.exception("webhook round failed")
            await asyncio.sleep(interval)
