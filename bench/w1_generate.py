"""W1 generate: 64 prompts of 10-45 words, 16 new tokens each, greedy, EOS ignored.

Every system does the same work (EOS is ignored, so each makes exactly 16 tokens a prompt):
- gemma-batch's engine (continuous batching in a slot cache), fp32, and in bf16
  (`GEMMA_BATCH_QUANTIZATION=bf16`: fast on CPUs with AMX; `--no-bf16` leaves it out), its share
  of the bf16 peak noted;
- transformers' continuous batching (ContinuousBatchingManager, paged attention), fp32;
- one plain padded `generate` over all 64 prompts, fp32;
- one `generate` per prompt, the pattern of the Gemma launch post, fp32;
- llama.cpp (llama-cpp-python, the same GGUF, 2 threads), one prompt at a time.

    .venv/bin/python -m bench.w1_generate [--runs 3] [--no-bf16]
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
from bench.prompts import prompts
from gemma_batch.domain.params import GenerationParams, JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.engine import Engine
from worker.engine.loader import load_model

NEW = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 engine")
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts = prompts(args.items)
    model, tokenizer = load_model(model_path(), "none", "cpu")
    tokens = args.items * NEW
    rows: list[Row] = []

    items = [WorkItem(i, text, None) for i, text in enumerate(texts)]
    spec = JobSpec(params=GenerationParams(max_new_tokens=NEW))
    rows.append(engine_row("fp32", model, tokenizer, items, spec, args.runs))
    bf16 = None
    if not args.no_bf16:
        # oneDNN builds a bf16 kernel per matrix shape the first time it meets it: one run first.
        bf16_model, _ = load_model(model_path(), "bf16", "cpu")
        bf16 = engine_row("bf16", bf16_model, tokenizer, items, spec, args.runs, warm_up=True)
        rows.append(bf16)

    ids = [tokenizer(text)["input_ids"] for text in texts]
    row = Row("transformers continuous batching (fp32)", args.items, tokens=tokens)
    timed(row, 1, lambda: transformers_cb(model, ids, [NEW] * len(ids), -1))
    rows.append(row)

    @torch.inference_mode()
    def padded() -> None:
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)

    row = Row("padded generate, batch of all (fp32)", args.items, tokens=tokens)
    timed(row, args.runs, padded)
    rows.append(row)

    @torch.inference_mode()
    def one_by_one() -> None:
        for text in texts:
            inputs = tokenizer(text, return_tensors="pt")
            model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)

    row = Row("one generate per prompt (fp32)", args.items, tokens=tokens)
    timed(row, 1, one_by_one)
    rows.append(row)

    try:
        from llama_cpp import Llama
    except ImportError:
        console.print("llama-cpp-python is not installed (pip install '.[bench]'): skipping it")
    else:
        llm = Llama(str(gguf_path()), n_threads=2, n_ctx=512, verbose=False)

        def llama() -> None:
            for text in texts:
                llm(text, max_tokens=NEW, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
                llm.reset()

        row = Row("llama.cpp one at a time (2 threads)", args.items, tokens=tokens)
        timed(row, args.runs, llama)
        rows.append(row)
    flops = workload_flops(model, [len(i) for i in ids], [NEW] * len(ids))
    if bf16:
        bf16_peak = matmul_peak(torch.bfloat16)
        bf16.note = f"{flops / bf16.median / bf16_peak:.0%} of the bf16 peak"
    title = f"W1 generate: {args.items} prompts x {NEW} tokens"
    print_table(title, rows, rows[-1].name, flops, matmul_peak())
    if bf16:
        console.print(
            f"this machine's bf16 matmul peak, measured in this run: {bf16_peak / 1e9:.0f} GFLOP/s"
        )


def engine_row(
    precision: str,
    model: object,
    tokenizer: object,
    items: list[WorkItem],
    spec: JobSpec,
    runs: int,
    warm_up: bool = False,
) -> Row:
    """The worker's engine over every item in one call, `runs` times (after one untimed run
    with `warm_up`)."""
    engine = Engine(model, tokenizer, batch_tokens=16384)
    # EOS ignored: every system makes the same number of tokens.
    engine.stop_ids, engine.batcher.stop_ids = [], set()

    def work() -> list[object]:
        return [r for b in engine.run(items, spec) for r in b]

    if warm_up:
        work()
    row = Row(f"gemma-batch engine ({precision})", len(items), tokens=len(items) * NEW)
    timed(row, runs, work)
    return row


if __name__ == "__main__":
    main()
