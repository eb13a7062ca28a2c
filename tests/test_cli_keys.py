"""`gemma-batch keys create | list | revoke`, run as a user runs them, on a real database."""

from __future__ import annotations

import subprocess

from api import auth
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Tenant
from tests.conftest import run_cli


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The test database is in the environment (the fixture put it there), as a user's would be.
    return run_cli("keys", *args)


def test_create_list_and_revoke(sqlite_url: str) -> None:
    created = _cli("create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    key, secret = created.stdout.split()
    assert key.startswith("gb_") and len(secret) >= 40
    assert "not shown again" in created.stderr
    key_id = key.split("_")[1]
    with session_scope() as session:
        assert auth.tenant_of(session, key) == "acme"
        assert auth.webhook_secret_of(session, "acme") == secret

    # A second key for the same tenant keeps its webhook secret, unless one is given.
    again = _cli("create", "--tenant", "acme", "--webhook-secret", "chosen-secret")
    assert again.returncode == 0 and len(again.stdout.split()) == 1
    with session_scope() as session:
        assert auth.webhook_secret_of(session, "acme") == "chosen-secret"

    listed = _cli("list")
    assert listed.returncode == 0 and key_id in listed.stdout and "acme" in listed.stdout
    assert key not in listed.stdout

    revoked = _cli("revoke", key_id)
    assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout
    with session_scope() as session:
        assert auth.tenant_of(session, key) is None
    row = next(line for line in _cli("list").stdout.splitlines() if key_id in line)
    assert row.count("Z") == 2  # created and revoked dates


def _weight(tenant: str) -> int:
    with session_scope() as session:
        record = session.get(Tenant, tenant)
        assert record is not None
        return record.weight


def test_weight_is_set_at_create_and_changed_by_a_later_key(sqlite_url: str) -> None:
    assert _cli("create", "--tenant", "plain").returncode == 0
    assert _weight("plain") == 1
    made = _cli("create", "--tenant", "big", "--weight", "3")
    assert made.returncode == 0, made.stderr
    assert _weight("big") == 3
    # Another key without --weight keeps it; with one, changes it.
    assert _cli("create", "--tenant", "big").returncode == 0
    assert _weight("big") == 3
    assert _cli("create", "--tenant", "big", "--weight", "5").returncode == 0
    assert _weight("big") == 5
    rows = [line.split("│") for line in _cli("list").stdout.splitlines() if "big" in line]
    assert len(rows) == 3 and all(row[3].strip() == "5" for row in rows), rows


def test_bad_input_is_one_readable_line(sqlite_url: str) -> None:
    for args, message in [
        (("revoke", "nope"), "no API key 'nope'"),
        (("create", "--tenant", "bad name!"), "tenant name 'bad name!'"),
        (("create",), "Missing option '--tenant'"),
        (("create", "--tenant", "acme", "--weight", "0"), "Invalid value for '--weight'"),
        (("create", "--tenant", "acme", "--weight", "1001"), "Invalid value for '--weight'"),
    ]:
        out = _cli(*args)
        assert out.returncode != 0, args
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    key_id = _cli("create", "--tenant", "acme").stdout.split()[0].split("_")[1]
    assert _cli("revoke", key_id).returncode == 0
    twice = _cli("revoke", key_id)
    assert twice.returncode == 1 and "already revoked" in twice.stderr
