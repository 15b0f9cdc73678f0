"""The records at kvray's seams."""
from kvray.records import Delta, RoutingHint, TokenBatch, hint_from_call


def test_hint_is_found_in_call_arguments():
    h = RoutingHint("r", 100, 50)
    assert hint_from_call(("id", [1], None), {"hint": h}) is h
    assert hint_from_call(("id", h), {}) is h
    assert hint_from_call((), {}) is None


def test_token_batches_merge_in_order():
    a = TokenBatch([1, 2], [-0.1, -0.2], [{1: -0.1}, {2: -0.2}], cached_tokens=16)
    b = TokenBatch([3], [-0.3], [{3: -0.3}], finish_reason="length", stop_reason=None, cached_tokens=16)
    m = a.merge(b)
    assert (m.ids, m.logprobs, m.top_logprobs, m.finish_reason) == ([1, 2, 3], [-0.1, -0.2, -0.3],
                                                                     [{1: -0.1}, {2: -0.2}, {3: -0.3}], "length")
    assert TokenBatch([1]).merge(TokenBatch([2])).logprobs is None
    d = Delta([5, 6], True, "stop", 7, num_cached_tokens=32)
    assert TokenBatch.of(d) == TokenBatch([5, 6], None, None, "stop", 7, 32)
    assert TokenBatch.of(Delta([5], False, "stop")).finish_reason is None  # only a finished delta ends it
