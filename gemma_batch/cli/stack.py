"""Run an API and a worker as child processes: for the demo, and for tests of the real path."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import httpx

from api import auth
from gemma_batch.client import Client
from gemma_batch.store.sessions import session_scope

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If whoever started us is killed outright, we must not live on holding the queue.
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()  # our own process group, so a stop reaches the worker's children too


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalStack(AbstractContextManager["LocalStack"]):
    """`gemma-batch api` and `gemma-batch worker` on loopback, logging into `log_dir`.

    Auth stays on: the stack makes itself an API key for the tenant "demo", in the database
    this process's settings name (its API uses the same one), and revokes the key when it
    stops. `client()` and the CLI run with `env` send it.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, worker_args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | env | {"GEMMA_BATCH_API_URL": self.url}
        self.log_dir = log_dir
        self.worker_args = worker_args or ["--device", "cpu"]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.key_id = ""
        self.api_key = ""

    def _start(self, name: str, *args: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "gemma_batch", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    def client(self) -> Client:
        return Client(self.url, self.api_key)

    def __enter__(self) -> LocalStack:
        with session_scope() as session:
            made = auth.create_key(session, "demo")
        self.key_id, self.api_key = made.id, made.key
        self.env["GEMMA_BATCH_API_KEY"] = made.key
        try:
            self._start("api", "api", "--port", str(self.port))
            self._start("worker", "worker", *self.worker_args)
            self.wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)  # no process or live key is left behind
            raise
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["api"].poll() is not None:
                raise RuntimeError(f"the API exited; see {self.log_dir / 'api.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the API did not become healthy; see {self.log_dir / 'api.log'}")

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, timeout: float = 30.0) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for name in list(self.processes):
            self.stop(name)
        with session_scope() as session:
            auth.revoke_key(session, self.key_id)
