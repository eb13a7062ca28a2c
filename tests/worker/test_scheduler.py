"""The scheduler in process on the tiny model and a real store: poison items, redelivered
chunks, rows of several jobs in one batch, cancels."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from api.jobs import service as jobs
from api.jobs.schemas import JobCreate
from gemma_batch.dispatch.finished import channel
from gemma_batch.domain.records import INTERACTIVE_PRIORITY
from gemma_batch.settings import get_settings
from gemma_batch.store.claims import claim_chunk
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import Item, Job
from tests.conftest import TEST_BROKER, TINY
from worker.engine import batcher as batcher_module
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.scheduler import Scheduler, Ticket


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    model, tokenizer = load_model(model_dir / TINY, "none", "cpu")
    return Engine(model, tokenizer, batch_tokens=4096, inject_faults=True)


@pytest.fixture
def scheduler(database_url: str, engine: Engine) -> Iterator[Scheduler]:
    # Pulls nothing on its own (merge_items 0): only what a test hands it runs.
    settings = get_settings().model_copy(update={"merge_items": 0, "max_attempts": 3})
    running = Scheduler(engine, settings, "worker-a/1").start()
    yield running
    running.stop()


def _job(prompts: list[str], max_new_tokens: int = 3) -> str:
    request = JobCreate.model_validate(
        {
            "model": TINY,
            "items": [{"prompt": p} for p in prompts],
            "params": {"max_new_tokens": max_new_tokens},
        }
    )
    with session_scope() as session:
        return jobs.create_job(session, request, get_settings(), "tests").id


def _hand_over(scheduler: Scheduler, job_id: str) -> Ticket:
    """What a delivery of the job's chunk 0 does before it waits: claim, hand over."""
    with session_scope() as session:
        spec, claimed = claim_chunk(session, job_id, 0, scheduler.worker, lease_seconds=60)
    assert spec is not None
    ticket = Ticket(job_id, 0)
    scheduler.submit(ticket, spec, claimed)
    return ticket


def _run(scheduler: Scheduler, job_id: str) -> int:
    """What a delivery of the job's chunk 0 does: claim, hand over, wait; how many it stored."""
    ticket = _hand_over(scheduler, job_id)
    scheduler.wait(ticket)
    return ticket.stored


def _items(job_id: str) -> list[Item]:
    with session_scope() as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.index)))


def test_an_item_that_raises_is_found_by_bisecting_and_failed_alone(
    scheduler: Scheduler,
) -> None:
    prompts = [f"item {i}" for i in range(64)]
    prompts[37] = "item @@raise@@"
    job_id = _job(prompts)
    assert _run(scheduler, job_id) == 64
    items = _items(job_id)
    assert [i.index for i in items if i.status == "failed"] == [37]
    assert items[37].error == "RuntimeError: injected fault"
    assert all(i.status == "completed" and i.output is not None for i in items if i.index != 37)
    assert all(i.attempts == 1 for i in items)  # bisecting in one delivery is one run
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.completed, job.failed) == ("completed", 63, 1)


def test_after_a_dead_worker_suspects_run_alone_and_repeat_offenders_fail_unrun(
    scheduler: Scheduler,
) -> None:
    job_id = _job(["fresh", "died once", "died thrice"])
    # What two earlier deliveries that killed their worker leave behind.
    with session_scope() as session:
        for index, attempts in [(1, 1), (2, 3)]:
            session.execute(
                update(Item)
                .where(Item.job_id == job_id, Item.index == index)
                .values(attempts=attempts)
            )
        session.commit()
    assert _run(scheduler, job_id) == 3
    fresh, suspect, doomed = _items(job_id)
    assert (fresh.status, fresh.attempts) == ("completed", 1)
    assert (suspect.status, suspect.attempts) == ("completed", 2)
    assert (doomed.status, doomed.attempts) == ("failed", 3)
    assert doomed.error is not None and "died in each of this item's 3 runs" in doomed.error


def test_a_second_delivery_skips_leased_and_finished_items(
    scheduler: Scheduler,
) -> None:
    job_id = _job(["a", "b"])
    with session_scope() as session:
        _, first = claim_chunk(session, job_id, 0, "worker-a/1", lease_seconds=60)
        _, second = claim_chunk(session, job_id, 0, "worker-b/2", lease_seconds=60)
    assert [c.item.index for c in first] == [0, 1]
    assert second == []  # leased by a live worker: not computed twice
    with session_scope() as session:
        assert jobs.get_job(session, job_id, "tests").status == "running"


def test_a_finished_sync_request_is_announced_and_a_batch_job_is_not(
    scheduler: Scheduler,
) -> None:
    # What wakes a sync call's wait in the API (gemma_batch.dispatch.finished).
    listener = redis.Redis.from_url(TEST_BROKER).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(channel(get_settings()))
    try:
        batch_job = _job(["a", "b"])
        assert _run(scheduler, batch_job) == 2
        sync = _deliver_sync(scheduler)
        heard: list[bytes] = []
        deadline = time.monotonic() + 10
        while sync.encode() not in heard:
            assert time.monotonic() < deadline, heard
            message = listener.get_message(timeout=1)
            if message is not None:
                heard.append(message["data"])
        # Words go out in order: had the batch job's been sent, it would have come first.
        assert heard == [sync.encode()]
        assert [item.status for item in _items(sync)] == ["completed"]
    finally:
        listener.close()


def test_rows_of_two_jobs_share_one_batch_and_a_cancel_takes_them_out(
    scheduler: Scheduler, engine: Engine
) -> None:
    groups: list[set[str]] = []
    steps_after_cancel: list[int] = []
    admit, step = engine.batcher.admit, engine.batcher.step

    def watched_admit(rows: list[Any]) -> list[Any]:
        groups.append({row.key.owner.job_id for row in rows})
        return admit(rows)

    def watched_step() -> list[Any]:
        if cancelled.is_set():
            steps_after_cancel.append(
                sum(r.key.owner.job_id == long_job for r in engine.batcher.rows)
            )
        return step()

    cancelled = threading.Event()
    engine.batcher.admit, engine.batcher.step = watched_admit, watched_step  # type: ignore[method-assign]
    try:
        first, second = _job(["a", "b"]), _job(["c", "d"])
        long_job = _job(["e", "f"], max_new_tokens=400)
        with session_scope() as session:
            claims = [claim_chunk(session, job, 0, scheduler.worker, 60) for job in (first, second)]
        tickets = [Ticket(job, 0) for job in (first, second)]
        for ticket, (spec, claimed) in zip(tickets, claims, strict=True):
            scheduler.submit(ticket, spec, claimed)
        for ticket in tickets:
            scheduler.wait(ticket)
        assert {first, second} in groups  # one prefill for the rows of both jobs

        ticket = _hand_over(scheduler, long_job)
        deadline = time.monotonic() + 30
        while not any(r.key.owner.job_id == long_job for r in engine.batcher.rows):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with session_scope() as session:
            jobs.cancel_job(session, long_job, "tests")
        cancelled.set()
        scheduler.wait(ticket)
    finally:
        engine.batcher.admit, engine.batcher.step = admit, step  # type: ignore[method-assign]
    # The step under way when the cancel landed may still carry the rows; the next one does not.
    assert steps_after_cancel[1:] == [0] * len(steps_after_cancel[1:])
    assert not engine.batcher.rows
    items = _items(long_job)
    assert [item.status for item in items] == ["cancelled", "cancelled"]


def test_a_sync_row_decodes_in_the_express_batch_ahead_of_the_main_one(
    scheduler: Scheduler, engine: Engine
) -> None:
    log: list[str] = []
    main_step, express_step = engine.batcher.step, engine.express.step

    def watched_main() -> list[Any]:
        log.append("main")
        return main_step()

    def watched_express() -> list[Any]:
        log.append("express")
        return express_step()

    engine.batcher.step, engine.express.step = watched_main, watched_express  # type: ignore[method-assign]
    try:
        long_job, ticket = _start_long_job(scheduler, log, "main")
        # Not delivered: the scheduler pulls it from the store by priority.
        sync = _store_sync()
        deadline = time.monotonic() + 30
        while _items(sync)[0].status == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with session_scope() as session:
            jobs.cancel_job(session, long_job, "tests")
        scheduler.wait(ticket)
    finally:
        engine.batcher.step, engine.express.step = main_step, express_step  # type: ignore[method-assign]
    [answer] = _items(sync)
    assert answer.status == "completed"
    # The sync row's decode steps (its first token comes from its prefill) ran one after
    # another, the main batch waiting, and the long job was still running meanwhile.
    steps = (answer.completion_tokens or 0) - 1
    first = log.index("express")
    assert steps >= 1 and log[first : first + steps] == ["express"] * steps
    assert log.count("express") == steps and "main" in log[first + steps :]


def test_a_sync_request_runs_between_the_prefill_passes_of_rows_joining(
    scheduler: Scheduler,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One row a pass: six rows join a running batch in six prefill passes.
    monkeypatch.setitem(batcher_module.PASS_TOKENS, "cpu", 1)
    log: list[str] = []
    sync: list[str] = []
    watching = threading.Event()
    prefill, step = engine.batcher._prefill, engine.batcher.step
    express_admit, express_step = engine.express.admit, engine.express.step

    def watched_prefill(rows: list[Any], first: int) -> Any:
        if watching.is_set():
            log.append("main prefill")
            if not sync:  # a sync request arrives while the first pass runs
                sync.append(_deliver_sync(scheduler))
        return prefill(rows, first)

    def watched_step() -> list[Any]:
        log.append("main step")
        return step()

    def watched_express_admit(rows: list[Any]) -> list[Any]:
        log.append("express prefill")
        return express_admit(rows)

    def watched_express_step() -> list[Any]:
        log.append("express step")
        return express_step()

    engine.batcher._prefill, engine.batcher.step = watched_prefill, watched_step  # type: ignore[method-assign]
    engine.express.admit, engine.express.step = watched_express_admit, watched_express_step  # type: ignore[method-assign]
    try:
        # Rows already decoding in the main batch, which the sync request must leave alone.
        long_job, long_ticket = _start_long_job(scheduler, log, "main step")
        watching.set()
        job_id = _job(["a", "bb b", "c c c", "d d d d", "e e e e e", "f f f f f f"])
        assert _run(scheduler, job_id) == 6
        with session_scope() as session:
            jobs.cancel_job(session, long_job, "tests")
        scheduler.wait(long_ticket)
    finally:
        engine.batcher._prefill, engine.batcher.step = prefill, step  # type: ignore[method-assign]
        engine.express.admit, engine.express.step = express_admit, express_step  # type: ignore[method-assign]
    [answer] = _items(sync[0])
    assert answer.status == "completed"
    assert [item.status for item in _items(job_id)] == ["completed"] * 6
    # After the first pass, the sync row's prefill and all its decode steps; then the other five
    # passes, the main batch not stepped meanwhile.
    steps = (answer.completion_tokens or 0) - 1
    assert steps >= 1
    first = log.index("main prefill")
    joined = log[first : first + 7 + steps]
    assert (
        joined
        == ["main prefill", "express prefill"] + ["express step"] * steps + ["main prefill"] * 5
    )
    assert log.count("main prefill") == 6 and "express step" not in log[first + 7 + steps :]
    assert "between prefill passes failed" not in caplog.text


def _start_long_job(scheduler: Scheduler, log: list[str], marker: str) -> tuple[str, Ticket]:
    """Two rows of 400 tokens handed to the scheduler; returns once `marker` is logged (the
    main batch has stepped), so they decode while the test goes on."""
    job_id = _job(["e", "f"], max_new_tokens=400)
    ticket = _hand_over(scheduler, job_id)
    deadline = time.monotonic() + 30
    while marker not in log:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return job_id, ticket


def _store_sync() -> str:
    """A sync request of one item, stored as /v1/completions stores it."""
    request = JobCreate.model_validate(
        {"model": TINY, "items": [{"prompt": "hi"}], "params": {"max_new_tokens": 5}}
    )
    with session_scope() as session:
        return jobs.store_job(
            session,
            request,
            [jobs.NewItem("prompt", "0", "hi")],
            get_settings(),
            "tests",
            priority=INTERACTIVE_PRIORITY,
        ).id


def _deliver_sync(scheduler: Scheduler) -> str:
    """A sync request stored and its message delivered."""
    job_id = _store_sync()
    _hand_over(scheduler, job_id)
    return job_id
