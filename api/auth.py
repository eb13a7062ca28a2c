"""API keys and tenants: issue, check, revoke and list keys.

A key reads `gb_<id>_<secret>`. The id is public (it names the key in `keys list` and finds
its row); only a SHA-256 of the whole key is stored. A plain, fast hash is enough here because
the secret is 256 random bits: there is nothing to guess, so the slow, salted hashes made for
human passwords would only slow every request down.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from gemma_batch.errors import Conflict, NotFound
from gemma_batch.store.tables import ApiKey, Tenant, utcnow

PREFIX = "gb_"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class NewKey:
    """What `create_key` hands back; `key` and a generated secret are never shown again."""

    id: str
    tenant: str
    key: str
    webhook_secret: str | None  # set only when it was generated for a new tenant


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def create_key(
    session: Session,
    tenant: str,
    webhook_secret: str | None = None,
    generate_secret: bool = False,
    weight: int | None = None,
) -> NewKey:
    """A new key for `tenant`, made with the tenant if it is new.

    `webhook_secret` sets (or replaces) the tenant's own webhook signing key; with
    `generate_secret`, a new tenant given none gets a random one, returned once. `weight` sets
    (or replaces) the tenant's share of the workers (gemma_batch.store.shares; new tenants: 1).
    """
    check_tenant_name(tenant)
    generated = None
    record = session.get(Tenant, tenant)
    if record is None:
        if webhook_secret is None and generate_secret:
            webhook_secret = generated = secrets.token_urlsafe(32)
        record = Tenant(name=tenant, webhook_secret=webhook_secret, weight=weight or 1)
        session.add(record)
        session.flush()  # the key row refers to it
    elif webhook_secret is not None:
        record.webhook_secret = webhook_secret
    if weight is not None:
        record.weight = weight
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(id=key_id, tenant=tenant, key_hash=_hash(key)))
    session.commit()
    return NewKey(key_id, tenant, key, generated)


def tenant_of(session: Session, key: str) -> str | None:
    """The tenant a presented key belongs to; None for a malformed, unknown or revoked key."""
    key_id, _, rest = key.removeprefix(PREFIX).partition("_")
    if not key.startswith(PREFIX) or not rest:
        return None
    record = session.get(ApiKey, key_id)
    # Compared in constant time, so response timing tells nothing about the stored hash.
    if record is None or not hmac.compare_digest(_hash(key), record.key_hash):
        return None
    return None if record.revoked_at is not None else record.tenant


def revoke_key(session: Session, key_id: str) -> ApiKey:
    record = session.get(ApiKey, key_id)
    if record is None:
        raise NotFound(f"no API key '{key_id}'", "key_id")
    if record.revoked_at is not None:
        raise Conflict(f"API key '{key_id}' was already revoked", "key_id")
    record.revoked_at = utcnow()
    session.commit()
    return record


def list_keys(session: Session) -> list[tuple[ApiKey, int]]:
    """Every key, with its tenant's weight."""
    rows = session.execute(
        select(ApiKey, Tenant.weight)
        .join(Tenant, Tenant.name == ApiKey.tenant)
        .order_by(ApiKey.tenant, ApiKey.created_at)
    )
    return list(rows.tuples())


def webhook_secret_of(session: Session, tenant: str) -> str | None:
    """The tenant's own webhook signing key, if it has one."""
    return session.scalar(select(Tenant.webhook_secret).where(Tenant.name == tenant))
