"""`gemma-batch model check-quant`: does a quantization keep the model's quality on this device?"""

from __future__ import annotations

from typing import Annotated, get_args

import typer
from rich.console import Console
from rich.table import Table

from gemma_batch.cli.demo import LABELS, TEMPLATE, fewshot, sample_rows
from gemma_batch.errors import AppError
from gemma_batch.models.cache import get_prepared
from gemma_batch.settings import Settings, get_settings

console = Console()
progress = Console(stderr=True, log_path=False)
MODES = get_args(Settings.model_fields["quantization"].annotation)


def register(model_app: typer.Typer) -> None:
    model_app.command("check-quant")(check_quant)


def check_quant(
    name: Annotated[str, typer.Argument(help="A prepared model.")],
    mode: Annotated[str, typer.Option(help=f"Quantization to judge: {', '.join(MODES)}.")],
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: settings).")] = None,
) -> None:
    """Perplexity, label accuracy and greedy agreement of MODE against the unquantized model.

    Exits 1 unless perplexity is within 2% and no fewer demo reviews are labelled right.
    """
    if mode not in MODES:
        raise AppError(f"unknown quantization '{mode}'; choose one of {', '.join(MODES)}")
    settings = get_settings()
    path = get_prepared(settings.model_dir, name).path
    # Only worker.engine imports torch: loaded here, so the CLI starts without it.
    from worker.engine.loader import check_supported, resolve_device, resolve_quantization
    from worker.engine.quality import Labelling, judge, measure

    chosen = resolve_device(device or settings.device)
    check_supported(resolve_quantization(mode, chosen, path), chosen)  # before minutes of work
    task = Labelling(sample_rows(), TEMPLATE, fewshot(), LABELS, "sentiment")
    with progress.status("") as status:

        def step(what: str) -> None:
            status.update(f"{name}: {what}…")
            progress.log(what)

        base = measure(path, "none", chosen, task, step)
        quantized = measure(path, mode, chosen, task, step)
    verdict = judge(base, quantized)
    table = Table("measure", "none", mode, "change", title=f"{name} on {chosen}")
    table.add_row(
        "perplexity", f"{base.perplexity:.3f}", f"{quantized.perplexity:.3f}",
        f"{verdict.perplexity_change:+.2%}",
    )  # fmt: skip
    table.add_row(
        "label accuracy", f"{base.right}/{base.total}", f"{quantized.right}/{quantized.total}",
        f"{quantized.right - base.right:+d}",
    )  # fmt: skip
    table.add_row("greedy 16 tokens identical", "", f"{verdict.identical:.3f}", "")
    table.add_row("greedy agreeing prefix (mean)", "", f"{verdict.mean_prefix:.2f}", "")
    console.print(table)
    if not verdict.passes:
        console.print(f"{mode} fails the bar (perplexity within 2%, label accuracy kept)")
        raise typer.Exit(1)
    console.print(f"{mode} passes the bar (perplexity within 2%, label accuracy kept)")
