"""W2 label: a few hundred short reviews, a shared two-shot prefix, two labels.

Peers, side by side in one run on the real Gemma 3 270M:
- gemma-batch's label mode (exact choice probabilities, shared prefix computed once), fp32 and nf4;
- one batched fp32 forward per micro-batch over the full prompts, without prefix reuse,
  taking the next-token logits of the two labels;
- llama.cpp (llama-cpp-python, the same GGUF file, 2 threads), greedy 3 tokens per review,
  reusing the shared prefix between calls.

    .venv/bin/python -m bench.w2_label [--items 300] [--runs 3]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import Row, console, gguf_path, model_path, print_table, timed
from bench.reviews import reviews
from gemma_batch.cli.demo import TEMPLATE, fewshot
from gemma_batch.domain.params import JobSpec
from gemma_batch.domain.records import WorkItem
from worker.engine.engine import Engine
from worker.engine.loader import load_model

LABELS = ["positive", "negative"]


def accuracy(predicted: list[str], rows: list[dict[str, str]]) -> str:
    right = sum(p == row["sentiment"] for p, row in zip(predicted, rows, strict=True))
    return f"accuracy {right}/{len(rows)}"


def gemma_batch_label(quantization: str, rows: list[dict[str, str]], runs: int) -> Row:
    model, tokenizer = load_model(model_path(), quantization, "cpu")
    engine = Engine(model, tokenizer, batch_tokens=16384)
    items = [WorkItem(i, TEMPLATE.format(text=row["text"]), None) for i, row in enumerate(rows)]
    spec = JobSpec(prefix=fewshot(), choices=LABELS)
    row = Row(f"gemma-batch label ({quantization})", len(rows))
    results = timed(row, runs, lambda: [r for b in engine.run(items, spec) for r in b])
    labels = [r.label for r in sorted(results, key=lambda r: r.index)]  # type: ignore[union-attr]
    row.note = accuracy(labels, rows)
    return row


def padded_forward(rows: list[dict[str, str]], runs: int, batch: int = 32) -> Row:
    model, tokenizer = load_model(model_path(), "none", "cpu")
    prompts = [fewshot() + TEMPLATE.format(text=row["text"]) for row in rows]
    first = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS]

    @torch.inference_mode()
    def run() -> list[str]:
        labels = []
        for start in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[start : start + batch], padding=True, return_tensors="pt")
            logits = model(**inputs, logits_to_keep=1).logits[:, -1, first]
            labels += [LABELS[i] for i in logits.argmax(-1).tolist()]
        return labels

    row = Row("padded fp32 forward, no prefix reuse", len(rows))
    row.note = accuracy(timed(row, runs, run), rows)  # type: ignore[arg-type]
    return row


def llama_cpp(rows: list[dict[str, str]], runs: int) -> Row | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        console.print("llama-cpp-python is not installed (pip install '.[bench]'): skipping it")
        return None
    llm = Llama(str(gguf_path()), n_threads=2, n_ctx=1024, verbose=False)
    prompts = [fewshot() + TEMPLATE.format(text=row["text"]) for row in rows]

    def run() -> list[str]:
        said = [llm(p, max_tokens=3, temperature=0.0)["choices"][0]["text"] for p in prompts]
        return [text.strip().split()[0] if text.strip() else "" for text in said]

    row = Row("llama.cpp greedy 3 tokens (2 threads)", len(rows))
    row.note = accuracy(timed(row, runs, run), rows)  # type: ignore[arg-type]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = reviews(args.items)
    results = [
        gemma_batch_label("none", data, args.runs),
        gemma_batch_label("nf4", data, args.runs),
        padded_forward(data, args.runs),
    ]
    results += [row for row in [llama_cpp(data, args.runs)] if row]
    baseline = results[-1].name if len(results) == 4 else results[2].name
    print_table(
        f"W2 label: {args.items} reviews, 2 labels, shared two-shot prefix", results, baseline
    )


if __name__ == "__main__":
    main()
