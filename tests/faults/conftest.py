"""Fixtures of the fault-injection tests: private servers, real worker processes, one HTTP door.

Each test gets its own redis-server on a spare port, so that killing, restarting or emptying it
touches nothing else, and no worker of another test can take its tasks. Its database is a fresh
one on the shared test PostgreSQL, or, for a test that restarts the database or cuts its
connections, a private PostgreSQL made with initdb in a temporary folder. The API and the
workers are `gemma-batch api` and `gemma-batch worker` child processes. Everything started here
is stopped when the test ends, and dies with the test run if that is killed.

All HTTP goes through `Api`, built in `FaultStack.client` with `auth_headers`: the one place to
add an API key once /v1 needs one.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from sqlalchemy import Engine, Row, func, select
from sqlalchemy.orm import Session

from gemma_batch.cli.stack import _die_with_parent, free_port
from gemma_batch.settings import get_settings
from gemma_batch.store.sessions import reset_sql_engine, sql_engine
from gemma_batch.store.tables import Item, Job
from tests.conftest import TINY, _postgres_database, wait_for

# What every fault test runs with: the test-only hooks on, and short lease and sweep periods,
# so that recovery from a dead worker or a lost message takes seconds, not minutes.
FAULT_ENV = {
    "GEMMA_BATCH_FAULT_INJECTION": "true",
    "GEMMA_BATCH_LEASE_SECONDS": "3",
    "GEMMA_BATCH_RECONCILE_INTERVAL": "1",
    "GEMMA_BATCH_RECONCILE_GRACE": "1",
    "GEMMA_BATCH_MAX_ATTEMPTS": "3",
    # Small chunks and micro-batches (two or three of the prompts below), so results come in
    # steps; `@@sleep=N@@` sleeps the sum over a micro-batch, so N per item.
    "GEMMA_BATCH_CHUNK_SIZE": "8",
    "GEMMA_BATCH_BATCH_TOKENS": "64",
    "GEMMA_BATCH_DEVICE": "cpu",
    "GEMMA_BATCH_QUANTIZATION": "none",
    "GEMMA_BATCH_WORKER_METRICS_PORT": "0",
}
TENANT = "faults"
FINISHED = ("completed", "failed", "cancelled")
PARAMS = {"max_new_tokens": 4}
MODEL_READY = re.compile(r"model \S+ ready in worker process")
CONSUMER_READY = re.compile(r" ready\.\s*$", re.MULTILINE)
TASK_RECEIVED = re.compile(r"Task gemma_batch\.run_chunk\[([0-9a-f-]+)\] received")


def auth_headers(engine: Engine) -> dict[str, str]:
    """The headers every request of these tests carries: a new API key of tenant TENANT.

    The one place for authentication; the key is made straight in the database `engine` points
    at, the way `gemma-batch keys create --tenant faults` makes one.
    """
    from api.auth import create_key

    with Session(engine) as session:
        key = create_key(session, TENANT).key
    return {"Authorization": f"Bearer {key}"}


def prompts(
    count: int, sleep: float | None = None, faults: dict[int, str] | None = None
) -> list[dict[str, str]]:
    """`count` items; `sleep` slows each micro-batch, `faults` adds a hook to some (index: text)."""
    slow = f"@@sleep={sleep}@@ " if sleep else ""
    items = [{"id": f"p{i}", "prompt": f"{slow}Item {i}: about {i}"} for i in range(count)]
    for index, fault in (faults or {}).items():
        items[index]["prompt"] += f" {fault}"
    return items


# --- Servers -------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of our own on a spare port, keeping nothing on disk: a restart is empty."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, 20, lambda: f"redis-server on port {self.port} does not answer", 0.05)

    def queued_chunks(self) -> set[tuple[str, int]]:
        """(job, chunk) of every chunk task waiting in the tiny model's queue (not delivered).

        kombu keeps one Redis list per priority step, named after the queue; each entry is a
        JSON message whose body (base64) holds the task's arguments (job_id, chunk, size).
        """
        client = self.client()
        found: set[tuple[str, int]] = set()
        for key in client.scan_iter(match=f"gemma-batch.{TINY}*", _type="list"):
            for payload in client.lrange(key, 0, -1):
                message = json.loads(payload)
                body = message["body"]
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                job_id, chunk, _size = json.loads(body)[0]
                found.add((job_id, chunk))
        return found

    def kill(self) -> None:
        """kill -9: everything it held (queued and unacknowledged messages) is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart_empty(self, down: float = 0.5) -> None:
        self.kill()
        time.sleep(down)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _postgres_bin() -> Path:
    """The newest installed PostgreSQL server's bin folder."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    pytest.fail("no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql")


def _postgres_preexec() -> None:
    # Runs after the switch to the postgres user, which would have cleared the death signal.
    # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to leave.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class PostgresServer:
    """A private PostgreSQL: initdb into a temporary folder, `postgres` on a spare port.

    Run as the `postgres` user when we are root (PostgreSQL refuses to run as root). The server
    is our child process, so stopping it is a signal: SIGINT for a fast shutdown, SIGQUIT for an
    immediate one (a crash, as far as its clients and its recovery are concerned).
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.directory = Path(tempfile.mkdtemp(prefix="gemma-batch-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self.as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        initdb = [
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
            "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        try:
            subprocess.run(initdb, check=True, capture_output=True, **self.as_user)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=3,
        )

    def start(self) -> None:
        command = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-k", str(self.directory),
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
        ]  # fmt: skip
        log = (self.directory / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_postgres_preexec,
            **self.as_user,
        )
        log.close()

        def answers() -> bool:
            import psycopg

            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited; see {self.directory / 'postgres.log'}")
            try:
                self._connect().close()
                return True
            except psycopg.OperationalError:
                return False

        wait_for(answers, 60, lambda: f"PostgreSQL on port {self.port} does not answer", 0.1)

    def create_database(self, name: str) -> str:
        with self._connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        signum = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum[mode])
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, mode: str = "immediate", down: float = 2.0) -> None:
        """Stop (`immediate`: as if it crashed), stay down `down` seconds, start again."""
        self.stop(mode)
        time.sleep(down)
        self.start()

    def terminate_connections(self, database: str) -> int:
        """Kill every other session on `database` (pg_terminate_backend); how many there were."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.stop("fast")
        shutil.rmtree(self.directory, ignore_errors=True)


def migrate(url: str) -> None:
    """Create the tables in `url` the way the project does (alembic, `gemma-batch db upgrade`)."""
    from gemma_batch.cli.admin import db_upgrade

    previous = os.environ["GEMMA_BATCH_DATABASE_URL"]
    os.environ["GEMMA_BATCH_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_sql_engine()
    try:
        db_upgrade()
    finally:
        reset_sql_engine()
        os.environ["GEMMA_BATCH_DATABASE_URL"] = previous
        get_settings.cache_clear()


# --- What the tests read: SQL directly, and the HTTP API ----------------------------------


class Store:
    """The tests' own read-only view of the job tables (SQL is the source of truth)."""

    def __init__(self, url: str) -> None:
        self.engine = sql_engine(url, "gemma-batch fault-tests")

    def items(self, job_id: str) -> list[Row[Any]]:
        query = (
            select(
                Item.index,
                Item.chunk,
                Item.status,
                Item.attempts,
                Item.output,
                Item.error,
                Item.finished_at,
                Item.worker,
            )
            .where(Item.job_id == job_id)
            .order_by(Item.index)
        )
        with self.engine.connect() as connection:
            return list(connection.execute(query))

    def job(self, job_id: str) -> Row[Any]:
        query = select(Job.status, Job.total, Job.completed, Job.failed).where(Job.id == job_id)
        with self.engine.connect() as connection:
            return connection.execute(query).one()

    def released(self, job_id: str) -> int:
        """How many of the job's chunks the dispatcher has released to the broker."""
        with self.engine.connect() as connection:
            return int(connection.scalar(select(Job.released).where(Job.id == job_id)) or 0)

    def statuses(self, job_id: str) -> dict[str, int]:
        query = select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
        with self.engine.connect() as connection:
            return {status: count for status, count in connection.execute(query)}

    def completed(self, job_id: str) -> int:
        return self.statuses(job_id).get("completed", 0)

    def count_jobs(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(Job)) or 0)

    def job_statuses(self) -> dict[str, int]:
        """How many jobs, of every job in the database, are in each state."""
        query = select(Job.status, func.count()).group_by(Job.status)
        with self.engine.connect() as connection:
            return {status: count for status, count in connection.execute(query)}

    def all_jobs(self) -> list[Row[Any]]:
        query = select(Job.id, Job.status, Job.total, Job.completed, Job.failed)
        with self.engine.connect() as connection:
            return list(connection.execute(query))

    def all_items(self) -> list[Row[Any]]:
        query = select(Item.job_id, Item.index, Item.status, Item.attempts)
        with self.engine.connect() as connection:
            return list(connection.execute(query))

    def close(self) -> None:
        self.engine.dispose()


class Api:
    """Every HTTP request of the fault tests (see `auth_headers`)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)

    def post_job(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.http.post("/v1/jobs", json=body, headers=headers)

    def submit(
        self,
        items: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body = {"model": TINY, "items": items, "params": params or PARAMS}
        response = self.post_job(body, headers)
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def results(self, job_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/jobs/{job_id}/results")
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.iter_lines() if line.strip()]

    def cancel(self, job_id: str) -> Any:
        return self.http.post(f"/v1/jobs/{job_id}/cancel")

    def close(self) -> None:
        self.http.close()


# --- The processes -------------------------------------------------------------------------


class FaultStack:
    """`gemma-batch api` and any number of `gemma-batch worker`s, each a child process group.

    A `gemma-batch worker` is three processes: the supervisor (what we start; it restarts a
    Celery worker that exits), the Celery main process (it takes messages from Redis and hands
    them to its pool), and one prefork pool child, which loads the model and runs the chunks.
    """

    def __init__(
        self,
        database_url: str,
        redis_server: RedisServer,
        env: dict[str, str],
        log_dir: Path,
        postgres: PostgresServer | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.redis = redis_server
        self.postgres = postgres
        self.env = (
            dict(os.environ)
            | FAULT_ENV
            | {
                "GEMMA_BATCH_DATABASE_URL": database_url,
                "GEMMA_BATCH_BROKER_URL": redis_server.url,
                "GEMMA_BATCH_API_URL": self.url,
                "GEMMA_BATCH_MODEL": TINY,
            }
            | env
        )
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.store = Store(database_url)
        self._clients: list[Api] = []
        self._headers: dict[str, str] | None = None
        self.api = self.client()

    def client(self) -> Api:
        """A new HTTP client (one per thread); the only way these tests reach the API."""
        if self._headers is None:
            self._headers = auth_headers(self.store.engine)
        client = Api(self.url, self._headers)
        self._clients.append(client)
        return client

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "gemma_batch", *args],
                env=self.env | (env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # own process group; dies with us
            )

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- {name}.log ---\n" + "\n".join(self.log(name).splitlines()[-lines:])
            for name in self.processes
        )

    def start_api(self) -> None:
        self._spawn("api", "api", "--host", "127.0.0.1", "--port", str(self.port))

        def healthy() -> bool:
            if self.processes["api"].poll() is not None:
                raise AssertionError(f"the API exited:\n{self.tails()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, self.tails, 0.3)

    def start_worker(self, name: str, wait: bool = True, env: dict[str, str] | None = None) -> None:
        self._spawn(name, "worker", "--device", "cpu", env=env)
        if wait:
            self.wait_worker_ready(name)

    def model_loads(self, name: str) -> int:
        return len(MODEL_READY.findall(self.log(name)))

    def wait_worker_ready(self, name: str, loads: int = 1, timeout: float = 120) -> None:
        """Until the pool child has loaded the model `loads` times and the consumer is up."""

        def ready() -> bool:
            if self.processes[name].poll() is not None:
                raise AssertionError(f"worker {name} exited:\n{self.tails()}")
            text = self.log(name)
            return self.model_loads(name) >= loads and bool(CONSUMER_READY.search(text))

        wait_for(ready, timeout, self.tails, 0.3)

    def received(self, name: str) -> list[str]:
        """Ids of the chunk tasks worker `name` was handed, in order (a redelivery repeats one)."""
        return TASK_RECEIVED.findall(self.log(name))

    def pool_children(self, name: str) -> list[psutil.Process]:
        """The prefork pool child of worker `name`: the process that runs the chunks."""
        supervisor = psutil.Process(self.processes[name].pid)
        return [child for main in supervisor.children() for child in main.children()]

    def kill_worker(self, name: str) -> None:
        """kill -9 the whole worker (supervisor, Celery main process, pool child) at once."""
        process = self.processes[name]
        members = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        psutil.wait_procs(members, timeout=10)

    def kill_pool_child(self, name: str) -> int:
        """kill -9 only the pool child (as the OOM killer would); Celery starts a new one."""
        (child,) = self.pool_children(name)
        child.kill()
        child.wait(10)
        return int(child.pid)

    def terminate_worker(self, name: str) -> None:
        """SIGTERM to `gemma-batch worker` alone, as `docker stop` or Kubernetes send it."""
        self.processes[name].send_signal(signal.SIGTERM)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for process in self.processes.values():
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        self.store.close()

    # --- waiting on and checking jobs

    def describe(self, job_id: str) -> str:
        try:
            state = f"job {self.store.job(job_id)}, items {self.store.statuses(job_id)}"
        except Exception as exc:  # the database may be the thing that is down
            state = f"(cannot read the job: {exc})"
        return f"{job_id}: {state}\n{self.tails()}"

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """The job once it is completed, failed or cancelled, read through the API."""

        def finished() -> dict[str, Any] | None:
            try:
                info = self.api.job(job_id)
            except (AssertionError, httpx.TransportError):
                return None  # the API may answer 5xx while a server it needs is down
            return info if info["status"] in FINISHED else None

        return wait_for(finished, timeout, lambda: self.describe(job_id), 0.3)  # type: ignore[no-any-return]

    def wait_completed_items(self, job_id: str, at_least: int, timeout: float = 120) -> int:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (done := self.store.completed(job_id)) >= at_least and done,
            timeout,
            lambda: self.describe(job_id),
        )

    def check_each_item_once(
        self, job_id: str, total: int, completed: int, failed: int = 0
    ) -> list[Row[Any]]:
        """The job is completed, with exactly one result per item, counted exactly once."""
        rows = self.store.items(job_id)
        assert [row.index for row in rows] == list(range(total)), "an item row missing or extra"
        statuses = [row.status for row in rows]
        assert (statuses.count("completed"), statuses.count("failed")) == (completed, failed), (
            self.describe(job_id)
        )
        job = self.store.job(job_id)
        assert (job.status, job.total, job.completed, job.failed) == (
            "completed",
            total,
            completed,
            failed,
        ), self.describe(job_id)
        assert all(row.output is not None for row in rows if row.status == "completed")
        info = self.api.job(job_id)
        assert info["status"] == "completed"
        assert info["counts"] == {"total": total, "completed": completed, "failed": failed}
        lines = self.api.results(job_id)
        assert [line["index"] for line in lines] == list(range(total)), "results lost or doubled"
        return rows


# --- Fixtures ------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_stack(
    model_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[Callable[..., FaultStack]]:
    """Start an API (with `workers` workers) on this test's Redis and a fresh database.

    `private_postgres=True`: the database is on a PostgreSQL of the test's own, which the test
    may restart or cut (`stack.postgres`); otherwise on the shared test PostgreSQL. `env` adds
    to, or overrides, FAULT_ENV. Teardown kills the processes first, then drops the database.
    """
    cleanup = ExitStack()

    def make(
        env: dict[str, str] | None = None, workers: int = 1, private_postgres: bool = False
    ) -> FaultStack:
        postgres = None
        if private_postgres:
            postgres = PostgresServer()
            cleanup.callback(postgres.close)
            postgres.start()
            url = postgres.create_database("gemma_batch")
        else:
            url = cleanup.enter_context(contextmanager(_postgres_database)())
        migrate(url)
        stack = FaultStack(url, redis_server, env or {}, tmp_path / "logs", postgres)
        cleanup.callback(stack.close)
        stack.start_api()
        for number in range(1, workers + 1):
            stack.start_worker(f"worker{number}", wait=False)
        for number in range(1, workers + 1):
            stack.wait_worker_ready(f"worker{number}")
        return stack

    with cleanup:
        yield make
