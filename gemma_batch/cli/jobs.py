"""Client commands: submit, status, results, cancel. They find the API at GEMMA_BATCH_API_URL."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gemma_batch.client import Client, Job
from gemma_batch.schemas import ItemIn, JobRead
from gemma_batch.settings import get_settings

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("results")(results)
    app.command("cancel")(cancel)


def client() -> Client:
    return Client(get_settings().api_url)


def read_items(path: Path) -> list[dict[str, Any]]:
    """Items from a JSONL file, checked line by line so a bad line is named."""
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = ItemIn.model_validate_json(line)
            except ValidationError as exc:
                problem = exc.errors()[0]
                raise ValueError(
                    f"{path} line {number}: {problem['msg'].removeprefix('Value error, ')}"
                ) from None
            items.append(item.model_dump(exclude_none=True))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def wait_with_progress(job: Job) -> JobRead:
    """Poll the job, showing a progress bar with counts and an ETA."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(job.id, total=job.info.counts.total, failed=0)

        def show(info: JobRead) -> None:
            done = info.counts.completed + info.counts.failed
            progress.update(bar, completed=done, failed=info.counts.failed, description=info.status)

        return job.wait(poll=0.5, on_progress=show)


def submit(
    file: Annotated[Path, typer.Argument(help="JSONL: one {id, prompt|messages} per line.")],
    model: Annotated[str | None, typer.Option(help="Default: GEMMA_BATCH_MODEL.")] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar.")] = False,
) -> None:
    """Submit a job; prints its id."""
    params = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop or [],
    }
    job = client().submit(model or get_settings().model, read_items(file), params)
    print(job.id)
    if wait:
        info = wait_with_progress(job)
        console.print(
            f"{info.status}: {info.counts.completed} completed, {info.counts.failed} failed"
        )


def status(job_id: str) -> None:
    """Print a job's status and counts as JSON."""
    print(client().job(job_id).info.model_dump_json(indent=2))


def results(
    job_id: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help=".jsonl or .csv")] = None,
) -> None:
    """Download a job's results (what is done so far while it runs)."""
    job = client().job(job_id)
    fmt = "csv" if output and output.suffix.lower() == ".csv" else "jsonl"
    target = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    for line in job.download(fmt):
        target.write(line)
    if output:
        target.close()
        console.print(f"wrote {output}")


def cancel(job_id: str) -> None:
    """Cancel a job; what finished stays downloadable."""
    print(json.dumps(client().job(job_id).cancel().model_dump(mode="json")))
