"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

All rows are sampled in one pass on the logits' device. Random rows use the exponential-race
trick (argmax of p / E with E ~ Exp(1) is a draw from p); a request with a seed draws its
noise from its own generator, so its output does not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvray.replica.sequence import Sequence


@dataclass
class SampleResult:
    """Sampled tokens (and log-probs) per row. Fields may hold device tensors until
    ``resolve()`` reads them back: that read is the step's one host-device sync, so the engine
    does its other bookkeeping first. ``start_copy()`` queues the copies to pinned host memory
    right behind the sampling and records an event, so ``resolve()`` waits for this step's
    work only, not for work queued after it (the next step, under async scheduling)."""

    token_ids: list[int] | torch.Tensor
    logprobs: list[float] | torch.Tensor | None = None
    top_logprobs: list[dict[int, float] | None] | None = None
    _top: tuple | None = None  # (values, indices, per-row k) on the device, until resolved
    _event: object = None      # torch.cuda.Event after the host copies started by start_copy()
    _host: tuple | None = None   # the pinned host copies (tokens, logprobs, (top values, top indices))

    def start_copy(self) -> "SampleResult":
        t = self.token_ids
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            return self  # host results (or the CPU device): resolve() needs no wait

        def to_host(x):
            return x.to("cpu", non_blocking=True)  # a non-blocking device-to-host copy lands in pinned memory

        self._host = (to_host(t), to_host(self.logprobs) if isinstance(self.logprobs, torch.Tensor) else None,
                      (to_host(self._top[0]), to_host(self._top[1])) if self._top is not None else None)
        self._event = torch.cuda.Event()
        self._event.record()
        return self

    def resolve(self) -> "SampleResult":
        if self._event is not None:
            self._event.synchronize()
            tokens, logprobs, top = self._host
            self.token_ids = tokens
            if logprobs is not None:
                self.logprobs = logprobs
            if top is not None:
                self._top = (top[0], top[1], self._top[2])
            self._event = self._host = None
        if isinstance(self.token_ids, torch.Tensor):
            self.token_ids = self.token_ids.tolist()
        if isinstance(self.logprobs, torch.Tensor):
            self.logprobs = self.logprobs.tolist()
        if self._top is not None:
            values, indices, ks = self._top
            values, indices = values.tolist(), indices.tolist()
            self.top_logprobs = [{indices[r][j]: values[r][j] for j in range(k)} if k else None
                                 for r, k in enumerate(ks)]
            self._top = None
        return self


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.grammars = None  # the engine's GrammarCache, once a request with structured outputs came


    def _seq_generator(self, seq: Sequence) -> torch.Generator:
        if seq.generator is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.params.seed)
            seq.generator = g
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """``logits`` [N, V] float32, one row per sequence in ``seqs``. Rows of requests with
        structured outputs are masked to what their grammar allows first."""
        if self.grammars is not None:
            rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
            if rows:
                self.grammars.apply_masks(logits, rows, self.grammars.fill_masks([seqs[i].grammar for i in rows]))
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs)
        if not any(p.logprobs is not None for p in params):
            return SampleResult(tokens)
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        ks = [p.logprobs or 0 for p in params]
        top = None
        if max(ks) > 0:
            top_v, top_i = logp.topk(max(ks), dim=-1)
            top = (top_v, top_i, ks)
        return SampleResult(tokens, chosen, _top=top)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        dev = logits.device
        greedy = _to_device([p.greedy for p in params], torch.bool, dev)
        temp = _to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, dev)
        x = logits / temp[:, None]
        vocab = x.shape[-1]
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            x = self._truncate(x, _to_device(top_k, torch.int64, dev), _to_device(top_p, torch.float32, dev))
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, p in enumerate(params) if p.seed is not None]
        if len(seeded) < len(params):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=self._seq_generator(seqs[i]))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _truncate(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Mask everything outside each row's top-k and top-p nucleus to -inf."""
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(x.shape[-1], device=x.device)[None, :]
        mask = rank >= top_k[:, None]
        probs = torch.softmax(sorted_x.masked_fill(mask, float("-inf")), dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        mask |= mass_before >= top_p[:, None]
        sorted_x = sorted_x.masked_fill(mask, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queued work (a blocking
    copy would wait for the step in flight under async scheduling)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
