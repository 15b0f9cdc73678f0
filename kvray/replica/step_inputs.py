"""Flattening a scheduled step into the model's input tensors.

Host-side arrays are built with numpy in persistent (pinned, on CUDA) staging buffers and
copied to persistent device buffers with non-blocking copies, so a step allocates nothing and
never waits on the GPU here. The only host-device sync of a step is reading the sampled tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvray.replica.forward_context import ForwardContext
from kvray.replica.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    num_tokens: int
    sample_rows: list[int]
    sample_seqs: list[Sequence]
    is_decode: bool            # every sequence computes exactly one token


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_tokens: int, max_seqs: int, max_blocks_per_seq: int):
        self.device = device
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        pin = device.type == "cuda"

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        def dev(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        # rows: 0 input ids, 1 positions, 2 slots (int64 so one copy moves all three)
        self.h_tok = host((3, max_tokens), torch.int64)
        self.h_seq = host((2, max_seqs + 1), torch.int32)  # 0 query_start_loc, 1 seq_lens
        self.h_tables = host((max_seqs, max_blocks_per_seq), torch.int32)
        self.d_tok = dev((3, max_tokens), torch.int64)
        self.d_seq = dev((2, max_seqs + 1), torch.int32)
        self.d_tables = dev((max_seqs, max_blocks_per_seq), torch.int32)
        self.n_tok, self.n_seq, self.n_tables = self.h_tok.numpy(), self.h_seq.numpy(), self.h_tables.numpy()
        self.on_cpu = device.type == "cpu"

    def build(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        bs = self.block_size
        tables = self.n_tables
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        max_blocks = max_q = 0
        t = 0
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            nb = len(table)
            tables[i, :nb] = _np_table(seq)[:nb]
            if nb > max_blocks:
                max_blocks = nb
            if n == 1:
                ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                p = np.arange(start, end)
                ids.extend(seq.token_ids[start:end])
                pos.extend(range(start, end))
                slots.extend((tables[i, p // bs].astype(np.int64) * bs + p % bs).tolist())
            if n > max_q:
                max_q = n
            t += n
            qsl.append(t)
            lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(t - 1)
                sample_seqs.append(seq)
        b = len(scheduled)
        tok, seqa = self.n_tok, self.n_seq
        tok[0, :t] = ids
        tok[1, :t] = pos
        tok[2, :t] = slots
        seqa[0, :b + 1] = qsl
        seqa[1, :b] = lens
        if self.on_cpu:  # no device copies: slices of the host buffers (cloned: the next step reuses them)
            d_tok, d_seq, d_tables = self.h_tok[:, :t].clone(), self.h_seq.clone(), self.h_tables[:b, :max_blocks].clone()
        else:
            self.d_tok[:, :t].copy_(self.h_tok[:, :t], non_blocking=True)
            self.d_seq[:, :b + 1].copy_(self.h_seq[:, :b + 1], non_blocking=True)
            self.d_tables[:b, :max_blocks].copy_(self.h_tables[:b, :max_blocks], non_blocking=True)
            d_tok, d_seq, d_tables = self.d_tok[:, :t], self.d_seq, self.d_tables[:b, :max_blocks]
        ctx = ForwardContext(slot_mapping=d_tok[2], block_tables=d_tables, query_start_loc=d_seq[0, :b + 1],
                             seq_lens=d_seq[1, :b], max_query_len=max_q, max_seq_len=max(lens))
        return StepInputs(d_tok[0], d_tok[1], ctx, t, sample_rows, sample_seqs, max_q == 1)


def _np_table(seq: Sequence) -> np.ndarray:
    """The sequence's block table as numpy, updated by appending only what is new."""
    table = seq.block_table
    arr = seq.np_table
    if seq.np_src is not table or arr is None:
        arr = np.array(table, dtype=np.int32)
        seq.np_table, seq.np_src = arr, table
        return arr
    n = len(arr)
    if len(table) > n:
        arr = np.concatenate([arr, np.asarray(table[n:], dtype=np.int32)])
        seq.np_table = arr
    return arr
