"""`gemma-batch demo`: label the bundled reviews end to end and print the accuracy."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gemma_batch.cli.admin import db_upgrade
from gemma_batch.cli.prepare import prepare
from gemma_batch.cli.stack import LocalStack
from gemma_batch.models.cache import is_prepared
from gemma_batch.settings import get_settings

console = Console()
LABELS = ("positive", "negative")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def sample_rows() -> list[dict[str, str]]:
    text = files("gemma_batch").joinpath("data/reviews.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def fewshot() -> str:
    return files("gemma_batch").joinpath("data/fewshot.txt").read_text(encoding="utf-8")


TEMPLATE = "Review: {text}\nSentiment:"


def demo() -> None:
    """Start the API and a worker, label the bundled reviews, print results and accuracy."""
    settings = get_settings()
    db_upgrade()
    if not is_prepared(settings.model_dir, settings.model):
        console.print(f"preparing {settings.model} (once; a minute or two)…")
        prepare(settings.model, settings)
    rows = sample_rows()
    with LocalStack({}, Path(settings.data_dir) / "logs", ["--device", settings.device]) as stack:
        console.print(f"API at {stack.url}, worker logs in {stack.log_dir}")
        job = stack.client().label(
            rows, TEMPLATE, list(LABELS), settings.model, prefix=fewshot(), metadata={"demo": "1"}
        )
        console.print(f"submitted {job.id} ({len(rows)} reviews, labels {', '.join(LABELS)})")
        info = job.wait(poll=0.5, progress=True)
        results = list(job.results())
    table = Table("id", "review", "expected", "label", "p", "")
    right = 0
    for row in results:
        ok = row["label"] == row["sentiment"]
        right += ok
        probability = (row["label_probs"] or {}).get(row["label"], 0.0)
        table.add_row(
            row["id"], row["text"][:60], row["sentiment"], row["label"], f"{probability:.2f}",
            "✓" if ok else "✗",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"job {info.id} {info.status}: accuracy {right}/{len(rows)} = {right / len(rows):.0%}"
    )
