"""W5 sync under load: a 16-token /v1/completions call while a 2,000-item job runs.

On the real Gemma 3 270M (fp32), through a local stack (API, one worker, SQLite, Redis), with
the official `openai` client: the median latency of sequential calls on an idle worker, then
of the same calls while a big batch job keeps the worker's batch full. A sync request takes
the next free slot (reserved rows) ahead of batch rows; the goal is at most 3x the idle latency.

    .venv/bin/python -m bench.w5_sync [--calls 10] [--items 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import console, use_private_store
from bench.prompts import prompts

MODEL = "gemma-3-270m"


def latencies(client: object, texts: list[str]) -> list[float]:
    seconds = []
    for text in texts:
        started = time.perf_counter()
        answer = client.completions.create(  # type: ignore[attr-defined]
            model=MODEL, prompt=text, max_tokens=16, temperature=0
        )
        seconds.append(time.perf_counter() - started)
        assert answer.choices[0].text is not None
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    folder = use_private_store(MODEL)
    from openai import OpenAI

    from gemma_batch.cli.stack import LocalStack

    texts = prompts(args.items + args.calls)
    calls, batch = texts[: args.calls], texts[args.calls :]
    with LocalStack({}, folder / "logs", ["--device", "cpu"]) as stack:
        client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)
        latencies(client, calls[:2])  # the worker loads the model
        idle = latencies(client, calls)
        job = stack.client().submit(MODEL, [{"prompt": t} for t in batch], {"max_new_tokens": 16})
        time.sleep(5)  # the batch fills up
        loaded = latencies(client, calls)
        info = job.refresh()
        if info.status in ("queued", "running"):  # the rest is not wanted
            job.cancel()
    console.print(f"idle latencies (s): {[round(s, 2) for s in idle]}")
    console.print(f"loaded latencies (s): {[round(s, 2) for s in loaded]}")
    ratio = statistics.median(loaded) / statistics.median(idle)
    console.print(
        f"W5: median 16-token completion {statistics.median(idle):.2f} s idle, "
        f"{statistics.median(loaded):.2f} s beside a {args.items}-item job "
        f"({info.counts.completed} of its items done by then): {ratio:.2f}x idle (goal <= 3x)"
    )


if __name__ == "__main__":
    main()
