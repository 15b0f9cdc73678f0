"""One pre-norm decoder-only transformer, specialised per architecture by a few flags.

Llama, Qwen2 and Qwen3 differ only in where biases sit and whether q/k get a per-head RMSNorm:

=============  ==========================  ========  ==========
architecture   q/k/v bias                  o bias    q/k norm
=============  ==========================  ========  ==========
Llama          config.attention_bias       same      no
Qwen2          always                      never     no
Qwen3          config.attention_bias       same      yes
=============  ==========================  ========  ==========

Each model class picks the MLP of every layer (``make_mlp``: the gated MLP here; the MoE models
in ``moe.py`` return their sparse blocks) and says where each checkpoint tensor goes
(``checkpoint_layout``: here every tensor is the parameter of the same name).

Interface used by the model runner:

* ``model(input_ids [T], positions [T]) -> hidden [T, hidden_size]`` for a flattened batch;
  the paging metadata comes from the current forward context;
* ``model.compute_logits(hidden [N, H]) -> [N, vocab]`` float32 (``None`` on tensor-parallel ranks > 0);
* ``model.attention_layers()`` -> the ``Attention`` modules in layer order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kvray.replica.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, rope_parameters
from kvray.replica.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding
from kvray.replica.parallel.sharding import Split


@dataclass(frozen=True)
class ArchFlags:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


@dataclass(frozen=True)
class WeightSlot:
    """Where one checkpoint tensor goes: parameter ``param``, or its sub-tensor ``param[index]``
    (e.g. one expert's rows of a stacked expert weight); ``split``: the slice of the tensor that
    this tensor-parallel rank reads, when it is not its module's ``tp_split``."""
    param: str
    index: tuple = ()
    split: Split | None = None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_supported(config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: kvray's gated MLP implements 'silu'")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))}: kvray implements full attention only "
                         "(no sliding-window layers)")


class DecoderLayer(nn.Module):
    def __init__(self, config, flags: ArchFlags, rotary_dim: int, mlp: nn.Module, dtype: torch.dtype, device=None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            hidden, config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
            _head_dim(config), qkv_bias=flags.qkv_bias, o_bias=flags.o_bias, qk_norm=flags.qk_norm,
            rms_norm_eps=eps, rotary_dim=rotary_dim, dtype=dtype, device=device)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, rotary):
        """Pre-norm block with the residual carried separately, so each residual add is fused into
        the following RMSNorm. Returns (mlp output, residual stream so far)."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, positions, rotary)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """The ``model.*`` part of an HF causal LM: embeddings, layers, final norm."""

    def __init__(self, config, flags: ArchFlags, make_mlp: Callable[[int], nn.Module], dtype: torch.dtype, device=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        self.rotary_emb = RotaryEmbedding(rope_parameters(config), _head_dim(config), device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, flags, self.rotary_emb.rotary_dim, make_mlp(i), dtype, device)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, positions, self.rotary_emb)
        return self.norm(h, residual)[0]


class DecoderForCausalLM(nn.Module):
    """Base class; subclasses set ``flags_for(config)``."""

    @classmethod
    def flags_for(cls, config) -> ArchFlags:  # pragma: no cover - abstract
        raise NotImplementedError

    def __init__(self, config, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.dtype = dtype
        flags = self.flags_for(config)
        self.model = DecoderModel(config, flags, lambda i: self.make_mlp(config, i, flags, dtype, device), dtype, device)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, dtype, device,
                                      tied=self.model.embed_tokens if self.tie_word_embeddings else None)

    def make_mlp(self, config, layer: int, flags: ArchFlags, dtype: torch.dtype, device) -> nn.Module:
        """The MLP of layer ``layer``."""
        return GatedMLP(config.hidden_size, config.intermediate_size, flags.mlp_bias, dtype, device)

    def checkpoint_layout(self) -> dict[str, WeightSlot]:
        """Checkpoint tensor name -> where the loader puts it. Every parameter must be covered."""
        return {name: WeightSlot(name) for name, _ in self.named_parameters()}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [N, vocab]; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    def fuse_projections(self) -> None:
        """After loading: merge q/k/v and gate/up projections into single matmuls."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, config) -> ArchFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return ArchFlags(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=False)


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, config) -> ArchFlags:
        return ArchFlags(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def flags_for(cls, config) -> ArchFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return ArchFlags(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)

