"""The model's output layer: logits as the model makes them, and greedy picks without them.

On a CPU the vocabulary head is most of a decode step (the 270M's is 262,144 x 640, most of
its weights), and the logits it writes (64 rows: 67 MB) are read once more to pick each row's
token. A greedy row that neither samples, nor reports log-probabilities, nor follows a JSON
schema needs only its pick. On the fp32 CPU head the loader sets up, such rows take it one of
two ways, each giving the first of equal maxima, as `max` does.

Screened, where the processor multiplies bf16 natively (AVX-512 BF16 or AMX) and the head has
no soft cap: the loader gives the head a bf16 copy (`add_screen`), whose product finds for each
row the few tokens that can be its maximum; only those are computed again, as fp64 dot products
of the fp32 weights, so the pick is the row's largest fp64 product whatever rows share the step.
Why no maximum is missed: bf16 keeps 8 significant bits (unit roundoff u = 2^-8); rounding the
weight and the hidden state, summing the products in fp32 (as oneDNN's bf16 kernels do) and
rounding the result to bf16 move a logit by at most about 3u * sum |w_i x_i| <= 3u * |w| * |x|
(Cauchy-Schwarz). With REACH = 4u bounding that, a token whose bf16 logit is more than
2 REACH * max|w| * |x| below the row's best cannot be its maximum; of the rest, those whose
bf16 logit plus their own bound (REACH * |w| * |x|) falls short of another's minus its bound
are dropped too. A row the bound cannot serve (a NaN; a hidden state so small that the kernel's
flushing of subnormal numbers matters) or with more than 512 candidates takes its pick from the
whole fp32 logits, as rows without a screen do.
The bf16 logits are searched a block of 4,096 at a time: each block's best first (`amax` over
a block is about five times as fast as `max` over a row), then token by token only in the
blocks that reach a row's floor. Measured with 2 threads on an AMD EPYC with AVX-512 BF16 (the
270M's head, hidden states of real prompts: about 25 candidates a row), against the fp32 ways:
14-17 ms against 17 for one row (the whole product), 52 against 148 for 64 rows (block by
block), 184 against 526 for 256; every pick of 7,170 the same as the whole fp32 logits'.

Block by block elsewhere, past 8 rows: 4,096 vocabulary entries at a time, taken as `W @ x.T`
(as worker.engine.products turns few rows'), whose result stays in the processor's cache,
keeping each row's best so far. Measured with 2 threads on an AMD EPYC (AVX2), against the whole
product and `max`: 1.9x at 16 rows, 1.6x at 64, 1.5x at 128, 1.3x at 256; up to 8 rows the whole
product, already turned round, was as fast or faster, so it stays. A later block takes over a
row only with a strictly greater value. That the values themselves are the whole product's is
not promised by the matrix library (the two products are laid out differently); it is what the
tests and every benchmark run found, pick for pick.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from peft.tuners.lora import LoraLayer

from worker.engine.products import HEAD_ROWS, FewRowsLinear

BLOCK = 4096
# The bound on a bf16 logit's error, in units of |w| * |x| (see above: about 3u is needed).
REACH = 4 * 2.0**-8
# Past this many candidates a row (a hidden state of zeros makes every token one) the row takes
# its pick from the whole fp32 logits instead: its products would cost more than they save
# (real prompts' last positions had about 25, at most a few hundred).
MOST_CANDIDATES = 512
# Candidates' products are taken this many at a time, so their fp64 rows stay small (for the
# 270M: 4,096 x 640 x 8 bytes, 21 MB) however many rows the step has.
AT_ONCE = 4096
# Below this |x| * max|w| the bound is not trusted: bf16 kernels flush subnormal numbers to
# zero, an error no relative bound covers. Such a row takes the whole logits.
SMALLEST = 2.0**-100


def bf16_dot_products() -> bool:
    """Whether this processor multiplies bf16 natively (x86's AVX-512 BF16 or AMX)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


class Screen(NamedTuple):
    """A head's bf16 copy, its rows' lengths (the bound's |w|, in fp64) and the longest."""

    weight: torch.Tensor
    lengths: torch.Tensor
    widest: float

    @classmethod
    def of(cls, weight: torch.Tensor) -> Screen:
        weight = weight.detach()
        # In fp64, a block at a time: an fp32 length can round down, or underflow to zero.
        lengths = torch.cat(
            [
                weight[start : start + AT_ONCE].double().norm(dim=1)
                for start in range(0, len(weight), AT_ONCE)
            ]
        )
        return cls(weight.bfloat16(), lengths, lengths.max().item())


def add_screen(model: Any) -> None:
    """Give the fp32 CPU head the loader set up a bf16 copy that greedy picks are screened
    through, where the processor multiplies bf16 natively and the head has no soft cap (tanh
    can make tokens far apart equal, which the bound does not see). It costs the head's size
    again at half its width (the 270M: 335 MB)."""
    layer = model.get_output_embeddings()
    capped = Head(model).cap is not None
    if type(layer) is FewRowsLinear and layer.bias is None and not capped and bf16_dot_products():
        layer.screen = Screen.of(layer.weight)


class Head:
    """The output layer of `model` (looked up at each use: an adapter may wrap it)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        text = getattr(model.config, "text_config", None) or model.config
        self.cap: float | None = getattr(text, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows' logits from their last hidden states, as the model's forward makes them
        (soft-capped where its config caps them), in fp32."""
        return self._capped(self.model.get_output_embeddings()(hidden)).float()

    def adapted(self) -> bool:
        """Whether an adapter wraps the head (then each row's adapter applies to it too)."""
        return isinstance(self.model.get_output_embeddings(), LoraLayer)

    def picks(self, rows: int) -> bool:
        """Whether `greedy` can take `rows` rows' picks without their whole logits: only on the
        fp32 CPU head the loader sets up (not a quantized one, nor one an adapter wraps), through
        its screen where it has one, else block by block past the rows its whole product serves
        as fast."""
        layer = self.model.get_output_embeddings()
        if type(layer) is not FewRowsLinear or layer.bias is not None:
            return False
        return getattr(layer, "screen", None) is not None or rows > HEAD_ROWS

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's most likely token (the first of equal maxima); for rows that `picks`
        allows."""
        layer = self.model.get_output_embeddings()
        screen = getattr(layer, "screen", None)
        if screen is None:
            return self._blocks(layer.weight, hidden)
        return self._screened(layer.weight, screen, hidden)

    def _blocks(self, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        best, index = self._capped(weight[:BLOCK] @ hidden.T).max(dim=0)
        for start in range(BLOCK, weight.shape[0], BLOCK):
            values, at = self._capped(weight[start : start + BLOCK] @ hidden.T).max(dim=0)
            better = values > best
            best = torch.where(better, values, best)
            index = torch.where(better, at + start, index)
        return index

    def _screened(self, weight: torch.Tensor, screen: Screen, hidden: torch.Tensor) -> torch.Tensor:
        rough = hidden.bfloat16() @ screen.weight.T
        wide = hidden.double()
        size = wide.norm(dim=1)
        reach = REACH * screen.widest * size
        rows, tokens = _within(rough, 2 * reach)
        # That margin takes the longest weight row's bound for every token; with each candidate's
        # own, fewer stay: those whose best case reaches the best worst case of the row.
        value, own = rough[rows, tokens].double(), REACH * screen.lengths[tokens] * size[rows]
        lowest = wide.new_full((len(hidden),), -torch.inf)
        lowest = lowest.scatter_reduce(0, rows, value - own, "amax")
        near = value + own >= lowest[rows] - (lowest[rows].abs() * 2.0**-40)
        rows, tokens = rows[near], tokens[near]
        # No candidate (a NaN in the row), too many, or a bound not trusted: the row's pick comes
        # from its whole fp32 logits, as without a screen.
        per_row = torch.bincount(rows, minlength=len(hidden))
        odd = (per_row == 0) | (per_row > MOST_CANDIDATES) | ~(reach >= REACH * SMALLEST)
        if odd.any():
            kept = ~odd[rows]
            rows, tokens = rows[kept], tokens[kept]
        exact = wide.new_empty(len(rows))
        for start in range(0, len(rows), AT_ONCE):
            part = slice(start, start + AT_ONCE)
            exact[part] = (weight[tokens[part]].double() * wide[rows[part]]).sum(dim=1)
        best = wide.new_full((len(hidden),), -torch.inf).scatter_reduce(0, rows, exact, "amax")
        top = exact == best[rows]
        first = torch.full((len(hidden),), weight.shape[0]).scatter_reduce(
            0, rows[top], tokens[top], "amin"
        )
        if odd.any():
            first[odd] = self.logits(hidden[odd]).max(dim=1).indices
        return first

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        # The final soft cap, in the model's dtype, as the causal LM's forward applies it where
        # the config sets one (Gemma 2's; released Gemma 1 and 3 configs set none).
        if self.cap is None:
            return logits
        return torch.tanh(logits / self.cap) * self.cap


def _within(rough: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token) places whose `rough` logit is within a row's `margin` (fp64) of the row's
    largest. Each block's best first (amax over a block is 5 times as fast as max over a row):
    only the blocks that reach a row's floor are searched token by token."""
    count, vocab = rough.shape
    whole = vocab - vocab % BLOCK
    peaks = rough[:, :whole].view(count, -1, BLOCK).amax(dim=2)
    if whole < vocab:
        peaks = torch.cat([peaks, rough[:, whole:].amax(dim=1, keepdim=True)], dim=1)
    floor = peaks.max(dim=1).values.double() - margin
    # Compared in bf16, the floor rounded down: lowered by more than its rounding can raise it.
    floor = (floor - floor.abs() * 2.0**-7).bfloat16()
    rows, blocks = (peaks >= floor[:, None]).nonzero(as_tuple=True)
    places = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).clamp(max=vocab - 1)
    found, at = (rough[rows[:, None], places] >= floor[rows, None]).nonzero(as_tuple=True)
    # A partial last block's clamped places repeat its last token: each is kept once.
    rows, tokens = rows[found], places[found, at]
    unique = (at == 0) | (tokens != vocab - 1) | (places[found, at - 1] != vocab - 1)
    return rows[unique], tokens[unique]
