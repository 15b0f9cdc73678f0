"""Runs one scheduled step on the model: flatten, forward through the paged KV cache, sample.

With tensor parallelism every rank has a ``ModelRunner`` over its shard of the model. Rank 0's
(the engine's) starts the others (``kvray.replica.parallel.launcher``) and drives them: what
sizes the KV cache or captures graphs runs on every rank at once (``_on_all_ranks``), and each
step's header goes to the others before rank 0 runs the step, whose inputs they receive by
broadcast (``follow`` on their side). Only rank 0 samples.
"""
from __future__ import annotations

import logging
import os
import resource

import numpy as np
import torch

from kvray.replica.config import EngineConfig
from kvray.replica.cuda_graphs import Bucket, StepGraphs
from kvray.replica.forward_context import ForwardContext, forward_context
from kvray.replica import prompt_logprobs
from kvray.replica.models.loader import checkpoint_quantization, load_config, load_model
from kvray.replica.parallel.group import SINGLE, ParallelGroup, connect
from kvray.replica.parallel.launcher import RankProcesses, WorkerSpec
from kvray.replica.parallel.lifecycle import RankFailure
from kvray.replica.parallel.model_check import check_model_splits
from kvray.replica.prompt_logprobs import PromptLogprobs
from kvray.replica.sampler import Sampler, SampleResult
from kvray.replica.sequence import Sequence
from kvray.replica.step_inputs import StepHeader, StepInputBuilder, StepInputs

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"invalid engine option device={device!r}: CUDA is not available on this machine")
    return dev


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: ``cuda:first+r`` (the GPUs this process sees: a replica's, as Ray
    assigned them), or the CPU for all."""
    if device.type != "cuda":
        return [device] * size
    first, seen = device.index or 0, torch.cuda.device_count()
    if first + size > seen:
        raise ValueError(f"invalid engine option tensor_parallel_size={size}: it needs {size} GPUs from cuda:{first} "
                         f"and this process sees {seen} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); a serving replica needs "
                         f"ray_actor_options.num_gpus: {size}")
    return [torch.device("cuda", first + r) for r in range(size)]


FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: FP8 tensor cores


def fp8_support_error(needs: list[str], capability: tuple[int, int], device_name: str) -> str | None:
    """Why this GPU cannot run what ``needs`` FP8 (None if it can or nothing does)."""
    if not needs or tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    return (f"{' and '.join(needs)} needs a GPU with FP8 support (compute capability >= 8.9: Ada, Hopper or "
            f"newer); {device_name} has compute capability {capability[0]}.{capability[1]}")


def check_fp8_device(config: EngineConfig, model_path, device: torch.device) -> None:
    """A clear error at startup when FP8 is asked for on a CUDA GPU without it (the CPU runs the
    reference path)."""
    if device.type != "cuda":
        return
    quant = checkpoint_quantization(model_path, config.quantization)
    needs = ([f"quantization ({quant.describe()})"] if quant is not None else []) + (
        [f"kv_cache_dtype={config.kv_cache_dtype}"] if config.fp8_kv_cache else [])
    error = fp8_support_error(needs, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    if error:
        raise ValueError(error)


def _rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    """Owns the model (this rank's shard of it), its paged KV cache and, on rank 0, the sampler."""

    def __init__(self, config: EngineConfig, model_path, dtype: torch.dtype, device: torch.device, rank: int = 0,
                 store_port: int = 0):
        self.config = config
        self.dtype = dtype
        self.kv_dtype = torch.float8_e4m3fn if config.fp8_kv_cache else dtype
        self.block_size = config.block_size
        self.ranks: RankProcesses | None = None
        size = config.tensor_parallel_size
        if size > 1:
            device = rank_devices(device, size)[rank] if rank == 0 else device
        self.device = device
        hf_config = load_config(model_path)  # (and transformers imported: not part of the load's memory)
        self.group = self._join(model_path, hf_config, rank, store_port)
        if size > 1 and device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
        check_fp8_device(config, model_path, device)
        rss_before = _rss_bytes()
        self.model, self.hf_config = load_model(model_path, dtype, device, config.quantization, group=self.group)
        self.load_report = self._load_report(rss_before)
        self.model.eval()
        self.model.fuse_projections()
        self.layers = self.model.attention_layers()
        self.sampler = Sampler(device, seed=config.seed) if rank == 0 else None
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.inputs: StepInputBuilder | None = None
        self.graphs: StepGraphs | None = None
        # every rank's load report (rank order): what each read of the checkpoint, its peak memory
        self.rank_load_reports = [self.load_report] + (self.ranks.replies("loading the model") if self.ranks else [])

    # ---- tensor parallelism ----------------------------------------------------------------
    def _join(self, model_path, hf_config, rank: int, store_port: int) -> ParallelGroup:
        """This rank's group; rank 0 first starts the other ranks."""
        size = self.config.tensor_parallel_size
        if size == 1:
            return SINGLE
        if rank:
            return connect(rank, size, self.device, store_port)
        check_model_splits(hf_config, size)
        devices = rank_devices(self.device, size)
        self.ranks = RankProcesses(WorkerSpec(self.config, str(model_path), self.dtype, str(self.device), 0, size, 0,
                                              os.getpid()), devices)
        self.ranks.replies("starting")  # alive and imported: they join now, as rank 0 does
        group = connect(0, size, self.device, self.ranks.store.port, store=self.ranks.store)
        self.ranks.watch_group(group)
        return group

    def _load_report(self, rss_before: int) -> dict:
        """What loading this rank's shard took: checkpoint bytes read, parameter bytes, how far the
        process's anonymous memory rose while loading (the parameters and the tensor in hand) and
        its peak resident memory (which also counts the checkpoint file's pages it mapped)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = {"rank": self.group.rank, "pid": os.getpid(), **self.model.load_stats,
                  "param_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                  "load_peak_rss_bytes": max(0, peak - rss_before)}
        if self.device.type == "cuda":
            report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return report

    def _on_all_ranks(self, name: str, *args) -> list:
        """``self.<name>(*args)`` on every rank at once (their collectives pair up); the results."""
        if self.ranks is None:
            return [getattr(self, name)(*args)]
        self.ranks.call(name, *args)
        try:
            mine = getattr(self, name)(*args)
        except Exception as e:
            if self.ranks.failure is not None:
                raise self.ranks.fail(e) from e
            raise
        return [mine] + self.ranks.replies(name)

    def close(self) -> None:
        """Stop the other ranks (rank 0; they would also die with this process)."""
        if self.ranks is not None:
            self.ranks.stop()

    # ---- KV cache --------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        per_layer = sum(2 * self.block_size * a.num_kv_heads * a.head_dim for a in self.layers)
        return per_layer * torch.tensor([], dtype=self.kv_dtype).element_size()

    @property
    def quantization_name(self) -> str | None:
        """How the linear layers are stored, in words (None: unquantized)."""
        quant = self.model.quantization
        return quant.describe() if quant is not None else None

    @property
    def kv_cache_dtype_name(self) -> str:
        return str(self.kv_dtype).removeprefix("torch.")

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The cache of ``num_blocks`` blocks, on every rank (each holds its KV heads' share)."""
        self._on_all_ranks("allocate_rank_kv_cache", num_blocks)

    def allocate_rank_kv_cache(self, num_blocks: int) -> None:
        """The paged cache of every layer. An FP8 cache gets per-KV-head scales of 1.0 (no checkpoint
        carries calibrated ones; e4m3 keeps ~2 significant digits from 2^-9 to 448, which K/V of
        normed activations stay within)."""
        a0 = self.layers[0]
        shape = (len(self.layers), 2, num_blocks, self.block_size, a0.num_kv_heads, a0.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        for i, attn in enumerate(self.layers):
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]
            if self.config.fp8_kv_cache:
                attn.k_scale = torch.ones(attn.num_kv_heads, dtype=torch.float32, device=self.device)
                attn.v_scale = torch.ones(attn.num_kv_heads, dtype=torch.float32, device=self.device)
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %s, %.2f GiB", num_blocks, self.block_size,
                    num_blocks * self.block_size, self.kv_cache_dtype_name,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)

    def profile_num_blocks(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
        """How many KV blocks fit on every rank (the least of the ranks' numbers: the scheduler's
        one block table indexes every rank's cache)."""
        return min(self._on_all_ranks("rank_num_blocks", max_num_batched_tokens, max_num_seqs, max_model_len))

    def rank_num_blocks(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
        """How many KV blocks fit on this rank: CPU by a fixed budget, CUDA by measuring the peak of a
        full step."""
        per_block = self.kv_bytes_per_block()
        if self.device.type != "cuda":
            return max(1, int(self.config.cpu_kv_cache_gib * 2**30) // per_block)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_step(max_num_batched_tokens, max_num_seqs, max_model_len)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()  # the largest step's activations go back: the graphs' pool takes its own
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = max(0, (total - free) - torch.cuda.memory_reserved(self.device))
        # The CUDA graphs keep a private pool as large as the largest step's activations, beside
        # the eager allocator's: count them twice when graphs will be captured.
        graphs = 0 if self.config.enforce_eager else peak - weights
        budget = total * self.config.gpu_memory_utilization - peak - graphs - non_torch
        budget = min(budget, free - 256 * 2**20)
        if budget <= per_block:
            raise ValueError(f"no GPU memory left for the KV cache: model+activations peak {peak / 2**30:.2f} GiB of "
                             f"{total / 2**30:.2f} GiB at gpu_memory_utilization={self.config.gpu_memory_utilization}")
        logger.info("memory profile: peak %.2f GiB (weights+activations), non-torch %.2f GiB, KV budget %.2f GiB",
                    peak / 2**30, non_torch / 2**30, budget / 2**30)
        return int(budget // per_block)

    @torch.inference_mode()
    def _dummy_step(self, num_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """A forward of the largest step, against a temporary KV cache, to find peak memory."""
        seq_len = min(num_tokens, max_model_len)
        num_seqs = max(1, num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_rank_kv_cache(num_seqs * blocks_per_seq)
        lens = [seq_len] * num_seqs
        ids = torch.randint(0, self.hf_config.vocab_size, (num_seqs * seq_len,), device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(num_seqs, -1)
        slots = (tables.long()[:, :, None] * self.block_size + torch.arange(self.block_size, device=self.device)).view(num_seqs, -1)[:, :seq_len]
        ctx = ForwardContext(slots.reshape(-1), tables,
                             torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=self.device),
                             torch.tensor(lens, dtype=torch.int32, device=self.device), seq_len, seq_len)
        with forward_context(ctx):
            hidden = self.model(ids, pos)
        rows = hidden[torch.arange(max_num_seqs, device=self.device) % hidden.shape[0]]
        logits = self.model.compute_logits(rows)  # None on ranks > 0 (gathered on rank 0)
        if logits is not None:
            logits.softmax(-1)
        self.kv_cache = None
        for attn in self.layers:
            attn.k_cache = attn.v_cache = None

    # ---- one step --------------------------------------------------------------------------
    def prepare(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate the step buffers and, on CUDA unless enforce_eager, capture the CUDA graphs of
        every step shape (decode and mixed), on every rank. Call after the KV cache is allocated."""
        self._on_all_ranks("prepare_rank", max_num_batched_tokens, max_num_seqs, max_model_len)

    def prepare_rank(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        max_blocks = -(-max_model_len // self.block_size)
        self.inputs = StepInputBuilder(self.device, self.block_size, max(max_num_batched_tokens, max_num_seqs),
                                       max_num_seqs, max_blocks, self.group)
        capture = self.device.type == "cuda" and not self.config.enforce_eager
        # Without capture, ranks > 0 keep the graphs' buckets only, to run what rank 0 replays
        # (a test emulates replays on the CPU) the way the replay computes it.
        self.graphs = StepGraphs(self.model, self.inputs, max_num_seqs, max_num_batched_tokens, max_model_len,
                                 capture=capture) if capture or self.group.rank else None

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], pending: dict[Sequence, int] | None = None,
                prev_tokens: torch.Tensor | None = None, prompt_lp: set[Sequence] | None = None,
                ) -> tuple[list[Sequence], SampleResult | None, PromptLogprobs | None]:
        """Launch the step; return the sequences that reached their end and the token sampled for each
        (still on the device, its copy to the host started), and the prompt log-probs of the
        sequences in ``prompt_lp`` that this step computes (``kvray.replica.prompt_logprobs``).
        ``pending``: sequences whose last token id is the row of ``prev_tokens`` given (async
        scheduling; see ``StepInputBuilder.build``). Under tensor parallelism a failure past the
        inputs is the engine's end (``RankFailure``): the ranks may be stuck halfway through the step."""
        if self.ranks is not None:
            self.ranks.check()
        bucket = None
        if self.graphs is not None:
            num_tokens = sum(n for _, n in scheduled)
            bucket = self.graphs.bucket(num_tokens, len(scheduled))
        step = self.inputs.build(scheduled, pending, prev_tokens, bucket)
        prompt = prompt_logprobs.plan(scheduled, prompt_lp) if prompt_lp else None
        if self.ranks is None:
            logits, plp = self._run(step, bucket, prompt)
        else:
            try:
                self.ranks.send_step(step.header.pack() + (prompt.row_bytes() if prompt is not None else b""))
                logits, plp = self._run(step, bucket, prompt)
            except RankFailure:
                raise
            except Exception as e:
                raise self.ranks.fail(e) from e
        if logits is None:
            return [], None, plp
        return step.sample_seqs, self.sampler(logits, step.sample_seqs).start_copy(), plp

    @torch.inference_mode()
    def follow(self, header: StepHeader, prompt_rows: bytes = b"") -> None:
        """A rank other than 0: the step rank 0 is running (``prompt_rows``: the rows of its prompt
        log-probs, ``prompt_logprobs.Plan.row_bytes``)."""
        bucket = Bucket(header.bucket_tokens, header.bucket_seqs, bool(header.bucket_decode)) \
            if header.bucket_tokens else None
        self._run(self.inputs.receive(header), bucket, prompt_logprobs.Plan.of_rows(prompt_rows) if prompt_rows else None)

    def _run(self, step: StepInputs, bucket: Bucket | None, prompt: prompt_logprobs.Plan | None
             ) -> tuple[torch.Tensor | None, PromptLogprobs | None]:
        """Every rank, in the same order: the step's forward (its inputs shared first), the prompt
        log-probs of ``prompt``, then the logits of the rows to sample. The logits and log-probs are
        rank 0's (gathered from every rank's vocabulary shard); None elsewhere, or when none."""
        if bucket is not None:
            hidden = self.graphs.replay(bucket, step.num_tokens)
        else:
            self.inputs.share(step.header.num_seqs)
            with forward_context(step.ctx):
                hidden = self.model(step.input_ids, step.positions)
        plp = prompt_logprobs.compute(self.model, hidden, prompt) if prompt is not None else None
        if not step.header.num_sampled:
            return None, plp
        if step.sample_index is not None:
            hidden = hidden.index_select(0, step.sample_index)
        return self.model.compute_logits(hidden), plp
