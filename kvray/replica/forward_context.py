"""Attention metadata for the current forward pass.

The model runner sets it once per step; every attention layer reads it, so forward
signatures stay ``forward(positions, hidden)`` instead of threading paging state through.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    slot_mapping: torch.Tensor      # int [num_tokens]: cache slot of each new token (-1: skip)
    block_tables: torch.Tensor      # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor   # int32 [num_seqs + 1]
    seq_lens: torch.Tensor          # int32 [num_seqs]: context length including the new tokens
    max_query_len: int = 0
    max_seq_len: int = 0


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("attention was called outside a forward context; use kvray.replica.forward_context.forward_context(...)")
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext):
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = prev
