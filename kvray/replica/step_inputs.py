"""Flattening a scheduled step into the model's input tensors.

Host-side arrays are built with numpy in persistent (pinned, on CUDA) staging buffers and
copied to persistent device buffers with non-blocking copies, so a step allocates nothing and
never waits on the GPU here. Two staging sets alternate, each guarded by an event recorded
after its copies: a step's host arrays are written while the previous step's copies may still
be queued (always the case under async scheduling, and after a step that sampled nothing).

Under async scheduling a decode's input token may not be known on the host yet: the engine
passes ``pending`` (sequence -> row of the previous step's sampled-token tensor, whose last
token id is a placeholder) and that tensor, and the ids are gathered on the device.

For a CUDA-graph replay the step is padded to its graph's bucket ``(tokens, sequences)``: the
padding tokens write no KV (slot -1) and belong to no sequence, the padding sequences have no
query tokens, and the graph reads the device buffers themselves (``kvray.replica.cuda_graphs``).
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
    sample_seqs: list[Sequence]
    sample_index: torch.Tensor | None  # device rows of the hidden states to sample; None: every row


class _Staging:
    """One set of host staging buffers (pinned on CUDA) and the event after its last copies."""

    def __init__(self, pin: bool, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, cuda: bool):
        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.tok = host((3, max_tokens), torch.int64)  # rows: 0 input ids, 1 positions, 2 slots
        self.seq = host((2, max_seqs + 1), torch.int32)  # 0 query_start_loc, 1 seq_lens
        self.tables = host((max_seqs, max_blocks_per_seq), torch.int32)
        self.idx = host((3, max_seqs), torch.int64)  # 0 sampled rows, 1 gather destinations, 2 gather sources
        self.n_tok, self.n_seq, self.n_tables, self.n_idx = (
            t.numpy() for t in (self.tok, self.seq, self.tables, self.idx))
        self.event = torch.cuda.Event() if cuda else None


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_tokens: int, max_seqs: int, max_blocks_per_seq: int):
        self.device = device
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.on_cpu = device.type == "cpu"
        cuda = device.type == "cuda"
        self._staging = [_Staging(cuda, max_tokens, max_seqs, max_blocks_per_seq, cuda) for _ in range(2)]
        self._turn = 0

        def dev(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.d_tok = dev((3, max_tokens), torch.int64)
        self.d_seq = dev((2, max_seqs + 1), torch.int32)
        self.d_tables = dev((max_seqs, max_blocks_per_seq), torch.int32)
        self.d_idx = dev((3, max_seqs), torch.int64)

    def build(self, scheduled: list[tuple[Sequence, int]], pending: dict[Sequence, int] | None = None,
              prev_tokens: torch.Tensor | None = None, pad: tuple[int, int] | None = None) -> StepInputs:
        st = self._staging[self._turn]
        self._turn ^= 1
        if st.event is not None:
            st.event.synchronize()  # its copies (two steps ago) are done; normally returns at once
        f = _Flat(scheduled, st.n_tables, self.block_size, pending)
        k = f.stage(st, pad)
        t, b, s, g = f.num_tokens, len(scheduled), f.num_sampled, len(f.gather_dst)
        if self.on_cpu and pad is None:  # no device copies: slices of the host buffers (cloned: reused next step)
            d_tok, d_seq, d_tables = st.tok[:, :t].clone(), st.seq.clone(), st.tables[:b, :f.max_blocks].clone()
            d_idx = st.idx[:, :k].clone()
        else:
            d_tok, d_seq, d_tables, d_idx = self._copy(st, f, pad, k)
        if g:
            d_tok[0].index_copy_(0, d_idx[1, :g], prev_tokens.index_select(0, d_idx[2, :g]).to(torch.int64))
        ctx = ForwardContext(slot_mapping=d_tok[2], block_tables=d_tables, query_start_loc=d_seq[0, :b + 1],
                             seq_lens=d_seq[1, :b], max_query_len=f.max_q, max_seq_len=max(f.lens))
        return StepInputs(d_tok[0], d_tok[1], ctx, t, f.sample_seqs, d_idx[0, :s] if s else None)

    def _copy(self, st: _Staging, f: "_Flat", pad: tuple[int, int] | None, k: int):
        """The staged host arrays to the device buffers (non-blocking), then the staging's event."""
        t, b = f.num_tokens, len(f.lens)
        nt, ns = pad if pad is not None else (t, b)
        self.d_tok[:, :nt].copy_(st.tok[:, :nt], non_blocking=True)
        self.d_seq[:, :ns + 1].copy_(st.seq[:, :ns + 1], non_blocking=True)
        self.d_tables[:b, :f.max_blocks].copy_(st.tables[:b, :f.max_blocks], non_blocking=True)
        if k:
            self.d_idx[:, :k].copy_(st.idx[:, :k], non_blocking=True)
        if st.event is not None:
            st.event.record()
        return self.d_tok[:, :t], self.d_seq, self.d_tables[:b, :f.max_blocks], self.d_idx


class _Flat:
    """A step's sequences flattened into token and sequence lists (block tables written into the
    staging's table rows as it goes)."""

    __slots__ = ("ids", "pos", "slots", "qsl", "lens", "sample_rows", "sample_seqs", "gather_dst", "gather_src",
                 "max_blocks", "max_q", "num_tokens", "num_sampled")

    def __init__(self, scheduled: list[tuple[Sequence, int]], tables: np.ndarray, bs: int,
                 pending: dict[Sequence, int] | None):
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        sample_rows, sample_seqs, gather_dst, gather_src = [], [], [], []
        max_blocks = max_q = t = 0
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
            if pending:
                src = pending.get(seq)
                if src is not None:  # its last token id is still on the device
                    gather_dst.append(t + len(seq.token_ids) - 1 - start)
                    gather_src.append(src)
            if n > max_q:
                max_q = n
            t += n
            qsl.append(t)
            lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(t - 1)
                sample_seqs.append(seq)
        self.ids, self.pos, self.slots, self.qsl, self.lens = ids, pos, slots, qsl, lens
        self.sample_rows, self.sample_seqs, self.gather_dst, self.gather_src = sample_rows, sample_seqs, gather_dst, gather_src
        self.max_blocks, self.max_q, self.num_tokens = max_blocks, max_q, t
        self.num_sampled = len(sample_rows) if len(sample_rows) != t else 0  # 0: every row is sampled

    def stage(self, st: _Staging, pad: tuple[int, int] | None) -> int:
        """Write the host arrays (padded to the graph's bucket ``pad``, which is copied whole, as
        the graph reads it); returns the index rows in use."""
        t, b, s, g = self.num_tokens, len(self.lens), self.num_sampled, len(self.gather_dst)
        tok, seqa, idx = st.n_tok, st.n_seq, st.n_idx
        tok[0, :t] = self.ids
        tok[1, :t] = self.pos
        tok[2, :t] = self.slots
        seqa[0, :b + 1] = self.qsl
        seqa[1, :b] = self.lens
        if pad is not None:
            nt, ns = pad
            tok[:2, t:nt] = 0
            tok[2, t:nt] = -1
            seqa[0, b + 1:ns + 1] = t
            seqa[1, b:ns] = 0
        if s:
            idx[0, :s] = self.sample_rows
        if g:
            idx[1, :g] = self.gather_dst
            idx[2, :g] = self.gather_src
        return max(s, g)


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
