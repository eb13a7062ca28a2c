"""End to end: the same items through API -> Redis -> worker -> SQL, and through the engine alone.

On the real Gemma 3 270M (fp32, the CPU default), greedy, 16 new tokens, EOS honoured:
- the engine alone: the worker's Engine over all items in one call, in this process (while the
  stack idles beside it);
- one job of all the items through a local stack (API and one worker, SQLite, Redis), timed
  from the submit to the job's completion (the worker is warm: a first job loads the model);
- as many one-item jobs, submitted at once from 20 threads, timed until the last completes
  (the worker's scheduler pulls them into one batch), against one job of the same items.
  They are watched as a client watching many jobs would: it waits on the newest still open,
  then finds the others' states in the job listing (a page of 100 jobs a request), rather than
  sending a request per job, whose last requests, sent one after another once the jobs end
  together, would time the client rather than the service.
Each stack figure is timed twice: to the finish the store records (the job's `finished_at`,
stamped by the write that stores its last result; the local stack shares this machine's clock),
the service's own time, and to the moment the polling client sees it, which adds up to a poll
interval and a request made while the worker finishes (0.7 to 1.0 s measured on a 60 s job).
The systems take turns, round by round. Clients poll every 0.5 s (half the client's default):
more often would take CPU from the worker on a small machine, less often would add waiting.
On a GPU (`--device cuda`, bf16) the whole path's items go in as `--jobs` jobs submitted at once,
as a GPU is meant to be fed: `--device cuda --items 1024 --jobs 16`.

    .venv/bin/python -m bench.e2e [--items 256] [--small 200] [--runs 3] [--device cpu|cuda]
                                  [--jobs 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import torch

from bench.common import Row, model_path, print_table, timed, use_private_store
from bench.prompts import prompts
from gemma_batch.client import Client
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import FINISHED_JOB_STATES, WorkItem
from gemma_batch.settings import get_settings

MODEL = "gemma-3-270m"
NEW = 16
PARAMS = {"max_new_tokens": NEW}


def one_job(client: Client, texts: list[str]) -> datetime:
    """Submit the texts as one job and wait for it; when the store recorded its finish."""
    job = client.submit(MODEL, [{"prompt": t} for t in texts], PARAMS)
    info = job.wait(poll=0.5)
    assert info.status == "completed" and info.finished_at is not None
    return info.finished_at


def small_jobs(client: Client, texts: list[str]) -> datetime:
    """Submit each text as a job of its own, from 20 threads, and wait for all; the last
    recorded finish."""
    return split_jobs(client, texts, len(texts), threads=20)


def split_jobs(client: Client, texts: list[str], jobs: int, threads: int = 0) -> datetime:
    """The texts as `jobs` jobs of about equal size, submitted at once (from `threads` threads,
    one a job unless told); the last recorded finish."""
    parts = [texts[n::jobs] for n in range(jobs)]
    with ThreadPoolExecutor(threads or jobs) as pool:
        made = list(
            pool.map(
                lambda part: client.submit(MODEL, [{"prompt": t} for t in part], PARAMS), parts
            )
        )
    return wait_all(client, {job.id for job in made})


def stack_timed(seen: Row, recorded: Row, work: Callable[[], datetime]) -> None:
    """Time `work` to the moment this client sees it done (`seen`) and to the finish the store
    recorded, the datetime `work` returns (`recorded`)."""
    started_at, started = datetime.now(UTC), time.perf_counter()
    finish = work()
    seen.seconds.append(time.perf_counter() - started)
    recorded.seconds.append((finish - started_at).total_seconds())


def wait_all(client: Client, ids: set[str], poll: float = 0.5) -> datetime:
    """Until every one of `ids` is finished: wait on the newest that is still open (a request
    every `poll` seconds), then look at the rest in the newest jobs' listing. Returns the last
    recorded finish."""
    while len(done := finished(client, ids)) < len(ids):
        assert client.job(max(ids - done.keys())).wait(poll=poll).status == "completed"
    return max(done.values())


def finished(client: Client, ids: set[str]) -> dict[str, datetime]:
    """The finish of each of `ids` that is finished, from the listing's pages (ids sort by
    creation, newest first, so the pages stop at the oldest of them)."""
    done: dict[str, datetime] = {}
    after, oldest = None, min(ids)
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        page = client.request("GET", "/v1/jobs", params=params)
        for job in page["data"]:
            if job["id"] in ids and job["status"] in FINISHED_JOB_STATES:
                assert job["status"] == "completed", job
                done[job["id"]] = datetime.fromisoformat(job["finished_at"])
        after = page["last_id"]
        if not page["has_more"] or after <= oldest:
            return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="jobs the whole path's items go in")
    args = parser.parse_args()
    if not 1 <= args.jobs <= args.items:
        parser.error(f"--jobs must be from 1 to --items ({args.items}), not {args.jobs}")
    folder = use_private_store(MODEL)
    from gemma_batch.cli.stack import LocalStack
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model

    if args.device == "cpu":
        torch.set_num_threads(2)
    texts = prompts(args.items)

    model, tokenizer = load_model(model_path(), "none", args.device)
    engine = Engine(model, tokenizer, batch_tokens=get_settings().batch_tokens)
    items = [WorkItem(i, t, None) for i, t in enumerate(texts)]
    spec = JobSpec(params=GenerationParams(**PARAMS))
    small = texts[: args.small]
    engine_row = Row("engine alone, one call", args.items)
    jobs = "one job" if args.jobs == 1 else f"{args.jobs} jobs"
    stack_row = Row(f"API -> Redis -> worker -> SQL, {jobs}, to the recorded finish", args.items)
    stack_seen = Row("the same, as the polling client sees it", args.items)
    one_row = Row(f"one job of {args.small} items, to its recorded finish", args.small)
    one_seen = Row("the same, as the polling client sees it", args.small)
    many_row = Row(f"{args.small} one-item jobs at once, to the last recorded finish", args.small)
    many_seen = Row("the same, as the polling client sees them", args.small)

    with LocalStack({}, folder / "logs", ["--device", args.device]) as stack:
        client = stack.client()
        one_job(client, texts[:8])  # loads the model in the worker
        # Round by round, so that a shared machine's drift falls on every system alike.
        for _ in range(args.runs):
            timed(engine_row, 1, lambda: [r for b in engine.run(items, spec) for r in b])
            stack_timed(stack_seen, stack_row, lambda: split_jobs(client, texts, args.jobs))
            stack_timed(one_seen, one_row, lambda: one_job(client, small))
            stack_timed(many_seen, many_row, lambda: small_jobs(client, small))
    rows = [engine_row, stack_row, stack_seen]
    print_table(f"End to end: {args.items} prompts x {NEW} tokens", rows, engine_row.name)
    rows = [one_row, many_row, one_seen, many_seen]
    print_table(f"Small jobs: {args.small} prompts", rows, one_row.name)


if __name__ == "__main__":
    main()
