"""Hand-built replica stats and requests for the router's pure-Python tests."""
from kvray.records import EngineStats, ReplicaStats, RoutingHint
from kvray.replica.block_hash import prefix_block_hashes


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def stats(t=999.0, *, outstanding=0, healthy=True, max_queued=0, **engine) -> ReplicaStats:
    """A replica's snapshot at wall time ``t``; ``engine`` sets EngineStats fields."""
    return ReplicaStats(engine=EngineStats(**engine), time=t, outstanding_tokens=outstanding, healthy=healthy,
                        max_queued_requests=max_queued)


def hint(n_prompt=100, decode=50, tokens=None, bs=16, rid="r", hashes=None, **kw) -> RoutingHint:
    if hashes is None:
        hashes = prefix_block_hashes(tokens, bs) if tokens is not None else []
    return RoutingHint(rid, n_prompt if tokens is None else len(tokens), decode, hashes, bs, **kw)
