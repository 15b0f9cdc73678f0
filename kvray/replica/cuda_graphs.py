"""CUDA graphs for every step the scheduler produces: decode-only steps and mixed steps that
carry prefill chunks.

The whole model forward (embedding to final norm) is captured once per bucket, largest first,
into one shared memory pool:

* **decode buckets** ``(b, b)``: ``b`` sequences of one token each, up to ``max_num_seqs``. The
  attention kernel runs its decode tiles (one query row per token, split-KV for long contexts).
* **mixed buckets** ``(T, max_num_seqs)``: any step of at most ``T`` tokens, up to
  ``max_num_batched_tokens``: prefill, chunked prefill over a cached prefix, and decodes in the
  same launch. The attention kernel's grid covers ``T // BLOCK_Q + max_num_seqs`` query tiles, so
  it is fixed by the bucket, whatever the step's query lengths are.

A step replays the smallest bucket that holds it. Its inputs live in the step-input builder's
persistent device buffers, which the graphs read directly; the builder pads them to the bucket:
padding tokens have slot -1 (no KV write) and belong to no sequence, padding sequences have no
query tokens (their attention tiles exit at once), and no padding row is ever sampled. The
launch grids and tile configurations depend only on the bucket (the forward context carries the
bucket's worst-case hints, never a step's host values), so every kernel variant is compiled when
the graphs are captured, at startup, and none while serving.

Under tensor parallelism every rank captures the same graphs in the same order, and a graph
records the whole step on its rank: the broadcast of rank 0's step inputs (of the bucket's
size), the forward and its all-reduces. A step's header tells the other ranks which to replay.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from kvray import kernels
from kvray.replica.forward_context import ForwardContext, forward_context
from kvray.replica.step_inputs import StepInputBuilder

logger = logging.getLogger(__name__)


class Bucket(NamedTuple):
    """A graph's step shape: ``tokens`` and ``seqs`` are what the inputs are padded to."""

    tokens: int
    seqs: int
    decode: bool  # one token per sequence: the attention kernel's decode tiles


def decode_buckets(max_seqs: int) -> list[int]:
    """Batch sizes of the decode graphs: 1, 2, 4, 8, then every 16."""
    sizes = [1, 2, 4, 8] + list(range(16, max_seqs + 16, 16))
    return sorted({min(s, max_seqs) for s in sizes})


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts of the mixed graphs: steps of 1/8 of a power of two (at most ~12% padding),
    from 16 up to ``max_tokens``."""
    sizes, p = {16, 32, 48}, 64
    while p < max_tokens:
        sizes.update(p + i * p // 8 for i in range(8))
        p *= 2
    return sorted({min(s, max_tokens) for s in sizes if s <= max_tokens} | {max_tokens})


class StepGraphs:
    def __init__(self, model, inputs: StepInputBuilder, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, capture: bool = True):
        """``capture=False``: only the buckets and ``forward`` (what a replay computes, run eagerly:
        how the CPU tests check the padding)."""
        self.model = model
        self.inputs = inputs
        self.max_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.decode = decode_buckets(max_num_seqs)
        self.mixed = token_buckets(max_num_batched_tokens)
        self.graphs: dict[Bucket, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def bucket(self, num_tokens: int, num_seqs: int) -> Bucket | None:
        """The bucket a step replays, or None if none holds it (it runs eagerly)."""
        if num_tokens == num_seqs and num_seqs <= self.decode[-1]:  # decode only
            b = next(s for s in self.decode if s >= num_seqs)
            return Bucket(b, b, True)
        if num_tokens <= self.mixed[-1] and num_seqs <= self.max_seqs:
            return Bucket(next(t for t in self.mixed if t >= num_tokens), self.max_seqs, False)
        return None

    def replay(self, bucket: Bucket, num_tokens: int) -> torch.Tensor:
        """Run the graph of ``bucket`` on the padded inputs; hidden states of the real tokens [t, H].
        Without captured graphs (``capture=False``), what the replay computes, run eagerly."""
        if bucket not in self.graphs:
            return self.forward(bucket)[:num_tokens]
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:num_tokens]

    def forward(self, bucket: Bucket) -> torch.Tensor:
        """The model forward of ``bucket`` on the step-input buffers, as its graph records it."""
        tokens, seqs, decode = bucket
        inp = self.inputs
        inp.share(seqs)  # tensor parallelism: rank 0's inputs to every rank (a no-op otherwise)
        # The worst case as the kernels' hints: the same launch must be valid for any step of the bucket.
        ctx = ForwardContext(inp.d_tok[2, :tokens], inp.d_tables[:seqs], inp.d_seq[0, :seqs + 1],
                             inp.d_seq[1, :seqs], max_query_len=1 if decode else tokens,
                             max_seq_len=self.max_model_len)
        with forward_context(ctx):
            return self.model(inp.d_tok[0, :tokens], inp.d_tok[1, :tokens])

    # ---- capture ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0 = time.monotonic()
        dev = self.inputs.device
        before = torch.cuda.memory_reserved(dev)
        inp = self.inputs
        # Inputs of an empty step: no sequence has a query token and no token writes KV, so the
        # warm-up forwards (which compile every kernel variant of the bucket) touch no state.
        inp.d_seq.zero_()
        inp.d_tok[0].zero_()
        inp.d_tok[1].zero_()
        inp.d_tok[2].fill_(-1)
        pool = None
        buckets = [Bucket(t, self.max_seqs, False) for t in self.mixed] + [Bucket(b, b, True) for b in self.decode]
        for bucket in sorted(buckets, key=lambda b: (-b.tokens, b.decode)):  # largest first: the pool fits them all
            self.forward(bucket)  # warm-up: compiles and tunes outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(bucket)
            if pool is None:
                pool = graph.pool()
            self.graphs[bucket] = (graph, out)
        torch.cuda.synchronize(dev)
        self.memory_bytes = torch.cuda.memory_reserved(dev) - before
        self.capture_s = time.monotonic() - t0
        logger.info("captured %d CUDA graphs in %.1f s, %.2f GiB (%d Triton kernel variants built): decode batches "
                    "%s; mixed steps of up to %s tokens", len(self.graphs), self.capture_s, self.memory_bytes / 2**30,
                    kernels.compiled_variants(), self.decode, self.mixed)
