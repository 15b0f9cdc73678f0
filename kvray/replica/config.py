"""Engine options: the keyword arguments of ``kvray.LLM``, validated in one place."""
from __future__ import annotations

from dataclasses import dataclass

_POLICIES = ("fcfs", "deadline")
MAX_TENSOR_PARALLEL = 64
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    seed: int = 0
    scheduling_policy: str = "fcfs"
    attention_backend: str | None = None  # None: automatic; "reference" forces plain torch
    cpu_kv_cache_gib: float = 1.0  # KV budget when running on the CPU (per rank)
    # "fp8": quantize an unquantized checkpoint's linear layers to FP8 on load (per-channel weight
    # scales, dynamic per-token activations). FP8 checkpoints load as FP8 whatever this says.
    quantization: str | None = None
    # "fp8" (= "fp8_e4m3"): the KV cache in e4m3, half the bytes of bf16, so twice the tokens.
    kv_cache_dtype: str = "auto"
    # Tensor parallelism: the model's layers split over this many ranks (GPUs of one node, or CPU
    # processes with gloo), each holding 1/N of the weights and of the KV heads. Rank 0 is the
    # engine's own process; it starts the others (kvray.replica.parallel). docs/parallel.md.
    tensor_parallel_size: int = 1
    # One-step lookahead: schedule and launch step N+1 while the GPU runs step N (its decode input
    # ids gathered on the device from step N's sampled tokens), then read back and apply step N.
    # Hides the host's scheduling, input building and stop checks behind the GPU; output is
    # token-for-token that of the synchronous path (greedy and seeded sampling).
    async_scheduling: bool = True
    # The online engine's queue (``AsyncLLMEngine``, what a serving replica runs; offline
    # ``LLM.generate`` queues everything it is given): a request that would make more than
    # ``max_queued_requests`` requests, or more than ``max_queued_prompt_tokens`` prompt tokens,
    # wait for a batch slot is refused at once (the Router answers 429 with Retry-After) instead
    # of queueing without bound. None: ``max_num_seqs`` requests (one more batch's worth) and 16
    # steps' worth of prompt tokens (16 * max_num_batched_tokens).
    max_queued_requests: int | None = None
    max_queued_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid engine option {name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "must be a non-empty string (a checkpoint directory, hub id or kvray:<preset>)")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise bad("block_size", "must be one of 8, 16, 32, 64, 128")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise bad("max_num_seqs", "must be an integer >= 1")
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks", "max_queued_requests",
                     "max_queued_prompt_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(name, "must be a positive integer or null")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise bad("dtype", "must be auto, float32, float16 or bfloat16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        if self.scheduling_policy not in _POLICIES:
            raise bad("scheduling_policy", f"must be one of {', '.join(_POLICIES)}")
        if self.attention_backend not in (None, "reference", "triton"):
            raise bad("attention_backend", "must be null, 'reference' or 'triton'")
        if self.cpu_kv_cache_gib <= 0:
            raise bad("cpu_kv_cache_gib", "must be > 0")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= MAX_TENSOR_PARALLEL:
            raise bad("tensor_parallel_size", f"must be an integer from 1 to {MAX_TENSOR_PARALLEL}")
        if self.quantization not in (None, "fp8"):
            raise bad("quantization", "must be null or 'fp8'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}")

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype.startswith("fp8")
