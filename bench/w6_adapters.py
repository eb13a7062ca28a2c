"""W6 adapters: W1's prompts (64 x 16 new tokens, greedy, EOS ignored) over the base and three
LoRA adapters in one job mix, against the base alone.

Every run makes the same tokens; what differs is which rows carry an adapter:
- the base alone (no adapter loaded: the plain model);
- every row on one adapter (the cost of LoRA itself: its extra matmuls);
- the mix in one batch: a quarter of the rows each on the base and on three adapters (PEFT's
  mixed-adapter batches: each adapter's rows run as a sub-batch in every LoRA layer);
- the mix served naively: one adapter's rows at a time, each a batch of its own.

Runs alternate, round by round. Adapters are rank 16 on every linear layer of the 270M (q, k,
v, o, gate, up, down), as QLoRA recipes train them, with random weights (the time does not
depend on what they learned).

    .venv/bin/python -m bench.w6_adapters [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.common import Row, matmul_peak, model_path, print_table, timed, workload_flops
from bench.prompts import prompts
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.engine import Engine
from worker.engine.loader import load_model

NEW = 16
ADAPTERS = ["first", "second", "third"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, folder: Path) -> None:
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts = prompts(args.items)
    base = model_path()
    folder = Path(tempfile.mkdtemp(prefix="gemma-batch-w6-"))
    make_adapters(base, folder)
    model, tokenizer = load_model(base, "none", "cpu")
    engine = Engine(model, tokenizer, batch_tokens=16384, adapter_dir=folder)
    # EOS ignored: every run makes the same number of tokens.
    engine.stop_ids, engine.batcher.stop_ids = [], set()
    items = [WorkItem(i, text, None) for i, text in enumerate(texts)]
    params = GenerationParams(max_new_tokens=NEW)
    mix = [None, *ADAPTERS]

    def run(adapters: list[str | None], only: str | None = "all") -> None:
        """Item i with adapters[i % len(adapters)] (only those with adapter `only`, unless
        "all"), in one running batch."""
        assigned = [(item, adapters[i % len(adapters)]) for i, item in enumerate(items)]
        rows = [
            engine.prepare(item, JobSpec(params=params, adapter=adapter))
            for item, adapter in assigned
            if only == "all" or adapter == only
        ]
        for _ in engine.generate(rows):
            pass

    def one_adapter_at_a_time() -> None:
        for adapter in mix:
            run(mix, only=adapter)

    tokens = args.items * NEW
    runs = [
        ("base alone", lambda: run([None])),
        ("every row on one adapter", lambda: run(["first"])),
        ("base + 3 adapters mixed in one batch", lambda: run(mix)),
        ("base + 3 adapters, one adapter's rows at a time", one_adapter_at_a_time),
    ]
    rows = [Row(name, args.items, tokens=tokens) for name, _ in runs]
    for _, work in runs:
        work()  # warm: loads the adapters, sizes the cache
    # Round by round, each system once a round: a machine whose speed drifts (shared cores)
    # shifts every system alike.
    for _ in range(args.runs):
        for row, (_, work) in zip(rows, runs, strict=True):
            timed(row, 1, work)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    flops = workload_flops(model, [len(i) for i in ids], [NEW] * len(ids))
    title = f"W6 adapters: {args.items} prompts x {NEW} tokens, rank-16 LoRA on every linear layer"
    print_table(title, rows, rows[0].name, flops, matmul_peak())


if __name__ == "__main__":
    main()
