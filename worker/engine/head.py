"""The model's output layer: logits as the model makes them, and greedy picks without them.

On a CPU the vocabulary head is most of a decode step (the 270M's is 262,144 x 640, most of
its weights), and the logits it writes (64 rows: 67 MB) are read once more to pick each row's
token. A greedy row that neither samples, nor reports log-probabilities, nor follows a JSON
schema needs only its pick, so such rows take the head block by block: 4,096 vocabulary
entries at a time, taken as `W @ x.T` (as worker.engine.products turns few rows'), whose
result stays in the processor's cache, keeping each row's best so far. Measured with 2 threads
on an AMD EPYC (AVX2), against the whole product and `max`: 1.9x at 16 rows, 1.6x at 64, 1.5x
at 128, 1.3x at 256; up to 8 rows the whole product, already turned round, was as fast or
faster, so it stays.

A later block takes over a row only with a strictly greater value, so of equal maxima the first
is kept, as `max` keeps it. That the values themselves are the whole product's is not promised
by the matrix library (the two products are laid out differently); it is what the tests and
every benchmark run found, pick for pick.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from worker.engine.products import HEAD_ROWS, FewRowsLinear

BLOCK = 4096


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

    def blocks(self, rows: int) -> bool:
        """Whether `greedy` can take `rows` rows' picks block by block: only on the fp32 CPU
        head the loader sets up (not a quantized one, nor one an adapter wraps), and past the
        rows its whole product serves as fast."""
        layer = self.model.get_output_embeddings()
        return type(layer) is FewRowsLinear and layer.bias is None and rows > HEAD_ROWS

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's most likely token (the first of equal maxima), block by block; for rows
        that `blocks` allows."""
        weight = self.model.get_output_embeddings().weight
        best, index = self._capped(weight[:BLOCK] @ hidden.T).max(dim=0)
        for start in range(BLOCK, weight.shape[0], BLOCK):
            values, at = self._capped(weight[start : start + BLOCK] @ hidden.T).max(dim=0)
            better = values > best
            best = torch.where(better, values, best)
            index = torch.where(better, at + start, index)
        return index

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        # The final soft cap, in the model's dtype, as the causal LM's forward applies it where
        # the config sets one (Gemma 2's; released Gemma 1 and 3 configs set none).
        if self.cap is None:
            return logits
        return torch.tanh(logits / self.cap) * self.cap
