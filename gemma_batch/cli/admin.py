"""Commands that run or set up the service: config, db, model, api, worker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemma_batch.settings import get_settings

console = Console()
db_app = typer.Typer(help="The SQL store.", no_args_is_help=True)
model_app = typer.Typer(help="The local model cache.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("config")(show_config)
    app.command("api")(run_api)
    app.command("worker")(run_worker)
    app.command("flower")(run_flower)
    app.add_typer(db_app, name="db")
    app.add_typer(model_app, name="model")


def show_config() -> None:
    """Print the effective settings (secrets masked)."""
    table = Table("setting", "value")
    for name, value in get_settings().masked().items():
        table.add_row(name, value)
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the tables to the latest revision."""
    from alembic import command
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    command.upgrade(config, revision)


@model_app.command("prepare")
def model_prepare(
    source: Annotated[
        str, typer.Argument(help="A model alias, a local model folder, or a LoRA adapter folder.")
    ],
    name: Annotated[str | None, typer.Option(help="Name in the cache (folders only).")] = None,
    force: Annotated[bool, typer.Option(help="Prepare again even if present.")] = False,
    adapter_of: Annotated[
        str | None,
        typer.Option(help="SOURCE is a PEFT LoRA adapter for this prepared base model."),
    ] = None,
    tokenizer_only: Annotated[
        bool,
        typer.Option(help="Only the config and tokenizer: all an API machine needs, no weights."),
    ] = False,
) -> None:
    """Put a model (or an adapter for one) into the local cache so workers never download
    mid-job."""
    from gemma_batch.cli.prepare import prepare

    path = prepare(
        source,
        get_settings(),
        name=name,
        force=force,
        adapter_of=adapter_of,
        tokenizer_only=tokenizer_only,
    )
    what = (
        f"adapter of {adapter_of}"
        if adapter_of
        else "tokenizer only"
        if tokenizer_only
        else "model"
    )
    console.print(f"prepared {path.name} ({what}) at {path}")


@model_app.command("list")
def model_list() -> None:
    """Show the registry's aliases, the adapters, and which are prepared here."""
    from gemma_batch.models.cache import adapter_base, get_prepared, prepared_names
    from gemma_batch.models.registry import REGISTRY

    settings = get_settings()
    prepared = set(prepared_names(settings.model_dir))
    table = Table("model", "source", "prepared", "adapter of")
    for name in sorted(set(REGISTRY) | prepared):
        spec = REGISTRY.get(name)
        base = adapter_base(settings.model_dir, name) if name in prepared else None
        state = ""
        if name in prepared:
            whole = base or get_prepared(settings.model_dir, name).has_weights
            state = "yes" if whole else "tokenizer only"
        table.add_row(name, spec.source if spec else "local", state, base or "")
    console.print(table)


def run_api(
    host: Annotated[str | None, typer.Option(help="Default: GEMMA_BATCH_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: GEMMA_BATCH_API_PORT.")] = None,
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port)


def run_worker(
    gpus: Annotated[
        str | None, typer.Option(help="GPU ids, e.g. 0,1, or all: one worker process each.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    model: Annotated[str | None, typer.Option(help="Model to serve (default: settings).")] = None,
    loglevel: str = "INFO",
) -> None:
    """Start Celery workers that load the model once and run its queue."""
    from worker.launcher import run_workers

    settings = get_settings()
    if model:
        settings = settings.model_copy(update={"model": model})
    if device not in (None, "cpu", "cuda", "auto"):
        raise typer.BadParameter("--device must be cpu, cuda or auto")
    gpu_ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    raise typer.Exit(run_workers(settings, gpu_ids, device, loglevel))


def run_flower(
    port: Annotated[int, typer.Option(help="Port Flower serves on.")] = 5555,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without a password, on 127.0.0.1 only.")
    ] = False,
) -> None:
    """Start Flower on the configured broker, behind basic auth (GEMMA_BATCH_FLOWER_AUTH)."""
    import os
    import sys

    settings = get_settings()
    # Flower lists every tenant's tasks: open to all interfaces only behind a password.
    if settings.flower_auth is None and not no_auth:
        typer.echo(
            "Flower shows every tenant's jobs: set GEMMA_BATCH_FLOWER_AUTH=user:password, or "
            "pass --no-auth to serve it without one on 127.0.0.1 only.",
            err=True,
        )
        raise typer.Exit(2)
    # Flower needs the Celery app and the broker, not the worker's code.
    app = "gemma_batch.dispatch.queues:celery_app"
    command = [sys.executable, "-m", "celery", "-A", app, "flower", f"--port={port}"]
    if no_auth:
        command.append("--address=127.0.0.1")
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    elif settings.flower_auth:
        # Through the environment, not the command line, which any local user can read.
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_auth.get_secret_value()
    os.execv(sys.executable, command)
