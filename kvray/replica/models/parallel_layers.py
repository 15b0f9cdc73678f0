"""The layers that tensor parallelism splits over the ranks (``kvray.replica.parallel.sharding``
says which slice each rank holds):

* ``ColumnParallelLinear`` (q/k/v, gate/up): a rank computes its slice of the outputs, no
  communication;
* ``RowParallelLinear`` (o, down): a rank multiplies its slice of the inputs (the column-parallel
  layer's outputs), then one all-reduce sums the ranks' partial outputs; the bias is added once
  (it is zeroed on ranks > 0 after loading);
* ``VocabParallelEmbedding``: a rank looks up the ids of its vocabulary range (zero rows for the
  others), then one all-reduce; exact, since each row has one non-zero contribution;
* ``ParallelLMHead``: a rank computes the logits of its vocabulary range, gathered on rank 0
  (``None`` on the others; only rank 0 samples).

Each layer takes its group from ``kvray.replica.parallel.group.building`` (the loader builds the
model inside it) and records its ``Split`` as ``tp_split``, by which the loader reads only its
slice of each checkpoint tensor. Without tensor parallelism they are the plain layers: same
parameters, no communication.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvray.replica.models.linear import Linear
from kvray.replica.parallel.group import build_group
from kvray.replica.parallel.sharding import Split, even_split, vocab_range


def _empty(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(Linear):
    """``x W[rows]^T (+ b[rows])``: this rank's ``rows`` = (start, length) of the outputs (default:
    an equal share)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 rows: tuple[int, int] | None = None):
        group = build_group()
        start, length = rows if rows is not None else even_split(out_features, group.rank, group.size)
        super().__init__(in_features, length, bias, dtype, device)
        self.tp_split = Split(0, start, length, out_features) if group.size > 1 else None


class RowParallelLinear(Linear):
    """``sum over ranks of x_r W[:, cols_r]^T, + b``: the input is this rank's equal share of the
    features (what a column-parallel layer produced)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        group = build_group()
        start, length = even_split(in_features, group.rank, group.size)
        super().__init__(length, out_features, bias, dtype, device)
        self.group = group
        self.tp_split = Split(1, start, length, in_features) if group.size > 1 else None

    def after_loading(self) -> None:
        if self.group.rank and self.bias is not None:
            self.bias.data.zero_()  # the sum over the ranks adds the bias once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.group = group = build_group()
        start, count, rows = vocab_range(num_embeddings, group.rank, group.size)
        self.vocab_start, self.vocab_count = start, count
        self.weight = _empty(rows, dim, dtype=dtype, device=device)
        self.tp_split = Split(0, start, count, num_embeddings) if group.size > 1 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.group.distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_count)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(h.masked_fill_(outside[:, None], 0))


class ParallelLMHead(nn.Module):
    """The logits [N, vocab] in float32 on rank 0 (None on the others). ``tied``: the embedding
    whose weight it shares (its vocabulary shard, loaded through the embedding)."""

    def __init__(self, hidden: int, vocab_size: int, dtype: torch.dtype, device=None,
                 tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.group = group = build_group()
        self.vocab_size = vocab_size
        start, count, rows = vocab_range(vocab_size, group.rank, group.size)
        self.tp_split = None
        if tied is not None:
            self.weight = tied.weight  # the shared Parameter (named once: model.embed_tokens.weight)
        else:
            self.weight = _empty(rows, hidden, dtype=dtype, device=device)
            self.tp_split = Split(0, start, count, vocab_size) if group.size > 1 else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        local = F.linear(hidden, self.weight)
        if not self.group.distributed:
            return local.float()
        parts = self.group.gather(local)
        return None if parts is None else torch.cat(parts, dim=-1)[:, :self.vocab_size].float()
