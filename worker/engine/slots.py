"""A KV cache of row slots for continuous batching, and the masks that go with it.

Every layer keeps one buffer of `slots` rows by `width` columns. Rows are right-aligned at a
shared column: the decode step writes every running row's new token into the same column, so
one forward pass serves them all, while each row starts at a column of its own (its first
prompt token) and attends only from there. A row that joins has its prompt written so that it
ends where the running rows' last token is; a row that leaves frees its slot at once (the last
running row moves into it, so running rows stay in slots 0..n-1 and their buffers are views,
never copies). Positions (RoPE) are per row and independent of columns, so a row's output does
not depend on where, or beside whom, it sits.

The masks are built here and handed to the model as it takes them (a dict by layer type for
Gemma 2 and 3, whose sliding-window layers see only the last `sliding_window` positions).
"""

from __future__ import annotations

from typing import Any

import torch


class SlotCache:
    """K/V buffers of `slots` rows x `width` columns per layer, rows right-aligned at `end`.

    `end` is the column after the running rows' last token; `starts[s]` is slot s's first
    column. The model calls `update` once per layer; what it writes is set by `writing`.
    """

    def __init__(self, config: Any, slots: int, width: int, device: Any, dtype: Any) -> None:
        text = getattr(config, "text_config", None) or config
        shape = (slots, text.num_key_value_heads, width, text.head_dim)
        layers = text.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.slots, self.width = slots, width
        self.starts = [0] * slots
        self.end = 0
        self._rows = slice(0, 0)
        self._columns = slice(0, 0)
        self._written: torch.Tensor | None = None

    def writing(self, rows: slice, columns: slice, written: torch.Tensor | None = None) -> None:
        """The next forward writes these rows' keys and values into these columns; with
        `written` (rows x columns), only where it is true (a padded prefill must not overwrite
        the shared prefix copied in before its row's own tokens)."""
        self._rows, self._columns, self._written = rows, columns, written

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._written is not None:
            keep = self._written[:, None, :, None]
            key_states = torch.where(keep, key_states, keys[self._rows, :, self._columns])
            value_states = torch.where(keep, value_states, values[self._rows, :, self._columns])
        keys[self._rows, :, self._columns] = key_states
        values[self._rows, :, self._columns] = value_states
        # Views of the rows being run, up to the last column written: no copy.
        return (
            keys[self._rows, :, : self._columns.stop],
            values[self._rows, :, : self._columns.stop],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s row into slot `target` (the row that was there has left)."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, : self.end] = layer[source, :, : self.end]
        self.starts[target] = self.starts[source]

    def shift(self, by: int, running: int) -> None:
        """Move the running rows' columns by `by` (left when negative), keeping their order."""
        if by == 0:
            return
        old = slice(max(0, -by), self.end)
        new = slice(old.start + by, self.end + by)
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[:running, :, new] = layer[:running, :, old].clone()
        self.starts = [start + by for start in self.starts]
        self.end += by

    def copy_in(self, slot: int, at: int, keys: list[torch.Tensor], values: list[torch.Tensor]):
        """Put cached keys and values (a shared prefix's) into `slot` from column `at`."""
        length = keys[0].shape[-2]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slot, :, at : at + length] = k
            self.values[layer][slot, :, at : at + length] = v


def attention_masks(
    model_config: Any,
    starts: torch.Tensor,
    first_column: int,
    queries: int,
    device: Any,
) -> Any:
    """Masks for `queries` new tokens per row at columns first_column.., rows starting at `starts`.

    A query sees the columns from its row's start up to its own; in sliding-window layers only
    the last `sliding_window` of them. Queries on padding (before their row's start) see just
    themselves, so that no softmax runs over nothing; their outputs are never read.
    """
    text = getattr(model_config, "text_config", None) or model_config
    keys = first_column + queries
    query_columns = torch.arange(first_column, keys, device=device)[None, :, None]
    key_columns = torch.arange(keys, device=device)[None, None, :]
    row_starts = starts.to(device)[:, None, None]
    causal = key_columns <= query_columns
    full = causal & (key_columns >= row_starts)
    own = key_columns == query_columns
    padding = query_columns < row_starts
    full = torch.where(padding, own, full)[:, None]
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        return full
    window = getattr(text, "sliding_window", None) or keys
    sliding = full & (key_columns > query_columns - window)[:, None]
    return {"full_attention": full, "sliding_attention": sliding}
