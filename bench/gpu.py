"""GPU figures on gemma-2b and gemma-7b shapes with random weights (a GPU box may have no hub).

For each model and precision, side by side:
- `batcher`: the worker's own continuous batcher (worker.engine.batcher), all rows joining at once,
  reading its tokens back every 8 decode steps on a GPU (STEPS_PER_READ), and `batcher-each-step`,
  the same reading them after every step, to show what the windows are worth;
- `eager` and `static`: transformers' `generate` with a dynamic cache, and with the static cache
  it compiles on CUDA (torch.compile, CUDA graphs), rows padded to a few fixed shapes;
decode step time at batch 1 against the HBM roofline (weight bytes / measured copy bandwidth: at
batch 1 every step reads every weight once), and output tokens/s at batch 1 to 256 (64-token
prompts, 128 new tokens, EOS ignored).
Each quantization (nf4 and int8 through bitsandbytes; int8-wo, int4-wo and fp8 through torchao)
goes through the worker's own loader from a saved copy of the bf16 weights, and is measured at
batch 1, 64 and 256 beside bf16, with the GPU memory its weights take and the peak of its runs; a
mode the card has no kernels for is reported as skipped, with the loader's reason.

    python -m bench.gpu [--archs gemma-2b,gemma-7b] [--precisions bf16,int8-wo,...] [--budget S]
                        [--out FILE]
    python -m bench.gpu --archs gemma-2b --profile   # where a batch-1 step's time goes

`--archs gemma-tiny` runs the whole script in seconds, on the CPU too, to check it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import torch
from transformers import GemmaConfig, GemmaForCausalLM

from gemma_batch.settings import Settings
from worker.engine.batcher import Batcher, Row
from worker.engine.loader import gpu_memory_bytes, load_weights
from worker.quantization import UnsupportedQuantization

ARCHS: dict[str, dict[str, int]] = {
    "gemma-2b": {
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
    },
    "gemma-7b": {
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    "gemma-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
}
PROMPT, NEW = 64, 128
SWEEP = (8, 32, 64, 128, 256)  # batch 1 is measured eager and static first
QUANT_SWEEP = (64, 256)  # a quantization against bf16 where batches are large enough to matter
# What --precisions accepts: bf16 (fp32 on a CPU), and every quantization the worker loads.
PRECISIONS = ("bf16", *(m for m in get_args(Settings.model_fields["quantization"].annotation)
                        if m not in ("auto", "none", "bf16")))  # fmt: skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    size = 2**31 if device == "cuda" else 2**26
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    return 2 * size * 10 / (time.perf_counter() - started)


def build(arch: str, device: str) -> Any:
    config = GemmaConfig(
        **ARCHS[arch],
        head_dim=256 if arch != "gemma-tiny" else 32,
        vocab_size=256000,
        max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = GemmaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def gigabytes(size: int | None) -> float | None:
    return None if size is None else round(size / 1e9, 2)


def weight_bytes(model: Any) -> int:
    # Embeddings are tied to the output layer: counted once, as they are read once a step.
    return sum(p.numel() * p.element_size() for p in model.parameters())


ROW_BUCKETS = (1, 8, 32, 64, 128, 256)
LENGTH_BUCKETS = (256, 1024, 4096, 8192)


def generate(model: Any, ids: torch.Tensor, new: int, static: bool) -> torch.Tensor:
    """transformers' `generate`; with `static`, rows and cache padded to a fixed shape, so the
    graphs compiled for one batch are reused by the next."""
    rows, width = ids.shape
    mask = torch.ones_like(ids)
    kwargs: dict[str, Any] = {}
    if static:
        padded = next(b for b in ROW_BUCKETS if b >= rows)
        ids = torch.cat([ids, ids[:1].expand(padded - rows, -1)])
        mask = torch.ones_like(ids)
        cache = next(b for b in LENGTH_BUCKETS if b >= width + new)
        kwargs = {"cache_implementation": "static", "max_cache_len": cache}
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, **kwargs,
    )  # fmt: skip
    return out[:rows, width:]


def batched(model: Any, ids: torch.Tensor, new: int, each_step: bool) -> torch.Tensor:
    """The worker's continuous batcher, every row joining at once and running its budget; with
    `each_step`, its tokens read back after every decode step."""
    batcher = Batcher(model, [], 10**9, ids.shape[0], lambda tokens: "")
    if each_step:
        batcher.steps_per_read = 1
    done = batcher.admit([Row(key=i, ids=row, budget=new) for i, row in enumerate(ids.tolist())])
    while batcher.rows:
        done += batcher.step()
    return torch.tensor([row.tokens for row in done])


def timed(model: Any, rows: int, new: int, mode: str) -> float:
    ids = torch.randint(10, 250000, (rows, PROMPT), device=model.device)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        if mode.startswith("batcher"):
            out = batched(model, ids, new, each_step=mode == "batcher-each-step")
        else:
            out = generate(model, ids, new, static=mode == "static")
    sync()
    assert out.shape == (rows, new)
    return time.perf_counter() - started


def measure(model: Any, rows: int, mode: str) -> dict[str, Any]:
    """Output tokens/s of a whole batch and the time of one decoding step (prefill taken off)."""
    timed(model, rows, NEW, mode)  # compiles or captures this shape
    timed(model, rows, 1, mode)
    whole = min(timed(model, rows, NEW, mode) for _ in range(2))
    prefill = min(timed(model, rows, 1, mode) for _ in range(2))
    return {
        "mode": mode,
        "rows": rows,
        "tok_s": rows * NEW / whole,
        "step_ms": 1000 * (whole - prefill) / (NEW - 1),
    }


class Report:
    def __init__(self, out: Path | None, budget: float) -> None:
        self.out, self.deadline, self.rows = out, time.monotonic() + budget, []

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            self.out.write_text(json.dumps(self.rows, indent=1))


def run_model(
    model: Any, name: str, precision: str, bandwidth: float, report: Report, sweep: tuple[int, ...]
) -> None:
    size = weight_bytes(model)
    roofline = bandwidth / size
    # Quantized tensors may report their logical size; the memory torch holds is the real one.
    common = {
        "model": name, "precision": precision, "weights_gb": round(size / 1e9, 2),
        "memory_gb": gigabytes(gpu_memory_bytes()),
    }  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for mode in ("batcher", "batcher-each-step", "eager", "static"):
        one = measure(model, 1, mode)
        report.add(
            **common,
            **one,
            roofline_tok_s=round(roofline, 1),
            of_roofline=round(1000 / one["step_ms"] / roofline, 3),
        )
    for rows in sweep:
        if not report.time_left():
            report.add(**common, rows=rows, skipped="time budget")
            continue
        for mode in ("batcher", "batcher-each-step", "static"):
            report.add(**common, **measure(model, rows, mode))
    report.add(
        **common,
        graphs_compiled=torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles,
        peak_memory_gb=gigabytes(torch.cuda.max_memory_allocated())
        if torch.cuda.is_available()
        else None,
    )


def run_quantized(
    folder: Path, device: str, arch: str, precisions: list[str], bandwidth: float, report: Report
) -> None:
    """Each quantization, loaded by the worker's loader from the saved weights, one at a time."""
    for precision in precisions:
        if not report.time_left():
            report.add(model=arch, precision=precision, skipped="time budget")
            continue
        try:
            model = load_weights(folder, precision, device)
        except UnsupportedQuantization as exc:
            report.add(model=arch, precision=precision, skipped=exc.message)
            continue
        run_model(model, arch, precision, bandwidth, report, QUANT_SWEEP)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def profile(model: Any) -> None:
    """Where a batch-1 compiled decode spends its time: host-side ops and GPU kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    measure(model, 1, "static")  # compiled and captured first
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profiler(activities=activities) as prof:
        timed(model, 1, NEW, "static")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    print(averages.table(sort_by="self_device_time_total", row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="gemma-2b,gemma-7b")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help=f"of {', '.join(PRECISIONS)}"
    )
    parser.add_argument("--budget", type=float, default=480, help="seconds before sweeps stop")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", action="store_true", help="profile batch-1 decoding only")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(
            f"unknown precisions {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.profile:
        profile(build(args.archs.split(",")[0], device))
        return
    report = Report(args.out, args.budget)
    bandwidth = copy_bandwidth(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report.add(device=card, torch=torch.__version__, copy_gb_s=round(bandwidth / 1e9, 1))
    for arch in args.archs.split(","):
        if not report.time_left():
            report.add(model=arch, skipped="time budget")
            continue
        model = build(arch, device)
        if "bf16" in precisions:
            run_model(model, arch, "bf16" if device == "cuda" else "fp32", bandwidth, report, SWEEP)
        quantized = [p for p in precisions if p != "bf16"]
        with tempfile.TemporaryDirectory() as folder:
            if quantized:
                model.save_pretrained(folder)
            # The bf16 copy goes before any quantization loads: each mode's memory is its own.
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            run_quantized(Path(folder), device, arch, quantized, bandwidth, report)


if __name__ == "__main__":
    main()
