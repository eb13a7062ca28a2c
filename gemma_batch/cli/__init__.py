"""The `gemma-batch` command line."""

from __future__ import annotations

import logging
import sys

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console

from gemma_batch.cli import admin, demo, keys, quality, submit
from gemma_batch.client import ApiError
from gemma_batch.errors import AppError

app = typer.Typer(
    help="Batch generation and labelling with Gemma models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
admin.register(app)
quality.register(admin.model_app)
submit.register(app)
keys.register(app)
demo.register(app)

_stderr = Console(stderr=True)


def main() -> None:
    """Entry point: every expected failure is one readable line, never a traceback."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        app()
    except ApiError as exc:
        _fail(exc.message)
    except AppError as exc:
        _fail(exc.message)
    except httpx.TransportError as exc:
        _fail(f"cannot reach the API ({exc}); is `gemma-batch api` running?")
    except (ValidationError, ValueError, OSError) as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    _stderr.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    sys.exit(1)
