"""CUDA graphs for decode steps.

One graph per batch-size bucket, captured largest first into one shared memory pool. A decode
step of b sequences replays the smallest bucket >= b: its first b rows are the real inputs,
the padding rows write no KV (slot -1) and attend to a single cached position of block 0,
and their outputs are ignored.
"""
from __future__ import annotations

import logging

import torch

from kvray.replica.forward_context import ForwardContext, forward_context
from kvray.replica.step_inputs import StepInputs

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_batch: int, max_blocks_per_seq: int, max_model_len: int):
        self.model = model
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.max_model_len = max_model_len
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    def _ctx(self, b: int) -> ForwardContext:
        # max_seq_len is the worst case: a replay must be valid for any context length.
        return ForwardContext(self.slots[:b], self.tables[:b], self.qsl[:b + 1], self.seq_lens[:b],
                              max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for b in reversed(self.buckets):
            ctx = self._ctx(b)
            with forward_context(ctx):
                self.model(self.input_ids[:b], self.positions[:b])  # warm-up: compiles/tunes kernels outside capture
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self.model(self.input_ids[:b], self.positions[:b])
            if pool is None:
                pool = g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.graphs), self.buckets)

    def can_run(self, step: StepInputs) -> bool:
        return step.is_decode and step.num_tokens <= self.max_batch

    def run(self, step: StepInputs) -> torch.Tensor:
        """Replay the bucket for this decode step; returns hidden states [b, H]."""
        b = step.num_tokens
        bucket = next(s for s in self.buckets if s >= b)
        ctx = step.ctx
        self.input_ids[:b].copy_(step.input_ids, non_blocking=True)
        self.positions[:b].copy_(step.positions, non_blocking=True)
        self.slots[:b].copy_(ctx.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(ctx.seq_lens, non_blocking=True)
        nb = ctx.block_tables.shape[1]
        self.tables[:b, :nb].copy_(ctx.block_tables, non_blocking=True)
        if bucket > b:
            self.slots[b:bucket].fill_(-1)
            self.seq_lens[b:bucket].fill_(1)
        g, out = self.graphs[bucket]
        g.replay()
        return out[:b]
