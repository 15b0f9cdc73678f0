"""What the router knows about one request when it picks a replica (pure Python, no Ray).

The Router ingress builds a ``RoutingHint`` after tokenizing, and passes it as the ``hint``
keyword of the ``LLMReplica.generate`` handle call; the Serve request-router plug-in reads it
from the pending request, and the replica uses it for its own outstanding-token count.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoutingHint:
    request_id: str
    num_prompt_tokens: int
    # Generated tokens the router budgets for this request: min(max_tokens, the policy's cap).
    decode_estimate: int
    # Chained hashes of the prompt's full KV blocks (kvray.replica.block_hash).
    block_hashes: list[int] = field(default_factory=list)
    block_size: int = 16
    slo_class: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: float = 1.0
    arrival_time: float = 0.0  # wall clock (time.time()) when the router received the request
    # Route to exactly this replica (unique id) and leave it out of the load accounting: the
    # router's per-replica token channels use it. None: the policy chooses.
    pin_replica: str | None = None
    # Replicas (unique ids) not to route to: they refused this request or failed it before its
    # first token, and the Router is trying another (unless no other replica is left).
    avoid: tuple[str, ...] = ()

    def cost(self, cached_blocks: int = 0) -> int:
        """Outstanding tokens this request adds to a replica where ``cached_blocks`` prefix blocks hit."""
        uncached = max(0, self.num_prompt_tokens - cached_blocks * self.block_size)
        return uncached + self.decode_estimate


def hint_from_call(args, kwargs) -> RoutingHint | None:
    """Find the hint in a handle call's arguments (the plug-in sees args/kwargs only)."""
    h = kwargs.get("hint") if kwargs else None
    if isinstance(h, RoutingHint):
        return h
    for a in args or ():
        if isinstance(a, RoutingHint):
            return a
    return None
