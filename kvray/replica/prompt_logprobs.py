"""Prompt log-probs (vLLM's ``prompt_logprobs``), computed while a prompt is prefilled.

The hidden state the model computes at prompt position ``p`` predicts token ``p + 1``; a step
that computes positions ``[start, start + n)`` of a prompt therefore yields the log-probs of
prompt tokens ``start + 1 .. start + n`` (the last prompt position predicts the first generated
token, which the sampler handles). ``compute`` takes those rows of the step's hidden states
(eager or a CUDA-graph replay alike: both leave every token's hidden state), projects them to
the vocabulary in slices of ``SLICE_ROWS`` rows (a chunk of thousands of prompt tokens times a
150k vocabulary would not fit at once), and keeps the prompt token's log-prob and the top
``k``. The result stays on the device until the engine completes the step (``apply``).

Chunked prefill needs nothing more: each chunk adds its positions. A prefix-cache hit holds
only K/V, not the hidden states the log-probs come from, so the scheduler lets such a request
use the cache only for the prefix whose log-probs it has already (after a preemption), none on
its first admission: recomputing a cached prefix would cost the same forward as a miss.
Entries are keyed by position, so a prefix computed again after a preemption is not added twice.

The work is planned before the step runs (``plan``: which rows give which log-probs) and done
after its forward (``compute``); under tensor parallelism every rank projects the planned rows,
whose numbers travel with the step's header.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from kvray.replica.sequence import Sequence

SLICE_ROWS = 256


@dataclass
class PromptLogprobs:
    """What one step computed: for each sequence, the prompt index of its first entry and the
    number of entries, in order; their rows of ``chosen`` / ``top_v`` / ``top_i``."""

    entries: list[tuple[Sequence, int, int]]
    chosen: torch.Tensor               # [rows] log-prob of each prompt token
    top_v: torch.Tensor | None         # [rows, k] top log-probs (k: the largest asked in the step)
    top_i: torch.Tensor | None
    _event: object = None              # torch.cuda.Event after the copies to the host

    def start_copy(self) -> "PromptLogprobs":
        """Queue the copies to the host behind the step (as ``SampleResult.start_copy``), so that
        ``apply`` waits for this step only, not for the step launched after it."""
        if self.chosen.device.type == "cuda":
            self.chosen, self.top_v, self.top_i = (t.to("cpu", non_blocking=True) if t is not None else None
                                                   for t in (self.chosen, self.top_v, self.top_i))
            self._event = torch.cuda.Event()
            self._event.record()
        return self

    def apply(self) -> None:
        """Append the entries to each sequence's ``prompt_logprobs``."""
        if self._event is not None:
            self._event.synchronize()
        chosen = self.chosen.tolist()
        top_v = self.top_v.tolist() if self.top_v is not None else None
        top_i = self.top_i.tolist() if self.top_i is not None else None
        row = 0
        for seq, first, count in self.entries:
            lps = seq.prompt_logprobs
            k = seq.params.prompt_logprobs or 0
            for j in range(count):
                index = first + j
                if index == len(lps):  # else known already (computed again after a preemption)
                    entry = {seq.token_ids[index]: chosen[row + j]}
                    if k:
                        for t, v in zip(top_i[row + j][:k], top_v[row + j][:k]):
                            entry.setdefault(t, v)
                    lps.append(entry)
            row += count


@dataclass
class Plan:
    """Which rows of a step's hidden states give which prompt log-probs: ``entries`` as in
    ``PromptLogprobs``, ``rows`` (step order) and the prompt token each row predicts. Made before
    the step runs: under tensor parallelism rank 0 sends the rows to the other ranks with the
    step's header (``row_bytes``), which project the same rows onto their vocabulary shards."""

    entries: list[tuple[Sequence, int, int]]
    rows: list[int]
    targets: list[int]

    def row_bytes(self) -> bytes:
        return array("q", self.rows).tobytes()

    @classmethod
    def of_rows(cls, data: bytes) -> "Plan":
        """A rank other than 0's plan: the rows alone."""
        return cls([], array("q", data).tolist(), [])


def plan(scheduled: list[tuple[Sequence, int]], wanted: set[Sequence]) -> Plan | None:
    """The prompt log-probs of the ``wanted`` sequences that a step of ``scheduled`` computes (each
    sequence's chunk starting at its ``num_computed_tokens``); None if it computes none."""
    entries, rows, targets = [], [], []
    t = 0
    for seq, n in scheduled:
        if seq in wanted:
            start, last = seq.num_computed_tokens, seq.num_prompt_tokens - 1
            lo, hi = max(start, len(seq.prompt_logprobs) - 1), min(start + n, last)
            if lo < hi:  # positions lo..hi-1 predict prompt tokens lo+1..hi
                entries.append((seq, lo + 1, hi - lo))
                rows.extend(range(t + lo - start, t + hi - start))
                targets.extend(seq.token_ids[lo + 1:hi + 1])
        t += n
    return Plan(entries, rows, targets) if entries else None


def compute(model, hidden: torch.Tensor, plan: Plan) -> PromptLogprobs | None:
    """The log-probs ``plan`` asks for, from the step's hidden states [tokens, H]. A
    tensor-parallel rank other than 0 projects the same rows onto its vocabulary shard for rank
    0's gather, and gets None."""
    dev = hidden.device
    rows_t = torch.tensor(plan.rows, dtype=torch.long).to(dev, non_blocking=True)
    targets_t = torch.tensor(plan.targets, dtype=torch.long).to(dev, non_blocking=True)
    k = max((s.params.prompt_logprobs or 0 for s, _, _ in plan.entries), default=0)
    chosen, top_v, top_i = [], [], []
    for i in range(0, len(plan.rows), SLICE_ROWS):
        logits = model.compute_logits(hidden.index_select(0, rows_t[i:i + SLICE_ROWS]))
        if logits is None:
            continue
        logp = torch.log_softmax(logits, dim=-1)
        chosen.append(logp.gather(1, targets_t[i:i + SLICE_ROWS, None]).squeeze(1))
        if k:
            v, idx = logp.topk(k, dim=-1)
            top_v.append(v)
            top_i.append(idx)
    if not plan.entries:
        return None
    return PromptLogprobs(plan.entries, torch.cat(chosen), torch.cat(top_v) if k else None,
                          torch.cat(top_i) if k else None).start_copy()
