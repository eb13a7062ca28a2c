"""Dispatch at scale: what a dispatcher tick and a worker's pull cost with big backlogs in SQL.

Two tenants' jobs of `--rows` pending items each (one job a window released, the other none)
on a fresh PostgreSQL database; then, round after round, the dispatcher's release for the model
(the window's room, the tenants' shares), a worker's pull of 64 items, a sync-request poll and
the sweep's search for stranded chunks, each timed. These run every 0.5 s (the dispatcher), every
0.2 s while a batch has room (pulls) and every 50 ms (sync polls): they must stay milliseconds
however big the backlog.

    .venv/bin/python -m bench.dispatch [--rows 1000000] [--runs 5]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.common import console, scratch_database

CHUNK = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with scratch_database(args.postgres) as url:
        os.environ["GEMMA_BATCH_DATABASE_URL"] = url
        os.environ["GEMMA_BATCH_CHUNK_SIZE"] = str(CHUNK)
        try:
            run(args.rows, args.runs)
        finally:
            from gemma_batch.store.sessions import reset_sql_engine

            reset_sql_engine()


def run(rows: int, runs: int) -> None:
    # Imported once the environment names the database.
    from gemma_batch.cli.admin import db_upgrade
    from gemma_batch.dispatch.dispatcher import release
    from gemma_batch.dispatch.sweep import stranded
    from gemma_batch.settings import get_settings
    from gemma_batch.store.claims import claim_next
    from gemma_batch.store.sessions import session_scope
    from gemma_batch.store.tables import Job

    db_upgrade()
    settings = get_settings()
    started = time.monotonic()
    with session_scope() as session:
        for job_id, tenant, released in (("job_a", "a", 4), ("job_b", "b", 0)):
            session.add(
                Job(
                    id=job_id,
                    tenant=tenant,
                    model="m",
                    status="running",
                    total=rows,
                    chunks=-(-rows // CHUNK),
                    released=released,
                )
            )
            session.flush()
            session.execute(
                text(
                    "INSERT INTO items (job_id, index, chunk, prompt, status, attempts) SELECT"
                    " :job, g, g / :chunk, 'p', 'pending', 0 FROM generate_series(0, :n - 1) g"
                ),
                {"job": job_id, "chunk": CHUNK, "n": rows},
            )
        session.commit()
        session.execute(text("ANALYZE"))
        session.commit()
    console.print(f"{2 * rows:,} pending items stored in {time.monotonic() - started:.1f} s")

    def tick(session: Session) -> object:
        out = release(session, "m", settings)
        session.commit()
        return out

    steps: dict[str, Callable[[Session], object]] = {
        "dispatcher: release (window, shares)": tick,
        "worker: pull 64 items": lambda s: claim_next(s, "m", "w/1", 60, 64),
        "worker: sync-request poll": lambda s: claim_next(s, "m", "w/1", 60, 4, interactive=True),
        "sweep: stranded chunks": lambda s: stranded(s, 0),
    }
    times: dict[str, list[float]] = {step: [] for step in steps}
    for _ in range(runs):
        for step, call in steps.items():
            with session_scope() as session:
                begin = time.perf_counter()
                call(session)
                times[step].append(time.perf_counter() - begin)
    for step, seconds in times.items():
        console.print(f"{step:40} median {statistics.median(seconds) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
