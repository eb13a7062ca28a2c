"""Ingest: upload a 100k-row CSV into PostgreSQL through the API; rows/s and the API's memory.

Starts its own API process on a fresh PostgreSQL database (no worker: only ingest is timed),
samples the API's resident memory while the upload runs, and drops the database afterwards.

    .venv/bin/python -m bench.ingest [--rows 100000] [--runs 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import redis

from bench.common import Row, console, print_table, scratch_database
from gemma_batch.cli.stack import free_port

BROKER = "redis://127.0.0.1:6379/14"


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "stars"])
        for i in range(rows):
            writer.writerow(
                [f"row-{i}", f"Review number {i}: the product was fine, I suppose.", i % 5]
            )


class PeakMemory(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    with scratch_database(args.postgres) as url:
        _run(args, url)


def _run(args: argparse.Namespace, url: str) -> None:
    env = os.environ | {"GEMMA_BATCH_DATABASE_URL": url, "GEMMA_BATCH_BROKER_URL": BROKER}
    port = free_port()
    api = None
    try:
        subprocess.run([sys.executable, "-m", "gemma_batch", "db", "upgrade"], env=env, check=True)
        made = subprocess.run(
            [sys.executable, "-m", "gemma_batch", "keys", "create", "--tenant", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = made.stdout.split()[0]  # the key's line comes first, then the webhook secret's
        api = subprocess.Popen(
            [sys.executable, "-m", "gemma_batch", "api", "--port", str(port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "rows.csv"
            write_csv(data, args.rows)
            small = Path(tmp) / "warm.csv"
            write_csv(small, 10)
            form = {
                "model": "gemma-3-270m",
                "template": "Review: {text}\nStars:",
                "choices": "1,2,3,4,5",
            }
            auth = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=base, headers=auth, timeout=600) as client:
                _wait_up(client)
                # Warm up: the first upload loads the tokenizer used for the length check.
                _upload(client, small, form)
                row = Row(f"CSV upload into PostgreSQL ({args.rows} rows)", args.rows)
                growth = []
                for _ in range(args.runs):
                    memory = PeakMemory(api.pid)
                    before = memory.peak
                    memory.start()
                    started = time.perf_counter()
                    _upload(client, data, form)
                    row.seconds.append(time.perf_counter() - started)
                    memory.running = False
                    memory.join()
                    growth.append((memory.peak - before) / 2**20)
                size = data.stat().st_size / 2**20
                row.note = f"API peak memory growth {max(growth):.0f} MB; file {size:.1f} MB"
        print_table("Ingest", [row], row.name)
        console.print(f"rows/s (median of {args.runs}): {row.items_per_s:,.0f}")
    finally:
        if api:
            api.terminate()
            api.wait()
        redis.Redis.from_url(BROKER).flushdb()


def _wait_up(client: httpx.Client) -> None:
    for _ in range(200):
        try:
            client.get("/healthz")
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the API did not start")


def _upload(client: httpx.Client, path: Path, form: dict[str, str]) -> None:
    with path.open("rb") as handle:
        response = client.post("/v1/jobs", data=form, files={"file": (path.name, handle)})
    response.raise_for_status()


if __name__ == "__main__":
    main()
