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

The device buffers are sections of one flat int64 tensor (``StepLayout``). Under tensor
parallelism rank 0 builds the step there and broadcasts that tensor's prefix to the other ranks,
once per step (``share``, inside the graph on a replay); they learn what to read of it from a
small host header (``StepHeader``), sent ahead over their control socket, and build the same
views (``receive``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from kvray.replica.forward_context import ForwardContext
from kvray.replica.parallel.group import SINGLE, ParallelGroup
from kvray.replica.sequence import Sequence


class StepHeader(NamedTuple):
    """What a rank needs, besides the broadcast buffer, to run a step: the sizes to view and the
    kernels' host hints (identical on every rank), and the CUDA-graph bucket (tokens 0: eager)."""

    num_tokens: int
    num_seqs: int
    max_blocks: int        # block-table columns in use
    sample_rows: int       # rows of the hidden states to sample (0: every row, when num_sampled)
    num_sampled: int       # sequences sampled (0: none, no logits)
    max_query_len: int
    max_seq_len: int
    bucket_tokens: int = 0
    bucket_seqs: int = 0
    bucket_decode: int = 0

    _FORMAT = struct.Struct("<10q")
    SIZE = _FORMAT.size

    def pack(self) -> bytes:
        return self._FORMAT.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> "StepHeader":
        return cls(*cls._FORMAT.unpack(data))


class StepLayout:
    """The sections of the flat int64 step buffer, in order: sampling/gather indices [3, S] int64,
    query starts and lengths [2, S + 1] int32, token rows (ids, positions, slots) [3, T] int64,
    block tables [S, B] int32. The tables come last, so the inputs of a step of ``n`` sequences
    are the buffer's first ``prefix(n)`` elements."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int):
        self.shape = (max_tokens, max_seqs, max_blocks)
        self.off_seq = 3 * max_seqs
        self.off_tok = self.off_seq + max_seqs + 1  # 2 (S + 1) int32 = S + 1 int64
        self.off_tables = self.off_tok + 3 * max_tokens
        self.size = self.prefix(max_seqs)

    def prefix(self, num_seqs: int) -> int:
        return self.off_tables + -(-num_seqs * self.shape[2] // 2)

    def views(self, flat: torch.Tensor):
        """(tok [3, T] int64, seq [2, S + 1] int32, tables [S, B] int32, idx [3, S] int64) of ``flat``."""
        t, s, b = self.shape
        tok = flat[self.off_tok:self.off_tables].view(3, t)
        seq = flat[self.off_seq:self.off_tok].view(torch.int32)[:2 * (s + 1)].view(2, s + 1)
        tables = flat[self.off_tables:self.size].view(torch.int32)[:s * b].view(s, b)
        return tok, seq, tables, flat[:self.off_seq].view(3, s)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    num_tokens: int
    sample_seqs: list[Sequence]
    sample_index: torch.Tensor | None  # device rows of the hidden states to sample; None: every row
    header: StepHeader


class _Staging:
    """One set of host staging buffers (pinned on CUDA), laid out like the device buffer, and
    the event after its last copies."""

    def __init__(self, pin: bool, layout: StepLayout, cuda: bool):
        self.flat = torch.zeros(layout.size, dtype=torch.int64, pin_memory=pin)
        self.tok, self.seq, self.tables, self.idx = layout.views(self.flat)
        self.n_tok, self.n_seq, self.n_tables, self.n_idx = (
            t.numpy() for t in (self.tok, self.seq, self.tables, self.idx))
        self.event = torch.cuda.Event() if cuda else None


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 group: ParallelGroup = SINGLE):
        self.device = device
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.group = group
        self.shared = group.distributed
        self.on_cpu = device.type == "cpu"
        cuda = device.type == "cuda"
        self.layout = StepLayout(max_tokens, max_seqs, max_blocks_per_seq)
        self._staging = [_Staging(cuda, self.layout, cuda) for _ in range(2)]
        self._turn = 0
        self.flat = torch.zeros(self.layout.size, dtype=torch.int64, device=device)
        self.d_tok, self.d_seq, self.d_tables, self.d_idx = self.layout.views(self.flat)

    def share(self, num_seqs: int) -> None:
        """Under tensor parallelism: rank 0's inputs of a step of ``num_seqs`` sequences into every
        rank's buffer (one broadcast). A no-op otherwise."""
        if self.shared:
            self.group.broadcast(self.flat[:self.layout.prefix(num_seqs)])

    def receive(self, h: StepHeader) -> StepInputs:
        """A rank other than 0: the views of a step whose inputs ``share`` brings (call it first,
        or replay a graph, which does)."""
        t, b = h.num_tokens, h.num_seqs
        ctx = ForwardContext(slot_mapping=self.d_tok[2, :t], block_tables=self.d_tables[:b, :h.max_blocks],
                             query_start_loc=self.d_seq[0, :b + 1], seq_lens=self.d_seq[1, :b],
                             max_query_len=h.max_query_len, max_seq_len=h.max_seq_len)
        index = self.d_idx[0, :h.sample_rows] if h.sample_rows else None
        return StepInputs(self.d_tok[0, :t], self.d_tok[1, :t], ctx, t, [], index, h)

    def build(self, scheduled: list[tuple[Sequence, int]], pending: dict[Sequence, int] | None = None,
              prev_tokens: torch.Tensor | None = None, pad: tuple[int, int, bool] | None = None) -> StepInputs:
        """The step's inputs, in the device buffers. ``pad``: the graph bucket (tokens, sequences,
        decode) to pad them to."""
        st = self._staging[self._turn]
        self._turn ^= 1
        if st.event is not None:
            st.event.synchronize()  # its copies (two steps ago) are done; normally returns at once
        f = _Flat(scheduled, st.n_tables, self.block_size, pending)
        k = f.stage(st, pad)
        t, b, s, g = f.num_tokens, len(scheduled), f.num_sampled, len(f.gather_dst)
        if self.on_cpu and pad is None and not self.shared:  # no device copies: slices of the host buffers (cloned)
            d_tok, d_seq, d_tables = st.tok[:, :t].clone(), st.seq.clone(), st.tables[:b, :f.max_blocks].clone()
            d_idx = st.idx[:, :k].clone()
        else:
            d_tok, d_seq, d_tables, d_idx = self._copy(st, f, pad, k)
        if g:
            d_tok[0].index_copy_(0, d_idx[1, :g], prev_tokens.index_select(0, d_idx[2, :g]).to(torch.int64))
        ctx = ForwardContext(slot_mapping=d_tok[2], block_tables=d_tables, query_start_loc=d_seq[0, :b + 1],
                             seq_lens=d_seq[1, :b], max_query_len=f.max_q, max_seq_len=max(f.lens))
        header = StepHeader(t, b, f.max_blocks, s, len(f.sample_seqs), f.max_q, max(f.lens),
                            *((pad[0], pad[1], int(pad[2])) if pad is not None else ()))
        return StepInputs(d_tok[0], d_tok[1], ctx, t, f.sample_seqs, d_idx[0, :s] if s else None, header)

    def _copy(self, st: _Staging, f: "_Flat", pad: tuple[int, int, bool] | None, k: int):
        """The staged host arrays to the device buffers (non-blocking), then the staging's event."""
        t, b = f.num_tokens, len(f.lens)
        nt, ns = (pad[0], pad[1]) if pad is not None else (t, b)
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

    def stage(self, st: _Staging, pad: tuple[int, int, bool] | None) -> int:
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
            nt, ns = pad[0], pad[1]
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
