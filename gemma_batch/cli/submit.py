"""Client commands: submit, status, results, cancel, label.

They find the API at GEMMA_BATCH_API_URL and send the key in GEMMA_BATCH_API_KEY.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from api.jobs.ingest import FORMATS
from api.jobs.schemas import ItemIn
from gemma_batch.client import Client, Job
from gemma_batch.settings import get_settings

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("results")(results)
    app.command("cancel")(cancel)
    app.command("label")(label)
    app.command("workers")(workers)


def client() -> Client:
    settings = get_settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return Client(settings.api_url, key)


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
        finish(job, None)


def finish(job: Job, output: Path | None) -> None:
    """Wait with a progress bar, say how it ended, and save the results if asked."""
    info = job.wait(poll=0.5, progress=True)
    console.print(f"{info.status}: {info.counts.completed} completed, {info.counts.failed} failed")
    if output:
        save_results(job, output)


def save_results(job: Job, output: Path) -> None:
    fmt = FORMATS.get(output.suffix.lower(), "jsonl")
    with output.open("wb") as target:
        for data in job.download(fmt):
            target.write(data)
    console.print(f"wrote {output}")


def status(job_id: str) -> None:
    """Print a job's status and counts as JSON."""
    print(client().job(job_id).info.model_dump_json(indent=2))


def workers(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead.")] = False,
) -> None:
    """The live workers: host, model, device, rows/s, last seen, and which of your jobs each
    runs."""
    listed = client().request("GET", "/v1/workers")
    if as_json:
        print(json.dumps(listed, indent=2))
        return
    table = Table(
        "worker", "host", "model", "device", "quant", "rows/s", "done", "seen", "your jobs"
    )
    for worker in listed["data"]:
        table.add_row(
            worker["id"],
            worker["host"],
            worker["model"],
            worker["device"],
            worker["quantization"],
            f"{worker['rows_per_second']:.2f}",
            str(worker["items_done"]),
            f"{worker['seconds_since_seen']:.0f} s ago",
            " ".join(worker["jobs"]) or "-",
        )
    Console().print(table)


def results(
    job_id: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help=".jsonl, .csv or .parquet")
    ] = None,
) -> None:
    """Download a job's results (what is done so far while it runs); format from the name."""
    job = client().job(job_id)
    if output:
        save_results(job, output)
        return
    for data in job.download("jsonl"):
        sys.stdout.buffer.write(data)


def label(
    file: Annotated[Path, typer.Argument(help="Rows to label: .jsonl, .csv or .parquet.")],
    template: Annotated[str, typer.Option(help="Prompt template with {field} placeholders.")],
    choices: Annotated[
        str | None, typer.Option(help="Comma-separated labels, e.g. positive,negative.")
    ] = None,
    json_schema: Annotated[
        Path | None, typer.Option(help="A JSON Schema file: structured output instead of labels.")
    ] = None,
    prefix_file: Annotated[
        Path | None, typer.Option(help="Shared instruction / few-shot text put before each prompt.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Default: GEMMA_BATCH_MODEL.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap prompts as a user turn (-it models).")] = False,
    max_new_tokens: int = 64,
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar.")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to save (implies --wait).")
    ] = None,
) -> None:
    """Label a file of rows (or get structured JSON for each); prints the job id."""
    options: dict[str, Any] = {
        "chat": chat,
        "prefix": prefix_file.read_text(encoding="utf-8") if prefix_file else "",
        "params": {"max_new_tokens": max_new_tokens},
    }
    if choices is not None:
        options["choices"] = [c.strip() for c in choices.split(",")]
    if json_schema is not None:
        options["json_schema"] = json.loads(json_schema.read_text(encoding="utf-8"))
    job = client().submit_file(file, template, model or get_settings().model, **options)
    print(job.id)
    if wait or output:
        finish(job, output)


def cancel(job_id: str) -> None:
    """Cancel a job; what finished stays downloadable."""
    print(json.dumps(client().job(job_id).cancel().model_dump(mode="json")))
