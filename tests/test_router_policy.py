"""The router's pure-Python parts: the load book, the least-load policy, SLO classes, text streams."""
import pytest

from kvray.replica.block_hash import prefix_block_hashes
from kvray.router.hints import RoutingHint, hint_from_call
from kvray.router.load_book import LoadBook, ReplicaStats
from kvray.router.policy import LeastLoadPolicy, make_policy, policy_names
from kvray.router.slo import SLOError, SLOTarget, resolve_slo
from kvray.router.text_stream import TextStream


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def hint(n_prompt=100, decode=50, tokens=None, bs=16, rid="r"):
    hashes = prefix_block_hashes(tokens, bs) if tokens is not None else []
    return RoutingHint(rid, n_prompt if tokens is None else len(tokens), decode, hashes, bs)


# ---- load book ------------------------------------------------------------------------------------
def test_dispatch_and_completion_are_counted_at_once():
    clock = Clock()
    book = LoadBook(clock=clock)
    book.sync({"a": None, "b": None})
    book.on_dispatch("k1", "a", hint(100, 50))
    loads = {v.replica_id: v.load for v in book.views(["a", "b"])}
    assert loads == {"a": 150, "b": 0}
    book.on_complete("k1")
    assert {v.replica_id: v.load for v in book.views(["a", "b"])} == {"a": 0, "b": 0}
    book.on_complete("k1")  # twice is harmless
    book.on_complete("unknown")
    # a request rejected by "a" and then routed to "b": a's late completion does not count
    book.on_dispatch("k2", "b", hint(10, 10))
    book.on_complete("k2", "a")
    assert {v.replica_id: v.load for v in book.views(["a", "b"])} == {"a": 0, "b": 20}
    book.on_complete("k2", "b")
    assert {v.replica_id: v.load for v in book.views(["a", "b"])} == {"a": 0, "b": 0}


def test_snapshot_plus_dispatches_since_never_double_counts():
    clock = Clock(1000.0)
    book = LoadBook(clock=clock)
    book.on_dispatch("old", "a", hint(100, 100))  # t=1000
    clock.t = 1001.0
    # the replica's snapshot at t=1000.5 already counts "old" (and 300 tokens from other routers)
    book.update_stats("a", {"time": 1000.5, "outstanding_tokens": 500})
    assert book.views(["a"])[0].load == 500
    clock.t = 1002.0
    book.on_dispatch("new", "a", hint(10, 10))  # after the snapshot: added on top
    assert book.views(["a"])[0].load == 520
    book.on_complete("old")  # counted in the snapshot: subtracted from it
    assert book.views(["a"])[0].load == 320
    book.on_complete("new")
    assert book.views(["a"])[0].load == 300
    # a newer snapshot replaces the estimate; completions before it are not subtracted again
    clock.t = 1003.0
    book.update_stats("a", {"time": 1002.5, "outstanding_tokens": 250})
    assert book.views(["a"])[0].load == 250
    book.update_stats("a", {"time": 1001.0, "outstanding_tokens": 9999})  # stale broadcast: ignored
    assert book.views(["a"])[0].load == 250


def test_completion_before_a_late_snapshot_is_subtracted():
    clock = Clock(1000.0)
    book = LoadBook(clock=clock)
    book.on_dispatch("x", "a", hint(100, 0))  # t=1000
    clock.t = 1002.0
    book.on_complete("x")  # t=1002
    # a snapshot taken at 1001 (x still running there) arrives after x completed
    clock.t = 1003.0
    book.update_stats("a", {"time": 1001.0, "outstanding_tokens": 100})
    assert book.views(["a"])[0].load == 0


def test_sync_drops_gone_replicas_and_parses_stats():
    book = LoadBook()
    book.sync({"a": {"time": 1.0, "num_free_blocks": 10, "num_total_blocks": 40, "healthy": True}, "b": None})
    book.on_dispatch("k", "b", None)
    book.sync({"a": None})
    assert book.replica_ids() == ["a"]
    book.on_complete("k")
    snap = book.snapshot()
    assert snap["a"]["stats"]["num_free_blocks"] == 10
    assert ReplicaStats.from_dict(snap["a"]["stats"]).kv_usage == pytest.approx(0.75)


def test_prefix_memory_predicts_hits():
    book = LoadBook()
    toks = list(range(64))
    book.on_dispatch("k", "a", hint(tokens=toks))
    same_prefix = toks[:48] + [999] * 16
    views = {v.replica_id: v for v in book.views(["a", "b"], hint(tokens=same_prefix))}
    assert views["a"].prefix_blocks == 3 and views["b"].prefix_blocks == 0
    # the cost of a dispatch discounts the predicted cached blocks
    book.on_complete("k")
    book.on_dispatch("k2", "a", hint(tokens=same_prefix, decode=0))
    assert book.views(["a"])[0].load == 16


# ---- least-load policy ----------------------------------------------------------------------------
def test_least_load_picks_the_least_outstanding_tokens():
    book = LoadBook()
    book.on_dispatch("1", "a", hint(1000, 500))
    book.on_dispatch("2", "b", hint(100, 50))
    pol = LeastLoadPolicy(affinity_slack_tokens=0, seed=0)
    assert pol.rank(hint(10, 10), book.views(["a", "b", "c"])) == ["c", "b", "a"]


def test_dispatches_alternate_between_idle_replicas():
    book = LoadBook()
    pol = make_policy("least_load", seed=1)
    counts = {"a": 0, "b": 0}
    for i in range(40):
        h = hint(100, 100, rid=str(i))
        rid = pol.rank(h, book.views(["a", "b"], h))[0]
        book.on_dispatch(str(i), rid, h)
        counts[rid] += 1
    assert counts == {"a": 20, "b": 20}


def test_prefix_affinity_only_when_balanced():
    pol = LeastLoadPolicy(affinity_slack_tokens=500, affinity_slack_ratio=0.0, seed=0)
    toks = list(range(256))
    book = LoadBook()
    book.on_dispatch("warm", "b", hint(tokens=toks, decode=200))  # b: load 456, holds the prefix
    book.on_complete("warm")
    book.on_dispatch("busy", "b", hint(300, 0))  # b: 300 tokens busier than a
    h = hint(tokens=toks + [7] * 16, decode=10)
    assert pol.rank(h, book.views(["a", "b"], h))[0] == "b"  # within the slack: the cache wins
    book.on_dispatch("busier", "b", hint(400, 0))  # now 700 ahead of a
    assert pol.rank(h, book.views(["a", "b"], h))[0] == "a"  # imbalance: the load wins
    assert LeastLoadPolicy(prefix_affinity=False).rank(h, book.views(["a", "b"], h))[0] == "a"


def test_unhealthy_replicas_go_last():
    book = LoadBook()
    book.sync({"a": {"time": 1.0, "healthy": False}, "b": {"time": 1.0, "outstanding_tokens": 5000}})
    assert LeastLoadPolicy().rank(hint(), book.views(["a", "b"])) == ["b", "a"]


def test_policy_registry_and_options():
    assert "least_load" in policy_names()
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("nope")
    with pytest.raises(TypeError):
        make_policy("least_load", bogus=1)
    with pytest.raises(ValueError):
        make_policy("least_load", affinity_slack_tokens=-1)
    assert LeastLoadPolicy().admit(hint(), []) == (True, None)
    assert LeastLoadPolicy().rank(hint(), []) == []


def test_hint_is_found_in_call_arguments():
    h = hint()
    assert hint_from_call(("id", [1], None), {"hint": h}) is h
    assert hint_from_call(("id", h), {}) is h
    assert hint_from_call((), {}) is None


# ---- SLO classes ------------------------------------------------------------------------------------
CLASSES = {"interactive": SLOTarget("interactive", 500, 50), "batch": SLOTarget("batch", 10000, 200, 0.5)}


def test_slo_resolution_order():
    assert resolve_slo(CLASSES, "interactive").name == "interactive"
    assert resolve_slo(CLASSES, "interactive", body_class="batch").name == "batch"
    assert resolve_slo(CLASSES, "interactive", header_class="batch", body_class="interactive").name == "batch"
    t = resolve_slo(CLASSES, "interactive", header_ttft_ms="250")
    assert (t.name, t.ttft_ms, t.tpot_ms) == ("custom", 250.0, 50)
    t = resolve_slo(CLASSES, "interactive", body_class="batch", header_tpot_ms="20")
    assert (t.name, t.ttft_ms, t.tpot_ms, t.priority) == ("batch", 10000, 20.0, 0.5)
    with pytest.raises(SLOError) as e:
        resolve_slo(CLASSES, "interactive", header_class="gold")
    assert e.value.param == "x-slo-class"
    for bad in ("abc", "-1", "0", "inf"):
        with pytest.raises(SLOError):
            resolve_slo(CLASSES, "interactive", header_ttft_ms=bad)


def test_slo_attainment():
    t = CLASSES["interactive"]
    assert t.attained(0.4, 0.04) and t.attained(0.4, None)
    assert not t.attained(0.6, 0.01) and not t.attained(0.1, 0.06) and not t.attained(None, None)


# ---- text streams -----------------------------------------------------------------------------------
class CharTokenizer:
    """Token i is chr(i); enough for the detokenizer and stop-string logic."""

    def __len__(self):
        return 0x30000

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(s):
    return [ord(c) for c in s]


def test_text_stream_holds_back_a_possible_stop_string():
    ts = TextStream(CharTokenizer(), ids("p"), ["STOP"])
    out = ts.add(ids("hello S"), False)
    assert "S" not in out and out.startswith("hel")
    out += ts.add(ids("TO"), False)
    out += ts.add(ids("P and more"), False)
    assert ts.stop_string == "STOP" and out + ts.add([], True) == "hello "
    assert ts.add(ids("zzz"), True) == ""


def test_text_stream_without_stops_sends_everything():
    ts = TextStream(CharTokenizer(), [], None)
    assert ts.add(ids("ab"), False) + ts.add(ids("cd"), True) == "abcd"
    assert ts.stop_string is None
