"""Quantization on the CPU: each mode a CPU runs, against fp32, on the real Gemma 3 270M.

Side by side in one run, the modes taking turns round after round so that a busy moment on a
shared machine hits every mode; each mode's best round counts:
- decode tokens/s at batch 1 and batch 16 through the worker's batcher (`model check-quant`'s
  greedy prompts, 16 decoding steps each, end tokens ignored, prefill not timed);
- label mode items/s: 64 reviews through `Engine.run` with the demo's prefix, template and labels.

    .venv/bin/python -m bench.quant_cpu [--modes none,bf16,int8-wo,int8,nf4] [--rounds 3]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from bench.common import console, model_path
from bench.reviews import reviews
from gemma_batch.cli.demo import LABELS, TEMPLATE, fewshot
from gemma_batch.domain.params import JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.batcher import Batcher, Row
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.quality import fixed_text, greedy_prompts

# int4-wo and fp8 are refused on a CPU: torchao has no CPU kernels for them.
MODES = ("none", "bf16", "int8-wo", "int8", "nf4")
STEPS, REVIEWS = 16, 64
MEASURES = ("batch 1 tok/s", "batch 16 tok/s", "label items/s")


@torch.inference_mode()
def decode_rate(model: Any, tokenizer: Any, prompts: list[str]) -> float:
    """Tokens/s of STEPS decoding steps with every prompt in the batch; prefill is not timed."""
    # No stop ids: every row runs all its steps.
    batcher = Batcher(model, [], 10**9, len(prompts), lambda tokens: "")
    budget = STEPS + 1  # admit picks the first token; the steps make the rest
    batcher.admit(
        [Row(key=i, ids=tokenizer(p)["input_ids"], budget=budget) for i, p in enumerate(prompts)]
    )
    started = time.perf_counter()
    while batcher.rows:
        batcher.step()
    return len(prompts) * STEPS / (time.perf_counter() - started)


def label_rate(model: Any, tokenizer: Any, items: list[WorkItem], spec: JobSpec) -> float:
    # A fresh engine each round, so every round computes the shared prefix once, as a job does
    # on a fresh worker (an engine keeps the prefixes it has seen).
    engine = Engine(model, tokenizer, batch_tokens=16384)
    started = time.perf_counter()
    for _ in engine.run(items, spec):
        pass
    return len(items) / (time.perf_counter() - started)


def print_ratios(best: dict[str, dict[str, float]], rounds: int) -> None:
    table = Table(title=f"Quantization on the CPU, Gemma 3 270M: best of {rounds} rounds")
    table.add_column("mode")
    for measure in MEASURES:
        table.add_column(measure)
        table.add_column("× fp32")
    for mode, rates in best.items():
        cells = [(f"{rates[m]:.1f}", f"{rates[m] / best['none'][m]:.2f}") for m in MEASURES]
        table.add_row(mode, *(cell for pair in cells for cell in pair))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}; none is always run"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {', '.join(unknown)}; choose from {', '.join(MODES)}")
    # fp32 is the baseline every ratio is taken to.
    modes = ["none", *(m for m in args.modes.split(",") if m != "none")]
    torch.set_num_threads(2)
    # bitsandbytes' int8 warns of its fp16 cast at every matmul: thousands of lines a round.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    loaded = {mode: load_model(model_path(), mode, "cpu") for mode in modes}
    prompts = greedy_prompts(fixed_text())
    rows = reviews(REVIEWS)
    items = [WorkItem(i, TEMPLATE.format(text=row["text"]), None) for i, row in enumerate(rows)]
    spec = JobSpec(prefix=fewshot(), choices=list(LABELS))
    for model, tokenizer in loaded.values():  # first calls allocate and pick kernels
        decode_rate(model, tokenizer, prompts[:16])
    figures: dict[str, dict[str, list[float]]] = {m: {k: [] for k in MEASURES} for m in modes}
    for number in range(1, args.rounds + 1):
        for mode, (model, tokenizer) in loaded.items():
            rates = (
                decode_rate(model, tokenizer, prompts[:1]),
                decode_rate(model, tokenizer, prompts[:16]),
                label_rate(model, tokenizer, items, spec),
            )
            for measure, rate in zip(MEASURES, rates, strict=True):
                figures[mode][measure].append(rate)
            said = ", ".join(f"{m} {r:.1f}" for m, r in zip(MEASURES, rates, strict=True))
            console.print(f"round {number}, {mode}: {said}")
    best = {mode: {m: max(rates) for m, rates in runs.items()} for mode, runs in figures.items()}
    print_ratios(best, args.rounds)
    if args.out:
        args.out.write_text(json.dumps({"rounds": figures, "best": best}, indent=1))


if __name__ == "__main__":
    main()
