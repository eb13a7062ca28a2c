"""The one Settings object: every knob comes from the environment (prefix GEMMA_BATCH_)."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url


def _default_model_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gemma-batch" / "models"


class Settings(BaseSettings):
    """Effective configuration of the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_BATCH_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Folder for the embedded SQLite store.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file in data_dir."
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    api_url: str = Field("http://127.0.0.1:8000", description="Where CLI commands find the API.")
    api_host: str = Field("127.0.0.1", description="Address `gemma-batch api` binds.")
    api_port: int = Field(8000, description="Port `gemma-batch api` binds.")

    model: str = Field(
        "gemma-3-270m", description="Model alias (or prepared name) a worker serves."
    )
    model_dir: Path = Field(
        default_factory=_default_model_dir, description="Local cache of prepared models."
    )
    quantization: Literal["auto", "none", "bf16", "int8-wo", "int4-wo", "fp8", "nf4", "int8"] = (
        Field(
            "auto",
            description="int8-wo/int4-wo/fp8 through torchao (int4-wo: CUDA 8.0+, fp8: CUDA 8.9+); "
            "nf4/int8 through bitsandbytes, memory savers only; none = bf16 on CUDA, fp32 on CPU; "
            "bf16 = bf16 on CPUs too (fast on CPUs with AMX; greedy output may then differ batched "
            "and alone by rounding); auto = none, or nf4 on a GPU the bf16 weights would fill "
            "past half (docs/benchmarks.md).",
        )
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    max_adapters: int = Field(
        8,
        ge=1,
        description="LoRA adapters a worker keeps loaded; past this, the least recently used "
        "one no running row needs is unloaded (and loaded again when asked for).",
    )
    static_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Accepted for compatibility; the continuous batcher has no captured-graph "
        "decode step yet, so it changes nothing (README, Models).",
    )
    auth: bool = Field(
        True,
        description="Ask every /v1 request for an API key. Off (false) only for local use: "
        "then anyone who reaches the API is the 'default' tenant.",
    )
    api_key: SecretStr | None = Field(
        None, description="The key CLI commands send to the API (`gemma-batch keys create`)."
    )
    hf_token: SecretStr | None = Field(None, description="Token for the gated Gemma hub repos.")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature on job webhooks, for tenants without "
        "their own.",
    )
    flower_auth: SecretStr | None = Field(
        None,
        description="`user:password` for Flower; `gemma-batch flower` refuses to start without.",
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token the API's /metrics asks for; unset: /metrics is open."
    )
    webhook_allow: str = Field(
        "",
        description="Comma-separated hosts or CIDRs webhooks may reach although internal "
        "(loopback, private, link-local...); empty: public addresses only.",
    )
    webhook_retry_hours: float = Field(
        24.0, gt=0, description="How long a failing webhook is retried, with backoff."
    )

    batch_tokens: int = Field(
        16384,
        ge=64,
        description="Token budget of the running batch (rows x (widest prompt + new tokens)).",
    )
    chunk_size: int = Field(64, ge=1, le=10_000, description="Items per queued task.")
    merge_items: int = Field(
        256,
        ge=0,
        description="Most items the scheduler pulls from SQL at once beyond deliveries "
        "(never more than its batch has room for).",
    )
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="Largest accepted JSON body.")
    max_upload_bytes: int = Field(2 * 2**30, ge=1024, description="Largest accepted file upload.")
    max_items: int = Field(1_000_000, ge=1, description="Most items (rows) in one job.")
    max_prompt_chars: int = Field(
        500_000, ge=1, description="Longest prompt (or chat's text) in characters, per item."
    )
    max_row_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest row kept from an upload (its fields as JSON), and longest JSONL line.",
    )
    max_choices: int = Field(1000, ge=1, description="Most label choices in one job.")
    max_choices_chars: int = Field(
        100_000, ge=1, description="Most characters of all a job's label choices together."
    )
    max_stop_chars: int = Field(200, ge=1, description="Longest stop string, in characters.")
    max_metadata_bytes: int = Field(
        16384, ge=64, description="Largest `metadata` of a job or batch (as JSON)."
    )
    max_queued_items: int = Field(
        5_000_000, ge=1, description="Most items one tenant may have queued or running."
    )
    files_url: str = Field(
        "sql",
        pattern=r"^(sql|s3://[a-z0-9][a-z0-9.\-]{2,62}(/[^\s]*)?|file:[^\s]*)$",
        description="Where /v1/files keeps contents: sql (the database), s3://bucket/prefix, or "
        "file: (the folder files_dir; one machine only).",
    )
    files_dir: Path = Field(
        Path(""), description="The folder of files_url file:; empty: data_dir/files."
    )
    max_file_bytes: int = Field(200 * 2**20, ge=1, description="Largest file for /v1/files.")
    max_batch_requests: int = Field(50_000, ge=1, description="Most requests in one batch file.")
    sync_timeout: float = Field(
        120.0, gt=0, description="Seconds /v1/chat/completions waits for a worker's answer."
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address each worker's /metrics binds (0.0.0.0: every interface)."
    )
    worker_metrics_port: int = Field(
        9400, ge=0, le=65535, description="First worker's /metrics port (one more per GPU); 0: off."
    )
    worker_init_timeout: float = Field(
        600.0, gt=0, description="Seconds a worker process may take to load its model."
    )
    lease_seconds: float = Field(
        60.0, gt=0, description="A worker's hold on the items it runs, renewed while it runs them."
    )
    max_attempts: int = Field(
        3, ge=2, description="Runs an item may start without finishing before it is failed."
    )
    dispatch_window: int = Field(
        4,
        ge=1,
        le=1000,
        description="Chunks each live worker of a model may have waiting in the broker.",
    )
    dispatch_interval: float = Field(
        0.5, gt=0, le=60, description="Seconds between the dispatcher's top-ups of each queue."
    )
    reconcile_interval: float = Field(
        30.0, gt=0, description="Seconds between the API's sweeps for chunks whose task was lost."
    )
    reconcile_grace: float = Field(
        60.0, ge=0, description="Seconds a just-released chunk is left to the queue before a sweep."
    )
    task_time_limit: float = Field(
        3000.0, gt=0, description="Seconds one chunk task may run before its process is killed."
    )
    visibility_timeout: float = Field(
        3600.0,
        gt=0,
        description="Seconds Redis waits for a chunk's acknowledgement before handing it out anew.",
    )
    db_retry_seconds: float = Field(
        300.0, ge=0, description="How long a worker retries the database before giving a batch up."
    )
    fault_injection: bool = Field(
        False,
        description="Tests only: prompts holding @@raise@@, @@kill@@ or @@sleep=N@@ misbehave.",
    )

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'gemma-batch.db').resolve()}"
        if self.files_dir == Path(""):
            self.files_dir = self.data_dir / "files"
        return self

    def store_tag(self) -> str:
        """A short name for this store, in the broker's keys and channels: stacks on other
        databases may share the broker, and each needs its own."""
        return hashlib.sha256(self.database_url.encode()).hexdigest()[:12]

    def masked(self) -> dict[str, str]:
        """Every setting as text, with passwords and tokens hidden."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "**********"
            elif name in ("database_url", "broker_url"):
                text = make_url(value).render_as_string(hide_password=True)
            else:
                text = "" if value is None else str(value)
            shown[f"GEMMA_BATCH_{name.upper()}"] = text
        return shown


@lru_cache
def get_settings() -> Settings:
    return Settings()
