"""The engine core: one step at a time (the offline API, ``LLM``, is in ``kvray.replica.llm``)."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque

from kvray.records import EngineStats, RequestSnapshot
from kvray.replica.block_manager import BlockManager
from kvray.replica.config import EngineConfig
from kvray.replica.detokenizer import FastDecoder, TextStream
from kvray.replica.grammar import Compiling, GrammarCache
from kvray.replica.model_runner import ModelRunner, resolve_device
from kvray.replica.models.loader import load_config, load_tokenizer, resolve_dtype, resolve_model
from kvray.replica.outputs import RequestOutput
from kvray.replica.parallel.lifecycle import RankFailure
from kvray.replica.sampling_params import SamplingParams
from kvray.replica.sampler import SampleResult
from kvray.replica.scheduler import Scheduler, SchedulerOutput
from kvray.replica import deadline_policy  # noqa: F401  (registers the "deadline" policy)
from kvray.replica.scheduling_policy import make_policy
from kvray.replica.sequence import Sequence, SequenceStatus, validate_prompt
from kvray.replica.step_record import Launched, StepRecord, can_look_ahead
from kvray.replica.stopping import stop_reason
from kvray.step_cost import StepTimeModel, prior_for_shape, shape_of

logger = logging.getLogger(__name__)

STEP_HISTORY = 256
PLACEHOLDER = -1  # the host's id of a token sampled by the step in flight, until it is read back
# A step that raises fails the requests it carried and the loop goes on; this many failed steps
# in a row mean the engine itself is broken (a CUDA error is sticky), and step() raises.
MAX_STEP_FAILURES = 3
# The step budget with chunked prefill (max_num_batched_tokens unset): the largest prefill chunk a
# step carries next to the running decodes. Measured on an H200 with qwen3-0.6b and CUDA graphs
# (benchmarks/profile_step.py --chunks; benchmarks/RESULTS.md, "Step budget"): see the figures
# there. Larger chunks barely raise prefill throughput (the GEMMs are already compute bound at 2k
# tokens) but every decode in such a step waits for the whole chunk, so TPOT grows with it.
DEFAULT_STEP_TOKENS = 2048


class LLMEngine:
    """Scheduler + block manager + model runner. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig):
        t_start = time.monotonic()
        self.config = config
        path = resolve_model(config.model)
        hf_config = load_config(path)
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, hf_config, self.device)
        if config.attention_backend is not None:
            from kvray import kernels
            if hasattr(kernels, "set_attention_backend"):
                kernels.set_attention_backend(config.attention_backend)
        self.runner = ModelRunner(config, path, dtype, self.device)
        self.hf_config = self.runner.hf_config
        self.tokenizer = load_tokenizer(path)
        self.decoder = FastDecoder.wrap(self.tokenizer)  # what the requests with stop strings detokenize with
        self.model_path = path
        self.vocab_size = self.hf_config.vocab_size
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"invalid engine option max_model_len={config.max_model_len}: the model supports at most {limit} positions")
        self.max_model_len = config.max_model_len or limit
        self.max_num_batched_tokens = config.max_num_batched_tokens or (
            max(DEFAULT_STEP_TOKENS, config.max_num_seqs) if config.enable_chunked_prefill
            else max(self.max_model_len, config.max_num_seqs))
        if not config.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("invalid engine option max_num_batched_tokens: without chunked prefill it must be >= max_model_len")
        num_blocks = config.num_kv_blocks or self.runner.profile_num_blocks(
            self.max_num_batched_tokens, config.max_num_seqs, self.max_model_len)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len="
                             f"{self.max_model_len}: raise num_kv_blocks/gpu_memory_utilization or lower max_model_len")
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.prepare(self.max_num_batched_tokens, config.max_num_seqs, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # The step-cost model, fitted from every step this engine runs: the deadline policy sizes
        # prefill chunks with it, and the stats publish it to the router and the autoscaler. Its
        # prior is the fit recorded for this model shape (kvray/step_coeffs), if there is one.
        self.step_cost = StepTimeModel.online(prior_for_shape(shape_of(self.hf_config, dtype)))
        self.policy = make_policy(config.scheduling_policy)
        if hasattr(self.policy, "cost"):
            self.policy.cost = self.step_cost
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens,
                                   max_model_len=self.max_model_len, policy=self.policy,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self.eos_token_ids = self._eos_ids()
        self.step_history: deque[StepRecord] = deque(maxlen=STEP_HISTORY)
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._inflight: Launched | None = None  # the step launched, not yet completed (async scheduling)
        self._last_step_end = 0.0
        self._step_failures = 0
        self.grammars: GrammarCache | None = None  # made when the first structured-outputs request comes
        self._compiling = Compiling()  # requests whose grammar is being compiled (not scheduled yet)
        self._prompt_lp: set[Sequence] = set()  # requests whose prompt log-probs are still to compute
        logger.info("engine ready in %.1f s: model=%s device=%s dtype=%s quantization=%s max_model_len=%d KV=%d tokens "
                    "(%s), step budget %d tokens", time.monotonic() - t_start, config.model, self.device, dtype,
                    self.runner.quantization_name, self.max_model_len, num_blocks * config.block_size,
                    self.runner.kv_cache_dtype_name, self.max_num_batched_tokens)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = None
        try:
            from transformers import GenerationConfig
            gen_eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except (OSError, ValueError):
            pass
        for e in (gen_eos, getattr(self.hf_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(e, int):
                ids.add(e)
            elif e:
                ids.update(int(x) for x in e)
        return ids

    # ---- requests --------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def make_sequence(self, request_id: str | None, prompt_token_ids: list[int], params: SamplingParams,
                      arrival_time: float | None = None, prompt: str | None = None) -> Sequence:
        """Validate a request and build its Sequence; raises ValueError before touching shared state."""
        params.check()  # validated once: at construction, or here if changed since
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)
        seq = Sequence(request_id, prompt_token_ids, params, self.config.block_size, arrival_time, prompt)
        if params.stop_strings:
            seq.detokenizer = TextStream(self.decoder, prompt_token_ids, params.stop_strings)
        if params.structured_outputs is not None:
            seq.grammar = self._grammar_cache().state(params.structured_outputs)
            if seq.grammar.ready():
                seq.grammar.start()  # compiled before (or known bad: GrammarError, a ValueError)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        if seq.needs_prompt_logprobs:
            self._prompt_lp.add(seq)
        if seq.grammar is not None and seq.grammar.matcher is None:
            self._compiling.add(seq)  # scheduled once its grammar is compiled (off this thread)
        else:
            self.scheduler.add(seq)

    def _grammar_cache(self) -> GrammarCache:
        if self.grammars is None:
            self.grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_token_ids)
            self.runner.sampler.grammars = self.grammars
        return self.grammars

    def _take_compiled(self) -> list[Sequence]:
        """Schedule the requests whose grammar is now compiled; fail those whose compile failed
        (returned)."""
        ready, failed = self._compiling.take(idle=not self.scheduler.has_unfinished() and self._inflight is None)
        for seq in ready:
            self.scheduler.add(seq)
        for seq, error in failed:
            self._fail(seq, error)
        return [seq for seq, _ in failed]

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            seq = self._seqs.get(request_id)
            if seq is None or seq.is_finished:
                return None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        seq.metrics.finished_time = time.monotonic()
        self._seqs.pop(request_id, None)
        return seq

    def has_unfinished(self) -> bool:
        """Requests are queued, compiling or running, or a step is in flight (async scheduling)."""
        return self._inflight is not None or self.scheduler.has_unfinished() or bool(self._compiling)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one step. Returns the sequences that gained a token or finished.

        A request can never take the engine down: what fails while handling one sequence (its
        stop checks, its detokenizer) fails that sequence alone, and a step that raises as a
        whole fails the sequences it was running (``seq.error`` says why; they end as
        ``"abort"``) while waiting requests carry on. Only ``MAX_STEP_FAILURES`` failed steps in
        a row raise from here, and a lost tensor-parallel rank (``RankFailure``) at once.
        """
        failed = self._take_compiled() if self._compiling else []
        try:
            done = failed + self._step()
        except RankFailure:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the step: fail its requests, not the engine
            self._step_failures += 1
            if self._step_failures >= MAX_STEP_FAILURES:
                raise
            logger.exception("engine step failed; failing the requests it ran")
            return self._fail_running(e)
        self._step_failures = 0
        return done

    def _fail_running(self, error: BaseException) -> list[Sequence]:
        """After a failed step: end every sequence it may have touched (the running ones, and
        any holding a placeholder for a token that will never be read)."""
        self._inflight = None
        sched = self.scheduler
        touched = list(sched.running) + [s for s in sched.waiting if s.token_ids and s.token_ids[-1] == PLACEHOLDER]
        for seq in touched:
            self._fail(seq, error)
        return touched

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """End one request with an error; its blocks are freed at once."""
        if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
        seq.error = f"{type(error).__name__}: {error}"
        self.scheduler.abort(seq.request_id)
        seq.finish_reason = "abort"
        seq.metrics.finished_time = time.monotonic()
        self._seqs.pop(seq.request_id, None)

    def _step(self) -> list[Sequence]:
        """One step; see ``step``.

        With ``async_scheduling`` the step completed here is the one the previous call launched
        (the first call launches one itself). Before waiting for its tokens, this call schedules
        and launches the next step, assuming every sequence sampled in the step in flight gains
        one token (a placeholder id on the host, gathered from the sampled-token tensor on the
        device), so scheduling, input building and the stop checks overlap the GPU. A sequence
        that then finishes has its token from the next step discarded.
        """
        prev, self._inflight = self._inflight, None
        if prev is None:
            prev = self._launch(self.scheduler.schedule())
            if prev is None:
                return []
            self.scheduler.update_after_step(prev.out)  # overlaps the GPU
        pending: dict[Sequence, int] = {}
        nxt = None
        if self.config.async_scheduling and can_look_ahead(prev):
            pending = self._reserve_next_tokens(prev)
            nxt = self._launch(self.scheduler.schedule(), prev.result, pending)
        done = self._complete(prev, pending)
        if nxt is not None:  # after _complete: the placeholders hold real ids again (prefix-cache hashes)
            self.scheduler.update_after_step(nxt.out)
            self._inflight = nxt
        return done

    def _launch(self, out: SchedulerOutput, prev: SampleResult | None = None,
                pending: dict[Sequence, int] | None = None) -> Launched | None:
        if not out.scheduled:
            return None
        t0 = time.monotonic()
        wanted = self._prompt_lp
        if wanted:  # forget those done, finished or aborted
            wanted = self._prompt_lp = {s for s in wanted if s.needs_prompt_logprobs and not s.is_finished}
        sample_seqs, result, plp = self.runner.execute(out.scheduled, pending, prev.token_ids if pending else None,
                                                       wanted)
        return Launched(out, sample_seqs, result, t0, plp)

    def _reserve_next_tokens(self, prev: Launched) -> dict[Sequence, int]:
        """Give each sequence sampled in ``prev`` that cannot finish on that token a placeholder
        for it (so the scheduler grants it its next decode); map it to its row of the samples."""
        pending: dict[Sequence, int] = {}
        max_len = self.max_model_len
        running = SequenceStatus.RUNNING
        for row, seq in enumerate(prev.sample_seqs):
            if seq.status is not running:
                continue  # finished or aborted: the token is discarded
            tokens = seq.token_ids
            n = len(tokens) + 1  # with that token
            if n >= max_len or n - seq.num_prompt_tokens >= seq.params.max_tokens:
                continue  # that token ends it: nothing to schedule
            if seq.grammar is not None:
                # its grammar must see that token before it masks the next one: the request sits
                # out the step launched now (the others keep the look-ahead) and joins the next
                continue
            tokens.append(PLACEHOLDER)
            pending[seq] = row
        return pending

    def _complete(self, step: Launched, pending: dict[Sequence, int]) -> list[Sequence]:
        """Wait for the step's tokens (the one sync), append them and apply the stop checks."""
        result = step.result
        if result is not None:
            result.resolve()
        if step.prompt_lp is not None:  # before the first token: its output carries them
            step.prompt_lp.apply()
        now = time.monotonic()
        done = []
        for i, seq in enumerate(step.sample_seqs):
            if seq.is_finished:
                continue  # finished at the previous step or aborted since: the token is discarded
            try:
                self._append_token(seq, result, i, now, seq in pending)
            except Exception as e:  # noqa: BLE001 - this request's own failure (stop checks, detokenizer)
                logger.exception("request %s failed", seq.request_id)
                self._fail(seq, e)
            done.append(seq)
        duration = now - max(step.t_launch, self._last_step_end)
        self._last_step_end = now
        out = step.out
        self.step_history.append(StepRecord(now, duration, out.num_batched_tokens, out.num_context_tokens,
                                            len(out.scheduled)))
        self.step_cost.observe(out.num_batched_tokens, out.num_context_tokens, len(out.scheduled), duration)
        return done

    def _append_token(self, seq: Sequence, result: SampleResult, row: int, now: float, placeholder: bool) -> None:
        token = result.token_ids[row]
        if placeholder:
            seq.token_ids[-1] = token
        else:
            seq.token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(result.logprobs[row])
            if seq.top_logprobs is not None:
                seq.top_logprobs.append(result.top_logprobs[row])
        reason, stop = stop_reason(seq, token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            seq.stop_reason = stop
            seq.metrics.finished_time = now
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.request_id, None)

    # ---- introspection ---------------------------------------------------------------------
    def output_text(self, seq: Sequence) -> str:
        if seq.detokenizer is not None:
            return seq.detokenizer.text
        return self.tokenizer.decode([t for t in seq.output_token_ids if t < len(self.tokenizer)],
                                     skip_special_tokens=True)

    def make_output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=seq.output_token_ids,
            text=self.output_text(seq), finished=seq.is_finished, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            top_logprobs=list(seq.top_logprobs) if seq.top_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, metrics=seq.metrics, prompt=seq.prompt,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None)

    def stats(self) -> EngineStats:
        return self.scheduler.stats(self.step_cost)

    def request_snapshots(self) -> list[RequestSnapshot]:
        """The in-flight requests, for the autoscaler's attainment prediction (monotonic clock)."""
        return self.scheduler.request_snapshots()
