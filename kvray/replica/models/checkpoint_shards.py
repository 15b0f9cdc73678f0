"""Reading a checkpoint tensor lazily, and only the share of it a tensor-parallel rank holds.

``StoredTensor`` is one tensor of a safetensors file, not read yet. ``ShardReader`` reads what a
parameter needs of it: the whole tensor, or the slice that the parameter's layer holds
(``tp_split``, see ``kvray.replica.parallel.sharding``) through safetensors' ``get_slice``, which
reads that slice's bytes only. So a rank never holds more of the checkpoint than its shard plus
the tensor in hand. It counts the bytes it read (``bytes_read``) and tracks the process's
anonymous resident memory after each read (``peak_anon_bytes``: what the loaded parameters and
the tensor in hand hold, without the checkpoint file's pages, which the page cache shares), which
is how a test shows it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvray.replica.parallel.sharding import Split


class StoredTensor:
    """Tensor ``name`` of an open safetensors file (``safe_open``), read on demand."""

    def __init__(self, handle, name: str):
        self._f, self.name = handle, name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._f.get_slice(self.name).get_shape())

    def read(self, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        return self._f.get_tensor(self.name) if index is None else self._f.get_slice(self.name)[index]


class ShardReader:
    """Reads, for each parameter of ``model``, its share of the checkpoint tensor."""

    def __init__(self, model: torch.nn.Module):
        self.splits: dict[str, Split] = {f"{name}.": m.tp_split for name, m in model.named_modules()
                                         if getattr(m, "tp_split", None) is not None}
        self.bytes_read = 0
        self.peak_anon_bytes = anon_rss_bytes()

    def _count(self, tensor: torch.Tensor) -> None:
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_rss_bytes())

    def read(self, stored, param_name: str, param: torch.Tensor, split: Split | None = None) -> torch.Tensor:
        """``stored`` (a ``StoredTensor``, or a tensor already in memory) as ``param_name`` (or the part
        ``param`` of it) needs it: its layer's slice (or ``split``'s), padded with zeros to the
        parameter's length (vocabulary padding)."""
        split = split or self.splits.get(param_name.rsplit(".", 1)[0] + ".")
        if split is None:
            tensor = stored.read() if isinstance(stored, StoredTensor) else stored
            self._count(tensor)
            return tensor
        shape = tuple(stored.shape)
        d = split.dim
        if len(shape) == param.dim() > d and param.shape[d] >= split.length:  # split element by element
            full = list(param.shape)
            full[d] = split.full
            if list(shape) != full:
                raise ValueError(f"shape mismatch for tensor {param_name!r}: checkpoint has {list(shape)}, the model "
                                 f"(from config.json) expects {full}")
        block = getattr(param, "block", None)  # (rows, columns) per entry: FP8 block scales
        try:
            index = split.index(shape, block[d] if block is not None else None)
        except ValueError as e:
            raise ValueError(f"tensor {getattr(stored, 'name', param_name)!r}: {e}") from None
        if index is None:
            tensor = stored.read() if isinstance(stored, StoredTensor) else stored
        else:
            tensor = stored.read(index) if isinstance(stored, StoredTensor) else stored[index]
        self._count(tensor)
        if index is not None and tensor.dim() == param.dim() and tensor.shape[d] < param.shape[d]:
            pad = [0, 0] * tensor.dim()
            pad[2 * (tensor.dim() - 1 - d) + 1] = param.shape[d] - tensor.shape[d]
            tensor = F.pad(tensor, pad)
        return tensor


def anon_rss_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon``; 0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
