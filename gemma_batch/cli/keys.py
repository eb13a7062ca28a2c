"""`gemma-batch keys`: issue, list and revoke API keys, straight in the SQL store."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from api import auth
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import as_utc

console = Console()
# The key and secret go alone to stdout, so a script can capture them; what they are, to stderr.
notes = Console(stderr=True)
# Weights are shares: 1,000 to 1 is already "this tenant first"; bigger ones add nothing.
MAX_WEIGHT = 1000
keys_app = typer.Typer(help="API keys: each belongs to one tenant.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="Who the key is for; made if new.")],
    webhook_secret: Annotated[
        str | None,
        typer.Option(help="The tenant's webhook signing key (default for a new tenant: random)."),
    ] = None,
    weight: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_WEIGHT,
            help="The tenant's share of the workers against others' (default for a new tenant: 1).",
        ),
    ] = None,
) -> None:
    """Make a key and print it once: only its hash is kept."""
    with session_scope() as session:
        made = auth.create_key(session, tenant, webhook_secret, generate_secret=True, weight=weight)
    notes.print(f"API key for tenant '{made.tenant}' (id {made.id}); it is not shown again:")
    print(made.key)
    if made.webhook_secret:
        notes.print("webhook secret (signs this tenant's job webhooks; not shown again):")
        print(made.webhook_secret)


@keys_app.command("list")
def list_keys() -> None:
    """Every key's id, tenant and dates (never the key itself)."""
    table = Table("id", "tenant", "weight", "created", "revoked")
    with session_scope() as session:
        for key, weight in auth.list_keys(session):
            table.add_row(
                key.id, key.tenant, str(weight), _when(key.created_at), _when(key.revoked_at)
            )
    console.print(table)


def _when(moment: datetime | None) -> str:
    moment = as_utc(moment)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z" if moment else ""


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The id that `keys list` shows.")]) -> None:
    """Revoke a key: the API refuses it from the next request on."""
    with session_scope() as session:
        auth.revoke_key(session, key_id)
    console.print(f"revoked {key_id}")
