"""Which part of each weight a tensor-parallel rank holds (Megatron-style):

* column-parallel linears (q/k/v, gate/up) hold a slice of the output rows; row-parallel ones
  (o, down) a slice of the input columns, and their outputs are summed over the ranks;
* attention heads are split evenly; KV heads too when there are at least as many as ranks,
  otherwise each rank holds the one KV head its query heads read (replicated over
  ``size / num_key_value_heads`` ranks);
* the vocabulary (embedding and lm_head rows) in contiguous ranges of ``ceil(vocab / size)``
  rows, the last one shorter when the vocabulary does not divide (its padding rows stay zero).

A layer that holds a slice carries a ``Split`` (``tp_split``): the checkpoint loader reads only that
slice of each of its tensors (``safetensors``' ``get_slice``), never the whole tensor.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """A layer's share of its full weight: ``[start, start + length)`` of ``full`` along ``dim``
    (0: output rows, 1: input columns). The layer's parameters may be longer along ``dim``
    (vocabulary padding): the rest stays zero."""

    dim: int
    start: int
    length: int
    full: int

    def index(self, shape: tuple[int, ...], block: int | None = None) -> tuple[slice, ...] | None:
        """What a rank reads of a checkpoint tensor of ``shape`` that belongs to the layer: its
        slice along ``dim``; None (all of it) for a tensor that is not split there (a row-parallel
        layer's bias, a per-tensor scale). A tensor with one entry per ``block`` features along
        ``dim`` (FP8 block scales): the blocks of the slice, which must be whole blocks."""
        if len(shape) <= self.dim or shape[self.dim] == 1:
            return None
        n = shape[self.dim]
        start, length = self.start, self.length
        if n != self.full:
            if block is None or n != -(-self.full // block):
                raise ValueError(f"a tensor of shape {list(shape)} cannot be split over tensor-parallel ranks: "
                                 f"{n} entries along dim {self.dim} for {self.full} features")
            if start % block or (length % block and start + length != self.full):
                raise ValueError(f"a tensor-parallel shard [{start}, {start + length}) of {self.full} features is not "
                                 f"made of whole blocks of {block} (the checkpoint's block scales)")
            start, length = start // block, -(-length // block)
        index = [slice(None)] * len(shape)
        index[self.dim] = slice(start, start + length)
        return tuple(index)


def even_split(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of rank's equal share of ``total`` (which ``size`` divides)."""
    n = total // size
    return rank * n, n


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, KV heads) of a rank: an equal share, or the one head its query heads use."""
    if num_kv_heads >= size:
        return even_split(num_kv_heads, rank, size)
    return rank * num_kv_heads // size, 1


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(first row, rows held, rows allocated) of a rank's vocabulary shard."""
    per = -(-vocab_size // size)
    start = min(rank * per, vocab_size)
    return start, min(per, vocab_size - start), per


def check_tensor_parallel(hf_config, size: int, expert_width: tuple[str, int] | None = None) -> None:
    """A ValueError naming the config field when the model cannot be split over ``size`` ranks.
    ``expert_width``: (field, width) of a mixture-of-experts model's experts."""
    if size == 1:
        return
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    why = None
    if heads % size:
        why = f"num_attention_heads={heads} is not divisible by it"
    elif kv % size and size % kv:
        why = f"num_key_value_heads={kv} neither divides it nor is divisible by it"
    elif hf_config.intermediate_size % size:
        why = f"intermediate_size={hf_config.intermediate_size} is not divisible by it"
    elif expert_width is not None and expert_width[1] % size:
        why = f"{expert_width[0]}={expert_width[1]} is not divisible by it"
    if why:
        raise ValueError(f"invalid engine option tensor_parallel_size={size}: the model's {why} "
                         "(each rank holds an equal share of the heads and of the MLP or of every expert)")
