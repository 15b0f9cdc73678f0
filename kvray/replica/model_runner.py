"""Runs one scheduled step on the model: flatten, forward through the paged KV cache, sample."""
from __future__ import annotations

import logging

import numpy as np
import torch

from kvray.replica.config import EngineConfig
from kvray.replica.forward_context import ForwardContext, forward_context
from kvray.replica import prompt_logprobs
from kvray.replica.models.loader import checkpoint_quantization, load_model
from kvray.replica.prompt_logprobs import PromptLogprobs
from kvray.replica.sampler import Sampler, SampleResult
from kvray.replica.sequence import Sequence
from kvray.replica.step_inputs import StepInputBuilder
from kvray.replica.cuda_graphs import StepGraphs

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"invalid engine option device={device!r}: CUDA is not available on this machine")
    return dev


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


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler."""

    def __init__(self, config: EngineConfig, model_path, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = torch.float8_e4m3fn if config.fp8_kv_cache else dtype
        self.block_size = config.block_size
        check_fp8_device(config, model_path, device)
        self.model, self.hf_config = load_model(model_path, dtype, device, config.quantization)
        self.model.eval()
        self.model.fuse_projections()
        self.layers = self.model.attention_layers()
        self.sampler = Sampler(device, seed=config.seed)
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0

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
        """How many KV blocks fit: CPU by a fixed budget, CUDA by measuring the peak of a full step."""
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
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
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
        self.model.compute_logits(rows).softmax(-1)
        self.kv_cache = None
        for attn in self.layers:
            attn.k_cache = attn.v_cache = None

    # ---- one step --------------------------------------------------------------------------
    def prepare(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate the step buffers and, on CUDA unless enforce_eager, capture the CUDA graphs of
        every step shape (decode and mixed). Call after the KV cache is allocated."""
        max_blocks = -(-max_model_len // self.block_size)
        self.inputs = StepInputBuilder(self.device, self.block_size, max(max_num_batched_tokens, max_num_seqs),
                                       max_num_seqs, max_blocks)
        self.graphs = None
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.graphs = StepGraphs(self.model, self.inputs, max_num_seqs, max_num_batched_tokens, max_model_len)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], pending: dict[Sequence, int] | None = None,
                prev_tokens: torch.Tensor | None = None, prompt_lp: set[Sequence] | None = None,
                ) -> tuple[list[Sequence], SampleResult | None, PromptLogprobs | None]:
        """Launch the step; return the sequences that reached their end and the token sampled for each
        (still on the device, its copy to the host started), and the prompt log-probs of the
        sequences in ``prompt_lp`` that this step computes (``kvray.replica.prompt_logprobs``).
        ``pending``: sequences whose last token id is the row of ``prev_tokens`` given (async
        scheduling; see ``StepInputBuilder.build``)."""
        bucket = None
        if self.graphs is not None:
            num_tokens = sum(n for _, n in scheduled)
            bucket = self.graphs.bucket(num_tokens, len(scheduled))
        step = self.inputs.build(scheduled, pending, prev_tokens, bucket[:2] if bucket else None)
        if bucket is not None:
            hidden = self.graphs.replay(bucket, step.num_tokens)
        else:
            with forward_context(step.ctx):
                hidden = self.model(step.input_ids, step.positions)
        plp = prompt_logprobs.compute(self.model, hidden, scheduled, prompt_lp) if prompt_lp else None
        if not step.sample_seqs:
            return [], None, plp
        if step.sample_index is not None:
            hidden = hidden.index_select(0, step.sample_index)
        logits = self.model.compute_logits(hidden)
        return step.sample_seqs, self.sampler(logits, step.sample_seqs).start_copy(), plp
