"""Rows that begin with the same tokens, run from layer L once for all of them.

An agent's decision rows (`--history-turns K`) all begin with the same instructions, half or
more of each row in the built-in environments; the rows of a single-turn task may all begin
with the same system prompt. Layer L and the blocks after it run with grad over every token of every row,
so those repeats cost as much as new tokens. Instead, the common part runs once, as a batch of
one row, and every row's own tokens attend to its keys and values
(`SplitModel.from_layer_shared`). The result is the same computation: each row's attention sees
the same keys and values at the same positions, only computed once.

Layout: the rows' real tokens are packed to the left; the first `length` of them are the
common prefix ([1, length]); the rest of each row follows it in `rest` ([B, R], right-padded,
so that a token's column in prefix + rest is its position, as sliding windows count).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Below this many shared tokens the extra pass and gathers are not worth it.
MIN_LENGTH = 8


class CommonPrefix(NamedTuple):
    length: int              # s: real tokens every row starts with
    source: Tensor           # [B, W] column of the original row holding packed token j
    rest_columns: Tensor     # [B, R] original column of each rest token (pads: a real column)
    rest_mask: Tensor        # [B, R] 1 on real tokens
    real_index: Tensor       # [B, W] index among the row's real tokens of each original column

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the common prefix's [1, s, ...] (row 0's), the rest's [B, R, ...]) of x [B, W] or
        [B, W, H] in the rows' original layout."""
        prefix = x[:1, self.source[0, :self.length]]
        index = self.rest_columns if x.dim() == 2 else self.rest_columns[..., None].expand(-1, -1, x.shape[-1])
        return prefix, x.gather(1, index)

    def scatter(self, prefix: Tensor, rest: Tensor, out: Tensor) -> None:
        """Write prefix [1, s, H] and the real tokens of rest [B, R, H] into out [B, W, H], in
        the rows' original layout (`gather` undone; padding columns are left as they are)."""
        rows = torch.arange(len(out), device=out.device)[:, None]
        out[rows, self.source[:, :self.length]] = prefix.expand(len(out), -1, -1)
        row, j = self.rest_mask.nonzero(as_tuple=True)
        out[row, self.rest_columns[row, j]] = rest[row, j]

    def rest_column(self, row: Tensor, column: Tensor) -> Tensor:
        """Where the real token at (row, column) of the original layout sits in the rest (for
        tokens past the common prefix)."""
        return self.real_index[row, column] - self.length


def find(sequences: Tensor, attention_mask: Tensor, limit: int) -> CommonPrefix | None:
    """The longest run of real tokens that every row of `sequences` [B, W] starts with, at
    most `limit` long; None when there is no such run worth sharing (or one row)."""
    rows, width = sequences.shape
    if rows < 2 or limit < MIN_LENGTH:
        return None
    real = attention_mask.bool()
    counts = real.sum(1)
    columns = torch.arange(width, device=sequences.device).expand(rows, -1)
    # Real columns first, in order (a stable sort on "is padding").
    source = torch.sort((~real).int(), dim=1, stable=True).indices
    packed = sequences.gather(1, source)
    span = min(limit, int(counts.min()))
    same = (packed[:, :span] == packed[:1, :span]).all(0)
    length = int(same.int().cumprod(0).sum())
    if length < MIN_LENGTH:
        return None
    rest_len = counts - length
    width_rest = int(rest_len.max())
    j = torch.arange(width_rest, device=sequences.device).expand(rows, -1)
    rest_mask = (j < rest_len[:, None]).to(attention_mask.dtype)
    take = torch.where(rest_mask.bool(), j + length, torch.full_like(j, length))
    rest_columns = source.gather(1, take)
    real_index = torch.where(real, real.long().cumsum(1) - 1, columns)
    return CommonPrefix(length, source, rest_columns, rest_mask, real_index)
