"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral.

Both are the dense decoder (``decoder.py``) with a sparse block in place of the MLP in some or
all layers:

==================  ==================================  ===================================
                    Qwen3MoeForCausalLM                 MixtralForCausalLM
==================  ==================================  ===================================
attention           Qwen3 (q/k RMSNorm, GQA)            Llama (GQA, no bias)
experts / per token ``num_experts`` / ``num_experts_    ``num_local_experts`` /
                    per_tok``                           ``num_experts_per_tok``
expert width        ``moe_intermediate_size``           ``intermediate_size``
routing weights     softmax over all experts, top-k,    softmax over the k selected logits
                    renormalised iff ``norm_topk_prob``
dense layers        ``mlp_only_layers`` and layers i    none
                    with (i + 1) % ``decoder_sparse_
                    step`` != 0 (``intermediate_size``)
==================  ==================================  ===================================

The router (``gate``, [E, H], no bias) runs in the activation dtype like transformers'; the
softmax and top-k in float32 (``kvray.kernels.fused_moe``). Experts are stored stacked, as in
transformers 5: ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
``experts.down_proj`` [E, H, I]. Checkpoints on disk keep one tensor per expert and projection
(Qwen3: ``mlp.experts.<e>.{gate,up,down}_proj.weight``; Mixtral: ``block_sparse_moe.experts.<e>.
{w1,w3,w2}.weight`` and ``block_sparse_moe.gate.weight``); ``checkpoint_layout`` maps each onto
its slice of the stacked parameters.

Under tensor parallelism every rank holds every expert, each with an equal share of its
intermediate features (gate/up rows, down columns: the dense MLP's split, expert by expert); the
router is replicated, so the ranks route alike, and one all-reduce sums their partial outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvray import kernels
from kvray.replica.models.decoder import ArchFlags, WeightSlot
from kvray.replica.models.decoder import LlamaForCausalLM, Qwen3ForCausalLM
from kvray.replica.models.layers import GatedMLP, Linear, _empty
from kvray.replica.parallel.group import build_group
from kvray.replica.parallel.sharding import Split, even_split


@dataclass(frozen=True)
class MoeSpec:
    """The MoE shape of a config: which layers are sparse and what their experts look like."""
    num_experts: int
    top_k: int
    intermediate: int            # one expert's width
    renormalize: bool
    sparse_layers: tuple[int, ...]

    def expected_active_experts(self, batch_tokens: float) -> float:
        """Expected distinct experts a sparse layer reads for ``batch_tokens`` tokens, each routed to
        ``top_k`` distinct experts uniformly at random: E * (1 - (1 - k/E)^B)."""
        e, k = self.num_experts, self.top_k
        return e * (1.0 - (1.0 - k / e) ** max(0.0, batch_tokens))

    def params_per_expert(self, hidden: int) -> int:
        return 3 * hidden * self.intermediate


def _positive(config, field: str) -> int:
    value = getattr(config, field, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config field {field!r} must be a positive integer, got {value!r}")
    return value


def moe_spec(config) -> MoeSpec | None:
    """The :class:`MoeSpec` of a Qwen3-MoE or Mixtral config; None for a dense architecture."""
    archs = list(getattr(config, "architectures", None) or [])
    layers = config.num_hidden_layers
    if "MixtralForCausalLM" in archs or getattr(config, "model_type", None) == "mixtral":
        experts_field = "num_local_experts"
        sparse = tuple(range(layers))
        width, renorm = _positive(config, "intermediate_size"), True
    elif "Qwen3MoeForCausalLM" in archs or getattr(config, "model_type", None) == "qwen3_moe":
        experts_field = "num_experts" if hasattr(config, "num_experts") else "num_local_experts"
        step = _positive(config, "decoder_sparse_step")
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        if any(not isinstance(i, int) or not 0 <= i < layers for i in dense):
            raise ValueError(f"config field 'mlp_only_layers' must list layer indices in [0, {layers}), got "
                             f"{sorted(dense, key=str)}")
        sparse = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        width, renorm = _positive(config, "moe_intermediate_size"), bool(getattr(config, "norm_topk_prob", False))
    else:
        return None
    experts, top_k = _positive(config, experts_field), _positive(config, "num_experts_per_tok")
    if top_k > experts:
        raise ValueError(f"config field 'num_experts_per_tok' ({top_k}) exceeds {experts_field!r} ({experts})")
    return MoeSpec(experts, top_k, width, renorm, sparse)


class Experts(nn.Module):
    """E gated-MLP experts in two stacked parameters (transformers 5's names and layout); a
    tensor-parallel rank holds the intermediate features ``rows`` (gate/up) = ``cols`` (down)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device=None):
        super().__init__()
        group = build_group()
        start, local = even_split(intermediate, group.rank, group.size)
        self.gate_up_proj = _empty(num_experts, 2 * local, hidden, dtype=dtype, device=device)
        self.down_proj = _empty(num_experts, hidden, local, dtype=dtype, device=device)
        split = group.size > 1
        self.rows = Split(0, start, local, intermediate) if split else None
        self.cols = Split(1, start, local, intermediate) if split else None

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"experts={e}, hidden={h}, intermediate={two_i // 2}"


class SparseMoeBlock(nn.Module):
    """``sum_j w_j * expert_j(x)`` over each token's top-k experts, in one fused kernel call."""

    def __init__(self, hidden: int, spec: MoeSpec, dtype: torch.dtype, device=None):
        super().__init__()
        self.top_k, self.renormalize = spec.top_k, spec.renormalize
        self.group = build_group()
        self.gate = Linear(hidden, spec.num_experts, False, dtype, device)
        self.experts = Experts(spec.num_experts, hidden, spec.intermediate, dtype, device)

    def fuse(self) -> None:
        """Nothing to merge: the expert weights are stacked already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        return self.group.all_reduce(kernels.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, logits,
                                                       self.top_k, self.renormalize))


def expert_layout(model: nn.Module, proj_names: tuple[str, str, str], rename=lambda name: name
                  ) -> dict[str, WeightSlot]:
    """Checkpoint layout with one tensor per expert: ``<prefix>.experts.<e>.<gate|up|down>.weight``
    (``proj_names``) onto the stacked parameters; every other parameter under its own name.
    ``rename`` maps a parameter's module path to the checkpoint's."""
    gate, up, down = proj_names
    layout = {}
    for name, p in model.named_parameters():
        stem, _, leaf = name.rpartition(".")
        if not stem.endswith(".experts"):
            layout[rename(name)] = WeightSlot(name)
            continue
        prefix = rename(stem)
        experts = model.get_submodule(stem)
        for e in range(p.shape[0]):
            if leaf == "gate_up_proj":
                half = p.shape[1] // 2
                layout[f"{prefix}.{e}.{gate}.weight"] = WeightSlot(name, (e, slice(0, half)), experts.rows)
                layout[f"{prefix}.{e}.{up}.weight"] = WeightSlot(name, (e, slice(half, 2 * half)), experts.rows)
            else:
                layout[f"{prefix}.{e}.{down}.weight"] = WeightSlot(name, (e,), experts.cols)
    return layout


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, dtype: torch.dtype = torch.float32, device=None):
        if getattr(config, "use_sliding_window", False):
            raise ValueError("unsupported config field 'use_sliding_window': kvray implements full attention only")
        super().__init__(config, dtype, device)

    def make_mlp(self, config, layer: int, flags: ArchFlags, dtype: torch.dtype, device) -> nn.Module:
        spec = moe_spec(config)
        if layer in spec.sparse_layers:
            return SparseMoeBlock(config.hidden_size, spec, dtype, device)
        return GatedMLP(config.hidden_size, config.intermediate_size, False, dtype, device)

    def checkpoint_layout(self) -> dict[str, WeightSlot]:
        return expert_layout(self, ("gate_proj", "up_proj", "down_proj"))


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, config, dtype: torch.dtype = torch.float32, device=None):
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise ValueError(f"unsupported config field 'sliding_window' ({window}): kvray implements full attention "
                             "only")
        super().__init__(config, dtype, device)

    @classmethod
    def flags_for(cls, config) -> ArchFlags:
        return ArchFlags(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)

    def make_mlp(self, config, layer: int, flags: ArchFlags, dtype: torch.dtype, device) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, moe_spec(config), dtype, device)

    def checkpoint_layout(self) -> dict[str, WeightSlot]:
        return expert_layout(self, ("w1", "w3", "w2"), lambda name: name.replace(".mlp.", ".block_sparse_moe."))
