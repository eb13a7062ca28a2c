"""Labelling end to end: uploads in three formats, the CLI `label` command, the Python client."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gemma_batch.cli.demo import TEMPLATE, fewshot, sample_rows
from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY

CHOICES = ["positive", "negative"]


@pytest.fixture(scope="module")
def stack_database(module_database_url: str) -> str:
    return module_database_url


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    return {"GEMMA_BATCH_CHUNK_SIZE": "5"}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return sample_rows()[:12]


def _write(rows: list[dict[str, str]], folder: Path) -> dict[str, Path]:
    frame = pd.DataFrame(rows)
    paths = {fmt: folder / f"reviews.{fmt}" for fmt in ("jsonl", "csv", "parquet")}
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    return paths


def test_same_labels_from_jsonl_csv_and_parquet(
    stack: LocalStack, rows: list[dict[str, str]], tmp_path: Path
) -> None:
    client = stack.client()
    labelled = {}
    for fmt, path in _write(rows, tmp_path).items():
        job = client.submit_file(path, TEMPLATE, TINY, choices=CHOICES, prefix=fewshot())
        assert job.wait(poll=0.3).status == "completed"
        results = list(job.results())
        assert [r["id"] for r in results] == [row["id"] for row in rows]
        for result, row in zip(results, rows, strict=True):
            assert result["text"] == row["text"] and result["sentiment"] == row["sentiment"]
            assert result["label"] in CHOICES and result["status"] == "completed"
            assert sum(result["label_probs"].values()) == pytest.approx(1.0)
        labelled[fmt] = [(r["label"], round(r["label_probs"]["positive"], 5)) for r in results]
    assert labelled["jsonl"] == labelled["csv"] == labelled["parquet"]

    # Exports in every format, joined to the original fields.
    frame = pq.read_table(io.BytesIO(b"".join(job.download("parquet")))).to_pandas()
    assert list(frame.columns[:3]) == ["id", "text", "sentiment"]
    assert list(frame["label"]) == [label for label, _ in labelled["parquet"]]
    csv_text = b"".join(job.download("csv")).decode()
    assert csv_text.splitlines()[0].startswith(
        "id,text,sentiment,index,status,output,label,label_probs"
    )
    assert len(csv_text.splitlines()) == len(rows) + 1


def test_python_client_labels_a_dataframe(stack: LocalStack, rows: list[dict[str, str]]) -> None:
    job = stack.client().label(pd.DataFrame(rows), TEMPLATE, CHOICES, TINY, prefix=fewshot())
    info = job.wait(poll=0.3, progress=True)
    assert info.counts.completed == len(rows)
    frame = job.to_pandas()
    assert list(frame["id"]) == [row["id"] for row in rows]
    assert set(frame["label"]) <= set(CHOICES)


def test_cli_label_end_to_end(
    stack: LocalStack, rows: list[dict[str, str]], tmp_path: Path
) -> None:
    paths = _write(rows, tmp_path)
    prefix = tmp_path / "fewshot.txt"
    prefix.write_text(fewshot())
    out = tmp_path / "labelled.csv"
    done = subprocess.run(
        [
            sys.executable, "-m", "gemma_batch", "label", str(paths["csv"]),
            "--template", TEMPLATE, "--choices", "positive,negative",
            "--prefix-file", str(prefix), "--model", TINY, "--wait", "-o", str(out),
        ],
        env=stack.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "completed: 12 completed, 0 failed" in done.stderr
    labelled = pd.read_csv(out)
    assert list(labelled["id"]) == [row["id"] for row in rows]
    assert set(labelled["label"]) <= set(CHOICES)
    assert all(json.loads(p)["positive"] >= 0 for p in labelled["label_probs"])
