"""W3 mixed lengths: 256 prompts asking for 1 to 128 new tokens each, EOS honoured.

Where padding-based batching wastes most: a padded batch runs until its longest request ends.
- gemma-batch's engine: continuous batching, a row leaves at its own end and a waiting one
  takes its slot;
- transformers' continuous batching (ContinuousBatchingManager), each request its own budget;
- plain padded `generate`, batches of 64 in submission order, each cut to its rows' budgets;
- llama.cpp (llama-cpp-python, the same GGUF, 2 threads), one prompt at a time.

    .venv/bin/python -m bench.w3_mixed [--runs 1] [--no-llama]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import (
    Row,
    console,
    gguf_path,
    matmul_peak,
    model_path,
    print_table,
    timed,
    transformers_cb,
    workload_flops,
)
from bench.prompts import lengths, prompts
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.engine import Engine
from worker.engine.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-llama", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts, budgets = prompts(args.items), lengths(args.items)
    model, tokenizer = load_model(model_path(), "none", "cpu")
    rows: list[Row] = []

    engine = Engine(model, tokenizer, batch_tokens=16384)
    items = [
        WorkItem(i, text, None, {"max_new_tokens": n})
        for i, (text, n) in enumerate(zip(texts, budgets, strict=True))
    ]
    spec = JobSpec(params=GenerationParams(max_new_tokens=max(budgets)))
    row = Row("gemma-batch engine (fp32)", args.items)
    results = timed(row, args.runs, lambda: [r for b in engine.run(items, spec) for r in b])
    row.tokens = sum(r.completion_tokens or 0 for r in results)  # type: ignore[union-attr]
    rows.append(row)
    made = {r.index: r.completion_tokens or 0 for r in results}  # type: ignore[union-attr]

    ids = [tokenizer(text)["input_ids"] for text in texts]
    row = Row("transformers continuous batching (fp32)", args.items)
    row.tokens = timed(row, 1, lambda: transformers_cb(model, ids, budgets, tokenizer.eos_token_id))  # type: ignore[assignment]
    rows.append(row)

    @torch.inference_mode()
    def padded() -> int:
        made = 0
        for start in range(0, len(texts), 64):
            batch, wanted = texts[start : start + 64], budgets[start : start + 64]
            inputs = tokenizer(batch, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max(wanted), do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            for tokens, n in zip(new.tolist(), wanted, strict=True):
                kept = tokens[:n]
                made += next(
                    (i + 1 for i, t in enumerate(kept) if t == tokenizer.eos_token_id), len(kept)
                )
        return made

    row = Row("padded generate, batches of 64 (fp32)", args.items)
    row.tokens = timed(row, args.runs, padded)  # type: ignore[assignment]
    rows.append(row)

    if not args.no_llama:
        try:
            from llama_cpp import Llama
        except ImportError:
            console.print("llama-cpp-python is not installed (pip install '.[bench]'): skipping it")
        else:
            llm = Llama(str(gguf_path()), n_threads=2, n_ctx=512, verbose=False)

            def llama() -> int:
                made = 0
                for text, n in zip(texts, budgets, strict=True):
                    made += llm(text, max_tokens=n, temperature=0.0)["usage"]["completion_tokens"]
                    llm.reset()
                return made

            row = Row("llama.cpp one at a time (2 threads)", args.items)
            row.tokens = timed(row, args.runs, llama)  # type: ignore[assignment]
            rows.append(row)
    print_table(
        f"W3 mixed lengths: {args.items} prompts, 1-128 new tokens, EOS honoured",
        rows,
        rows[2].name,
        workload_flops(model, [len(i) for i in ids], [made[i] for i in range(len(ids))]),
        matmul_peak(),
    )


if __name__ == "__main__":
    main()
