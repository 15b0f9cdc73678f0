"""The least-load policy over the replica book, and the policy registry."""
import pytest
from helpers import hint, stats

from kvray.router.book import ReplicaBook
from kvray.router.least_load import LeastLoadPolicy
from kvray.router.policy import DISPATCH, make_policy, policy_names


def route(pol, book, h):
    d = pol.decide(h, book, book.now())
    assert d.action == DISPATCH
    return list(d.route)


def test_least_load_picks_the_least_outstanding_tokens():
    book = ReplicaBook()
    book.sync({"a": None, "b": None, "c": None})
    book.on_dispatch(hint(1000, 500, rid="1"), "a")
    book.on_dispatch(hint(100, 50, rid="2"), "b")
    pol = LeastLoadPolicy(affinity_slack_tokens=0, seed=0)
    assert route(pol, book, hint(10, 10)) == ["c", "b", "a"]


def test_dispatches_alternate_between_idle_replicas():
    book = ReplicaBook()
    book.sync({"a": None, "b": None})
    pol = make_policy("least_load", seed=1)
    counts = {"a": 0, "b": 0}
    for i in range(40):
        h = hint(100, 100, rid=str(i))
        rid = route(pol, book, h)[0]
        book.on_dispatch(h, rid)
        counts[rid] += 1
    assert counts == {"a": 20, "b": 20}


def test_prefix_affinity_only_when_balanced():
    pol = LeastLoadPolicy(affinity_slack_tokens=500, affinity_slack_ratio=0.0, seed=0)
    toks = list(range(256))
    book = ReplicaBook()
    book.sync({"a": None, "b": None})
    book.on_dispatch(hint(tokens=toks, decode=200, rid="warm"), "b")  # b: load 456, holds the prefix
    book.on_finish("warm")
    book.on_dispatch(hint(300, 0, rid="busy"), "b")  # b: 300 tokens busier than a
    h = hint(tokens=toks + [7] * 16, decode=10)
    assert route(pol, book, h)[0] == "b"  # within the slack: the cache wins
    book.on_dispatch(hint(400, 0, rid="busier"), "b")  # now 700 ahead of a
    assert route(pol, book, h)[0] == "a"  # imbalance: the load wins
    assert route(LeastLoadPolicy(prefix_affinity=False), book, h)[0] == "a"


def test_unhealthy_replicas_go_last():
    book = ReplicaBook()
    book.sync({"a": stats(1.0, healthy=False), "b": stats(1.0, outstanding=5000)})
    assert route(LeastLoadPolicy(), book, hint()) == ["b", "a"]


def test_a_retry_leaves_the_replicas_that_failed_it_out():
    book = ReplicaBook()
    book.sync({"a": None, "b": None, "c": None})
    book.on_dispatch(hint(1000, 0, rid="x"), "c")
    assert route(LeastLoadPolicy(seed=0), book, hint(avoid=("a", "b"))) == ["c"]


def test_policy_registry_and_options():
    assert {"least_load", "slo_aware", "round_robin", "p2c"} <= set(policy_names())
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("nope")
    with pytest.raises(TypeError):
        make_policy("least_load", bogus=1)
    with pytest.raises(ValueError):
        make_policy("least_load", affinity_slack_tokens=-1)
    book = ReplicaBook()
    assert LeastLoadPolicy().decide(hint(), book, 0.0).action == "reject"  # no replicas
