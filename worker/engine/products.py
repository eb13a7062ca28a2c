"""Linear layers' products of few rows, on a CPU in fp32: taken as `W @ x.T`.

torch's product for a linear layer (`x @ W.T`) is slow on a CPU when x has few rows. Measured
with 2 threads on an AMD EPYC: the 270M's vocabulary head (262,144 x 640, most of its weights)
took 132 ms for 2 rows and 106 ms for 8, where the same product taken the other way round,
`W @ x.T`, which streams W once as a matrix-vector product does, took 27 and 55 ms; a layer's
2,048 x 640 projection took 764 us for 2 rows and 618 for 4, against 177 and 314 turned. From
5 rows on, the layers' 640 x 2,048 projection ran as fast either way, and from about 12 rows
the head, so only fewer rows are turned. Turned, one row is padded to two: torch's
matrix-vector product (57 ms for the head) is slower than a product of two rows.

Few rows are what a sync request decodes (alone in its express batch), a batch's last rows, and
the head of a prefill pass of a few prompts (it takes each prompt's last position alone): a
16-token answer alone took 0.84 s instead of 1.68, two answers side by side 0.90 s instead of
3.24 (W1's 64 rows: 1.05x, within the noise).
"""

from __future__ import annotations

from typing import Any

import torch

# Most rows whose product is turned round (see above): the head's weight is 50-250 times a
# layer's, so it gains from turning at more rows.
LAYER_ROWS = 4
HEAD_ROWS = 8


class FewRowsLinear(torch.nn.Linear):
    """An fp32 linear layer on a CPU that takes products of at most `most_rows` rows as
    `W @ x.T`; the sum is the same, its fp32 rounding may differ in the last bits (as it
    already does between row counts in torch's own product)."""

    most_rows = LAYER_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.most_rows:
            return super().forward(x)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:
            flat = torch.cat([flat, flat.new_zeros(1, self.in_features)])
        if self.bias is None:
            out = self.weight @ flat.T
        else:
            out = torch.addmm(self.bias[:, None], self.weight, flat.T)
        # Contiguous as torch's own product is: the attention layers `view` their projections.
        return out.T[:rows].reshape(*x.shape[:-1], self.out_features).contiguous()


def turn_few_row_products(model: Any) -> None:
    """Make every plain linear layer of an fp32 model on a CPU a FewRowsLinear (its weights
    kept, the head's tie to the embeddings too). Not for quantized models: torchao's weights
    are tensor subclasses that only torch's own product knows."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = FewRowsLinear
            if module is head:
                module.most_rows = HEAD_ROWS
