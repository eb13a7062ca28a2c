"""A small typed Python client for the gemma-batch API (the CLI uses it too)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from gemma_batch.schemas import JobRead

FINISHED = ("completed", "failed", "cancelled")


class ApiError(Exception):
    """The API refused a request; `message` is its own explanation."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status_code})")
        self.status_code = status_code
        self.message = message


class Job:
    """A submitted job: refresh it, wait for it, read its results."""

    def __init__(self, client: Client, info: JobRead) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    def refresh(self) -> JobRead:
        self.info = JobRead.model_validate(self._client.request("GET", f"/v1/jobs/{self.id}"))
        return self.info

    def wait(
        self, poll: float = 1.0, on_progress: Callable[[JobRead], None] | None = None
    ) -> JobRead:
        """Poll until the job is completed, failed or cancelled."""
        while True:
            info = self.refresh()
            if on_progress:
                on_progress(info)
            if info.status in FINISHED:
                return info
            time.sleep(poll)

    def results(self) -> Iterator[dict[str, Any]]:
        """Finished items as dicts, in index order."""
        for line in self.download("jsonl"):
            if line.strip():
                yield json.loads(line)

    def download(self, fmt: str = "jsonl") -> Iterator[str]:
        """The results file as it streams, line by line (`jsonl` or `csv`)."""
        path = f"/v1/jobs/{self.id}/results"
        with self._client.http.stream("GET", path, params={"format": fmt}) as response:
            _raise_for_error(response)
            for line in response.iter_lines():
                yield line + "\n"

    def cancel(self) -> JobRead:
        self.info = JobRead.model_validate(
            self._client.request("POST", f"/v1/jobs/{self.id}/cancel")
        )
        return self.info


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    def submit(
        self,
        model: str,
        items: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Job:
        body = {"model": model, "items": items, "params": params or {}, "metadata": metadata or {}}
        return Job(self, JobRead.model_validate(self.request("POST", "/v1/jobs", json=body)))

    def job(self, job_id: str) -> Job:
        return Job(self, JobRead.model_validate(self.request("GET", f"/v1/jobs/{job_id}")))


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text or response.reason_phrase
    raise ApiError(response.status_code, message)
