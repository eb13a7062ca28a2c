"""A small typed Python client for the gemma-batch API (the CLI uses it too)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from gemma_batch.domain.records import FINISHED_JOB_STATES, JobRead


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
        self,
        poll: float = 1.0,
        progress: bool = False,
        on_progress: Callable[[JobRead], None] | None = None,
    ) -> JobRead:
        """Poll until the job is completed, failed or cancelled (with a progress bar if asked)."""
        if progress:
            return self._wait_with_bar(poll)
        while True:
            info = self.refresh()
            if on_progress:
                on_progress(info)
            if info.status in FINISHED_JOB_STATES:
                return info
            time.sleep(poll)

    def _wait_with_bar(self, poll: float) -> JobRead:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(self.id, total=self.info.counts.total, failed=0)

            def show(info: JobRead) -> None:
                done = info.counts.completed + info.counts.failed
                bar.update(task, completed=done, failed=info.counts.failed, description=info.status)

            return self.wait(poll, on_progress=show)

    def to_pandas(self) -> Any:
        """The results (joined to the original fields) as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(list(self.results()))

    def results(self) -> Iterator[dict[str, Any]]:
        """Finished items as dicts, in index order."""
        path = f"/v1/jobs/{self.id}/results"
        with self._client.http.stream("GET", path) as response:
            _raise_for_error(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def download(self, fmt: str = "jsonl") -> Iterator[bytes]:
        """The results file as it streams (`jsonl`, `csv` or `parquet`)."""
        path = f"/v1/jobs/{self.id}/results"
        with self._client.http.stream("GET", path, params={"format": fmt}) as response:
            _raise_for_error(response)
            yield from response.iter_bytes()

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

    def submit_file(
        self,
        path: str | Path,
        template: str,
        model: str,
        **options: Any,
    ) -> Job:
        """Upload a JSONL, CSV or Parquet file; each row goes through `template` ({field})."""
        path = Path(path)
        with path.open("rb") as handle:
            return self._upload(handle, path.name, template, model, options)

    def label(
        self,
        rows: Any,
        template: str,
        choices: list[str],
        model: str,
        prefix: str = "",
        **options: Any,
    ) -> Job:
        """Label rows (a list of dicts or a pandas DataFrame) with one of `choices` each."""
        if hasattr(rows, "to_json"):  # a DataFrame: pandas writes missing cells as null
            data = rows.to_json(orient="records", lines=True, date_format="iso").encode()
        else:
            data = "".join(json.dumps(row, default=str) + "\n" for row in rows).encode()
        options |= {"choices": choices, "prefix": prefix}
        return self._upload(io.BytesIO(data), "rows.jsonl", template, model, options)

    def _upload(
        self, handle: IO[bytes], name: str, template: str, model: str, options: dict[str, Any]
    ) -> Job:
        form = {"template": template, "model": model}
        for key, value in options.items():
            if value is None:
                continue
            form[key] = value if isinstance(value, str) else json.dumps(value)
        info = self.request("POST", "/v1/jobs", data=form, files={"file": (name, handle)})
        return Job(self, JobRead.model_validate(info))

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
