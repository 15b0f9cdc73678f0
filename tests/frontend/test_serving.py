"""The Router's OpenAI layer without Ray: a fake replica stream behind ``OpenAIServing``.

Covers what is hard to provoke through a live app: a replica failing mid-stream, admission
refusals (429), stop strings cut on the router side, and the exact response shapes.
"""
import asyncio
import json
import threading

import pytest

from kvray.frontend.prepare import INLINE_TOKENIZE_CHARS, ModelInfo
from kvray.frontend.serving import OpenAIServing
from kvray.metrics import MemorySink, RouterMetrics
from kvray.records import Refusal, TokenBatch
from kvray.replica.models.loader import load_tokenizer, resolve_model
from kvray.router.book import ReplicaBook
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH, REJECT, Decision, RoutingPolicy
from kvray.slo import SLOTarget


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("kvray:tiny-qwen3"))


class FakeStream:
    def __init__(self, batches, fail_after=None):
        self.batches = list(batches)
        self.fail_after = fail_after
        self.n = 0
        self.closed = None

    async def __anext__(self):
        if self.fail_after is not None and self.n >= self.fail_after:
            raise ConnectionError("replica died")
        if not self.batches:
            raise StopAsyncIteration
        self.n += 1
        await asyncio.sleep(0)
        return self.batches.pop(0)

    def close(self, abort):
        self.closed = abort


def batch(ids, finish=None, lp=None):
    return TokenBatch(ids, lp, None, finish)


class ScriptedPolicy(RoutingPolicy):
    """A policy whose decisions a test writes: ``decide`` pops them (or dispatches to ``default``)."""

    name = "scripted"

    def __init__(self, decisions=(), default="r1"):
        self.decisions, self.default, self.seen = list(decisions), default, []

    def decide(self, request, book, now):
        self.seen.append(request.request_id)
        return self.decisions.pop(0) if self.decisions else Decision(DISPATCH, (self.default,))


class FakeClient:
    """The replica client: ``send`` records each call ``(request id, prompt, params, hint)`` and
    returns ``factory()``'s stream; ``bound_to`` (if set) is the replica that says it took the
    next request sent."""

    def __init__(self, factory, bound_to=None):
        self.factory, self.bound_to, self.calls = factory, bound_to, []

    def send(self, hint, prompt_token_ids, params, on_bound=None):
        self.calls.append((hint.request_id, prompt_token_ids, params, hint))
        if self.bound_to is not None:
            on_bound(self.bound_to)
            self.bound_to = None
        return self.factory()


def serving(tok, stream_factory, policy=None, replicas=("r1", "r2"), info=None, bound_to=None):
    metrics = RouterMetrics("tiny", "router-1", MemorySink())
    client = FakeClient(stream_factory, bound_to)
    book = ReplicaBook()
    book.sync({r: None for r in replicas})
    s = OpenAIServing(info=info or ModelInfo(tok, 128, 16, len(tok)), model_names=["tiny"],
                      slo_classes={"interactive": SLOTarget("interactive", 500, 50)},
                      default_slo_class="interactive", decode_estimate_cap=64, client=client, metrics=metrics,
                      dispatcher=Dispatcher(book, policy or ScriptedPolicy()))
    return s, client.calls, metrics


async def body_of(resp):
    if hasattr(resp, "body_iterator"):
        return b"".join([c async for c in resp.body_iterator])
    return resp.body


def run(coro):
    return asyncio.run(coro)


def test_completion_json_and_request_mapping(tok):
    ids = tok("hello world, this is kvray").input_ids
    streams = []

    def factory():
        streams.append(FakeStream([batch(ids[:2], lp=[-0.1, -0.2]), batch(ids[2:4], "length", lp=[-0.3, -0.4])]))
        return streams[-1]

    s, calls, _ = serving(tok, factory)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "temperature": 0, "seed": 7, "logprobs": 0,
            "stop": ["zzz"]}
    resp = run(s.handle("completions", json.dumps(body).encode(), {}))
    out = json.loads(run(body_of(resp)))
    assert resp.status_code == 200 and out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == tok.decode(ids[:4], skip_special_tokens=True)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["logprobs"]["token_logprobs"] == [
        -0.1, -0.2, -0.3, -0.4]
    rid, prompt_ids, params, hint = calls[0]
    assert prompt_ids == tok("abc").input_ids and params.max_tokens == 4 and params.seed == 7
    assert params.temperature == 0 and params.stop == ["zzz"] and params.slo.name == "interactive" and hint.slo is params.slo
    assert hint.decode_estimate == 4 and hint.num_prompt_tokens == len(prompt_ids) and rid == hint.request_id
    assert streams[0].closed is False  # finished normally: nothing to abort


def test_sse_chat_with_usage(tok):
    ids = tok(" one two three").input_ids
    s, _, _ = serving(tok, lambda: FakeStream([batch(ids[:1]), batch(ids[1:], "stop")]))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    resp = run(s.handle("chat", json.dumps(body).encode(), {}))
    raw = run(body_of(resp)).decode()
    events = [e[6:] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == tok.decode(ids)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)


def test_stop_string_is_cut_by_the_router(tok):
    ids = tok(" alpha beta STOP gamma delta").input_ids
    stream = FakeStream([batch([t]) for t in ids] + [batch([], "length")])
    s, _, _ = serving(tok, lambda: stream)
    body = {"prompt": "x", "max_tokens": 20, "stop": "STOP", "stream": True}
    raw = run(body_of(run(s.handle("completions", json.dumps(body).encode(), {})))).decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == " alpha beta " and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert stream.closed is True  # the engine had not stopped yet: the router aborts it


def test_replica_failure_mid_stream_and_before_output(tok):
    ids = tok(" a b c").input_ids
    s, _, metrics = serving(tok, lambda: FakeStream([batch(ids[:1]), batch(ids[1:2])], fail_after=2))
    raw = run(body_of(run(s.handle("completions", b'{"prompt": "x", "stream": true}', {})))).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "service_unavailable"
    resp = run(s.handle("completions", b'{"prompt": "x"}', {}))
    assert resp.status_code == 503  # two batches, then the failure: a non-streaming request reports 503
    s2, _, _ = serving(tok, lambda: FakeStream([], fail_after=0))
    resp = run(s2.handle("completions", b'{"prompt": "x"}', {}))
    err = json.loads(resp.body)["error"]
    assert resp.status_code == 503 and set(err) == {"message", "type", "param", "code"}
    s3, _, _ = serving(tok, lambda: FakeStream([Refusal(400, "bad prompt")]))
    resp = run(s3.handle("completions", b'{"prompt": "x"}', {}))
    assert resp.status_code == 400 and json.loads(resp.body)["error"]["message"] == "bad prompt"
    assert metrics.sink.total("kvray_requests_total", status="503") == 2


def test_admission_refusal_is_a_429_with_retry_after(tok):
    class ByLength(RoutingPolicy):
        name = "by-length"

        def decide(self, request, book, now):
            if request.num_prompt_tokens < 5:
                return Decision(DISPATCH, ("r1",))
            return Decision(REJECT, retry_after_s=2.4)

    s, calls, _ = serving(tok, lambda: FakeStream([batch([1], "length")]), policy=ByLength())
    resp = run(s.handle("completions", json.dumps({"prompt": "a much longer prompt here"}).encode(), {}))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert json.loads(resp.body)["error"]["type"] == "rate_limit_error" and not calls
    assert run(s.handle("completions", json.dumps({"prompt": [1, 2]}).encode(), {})).status_code == 200


def test_lifecycle_events(tok):
    """The request's life enters the book from the serving loop: placed at admission, moved
    where the replica says it went, its first token, and its end (with its tokens)."""
    seen = []

    class Recording(ReplicaBook):
        def on_dispatch(self, hint, replica_id, cached_tokens=None):
            seen.append(("dispatch", hint.request_id, replica_id))
            super().on_dispatch(hint, replica_id, cached_tokens)

        def on_first_token(self, request_id):
            seen.append(("first", request_id, self.replicas["r2"].num_decoding))
            super().on_first_token(request_id)

        def on_finish(self, request_id, num_output_tokens=0):
            seen.append(("finish", request_id, num_output_tokens))
            super().on_finish(request_id, num_output_tokens)

    s, calls, _ = serving(tok, lambda: FakeStream([batch([5, 6]), batch([7], "length")]), bound_to="r2")
    book = Recording()
    book.sync({"r1": None, "r2": None})
    s.dispatcher.book = book
    run(s.handle("completions", b'{"prompt": [1, 2, 3], "max_tokens": 3}', {}))
    rid = calls[0][0]
    assert calls[0][3].route == ("r1",)  # the route admission chose
    assert seen == [("dispatch", rid, "r1"), ("dispatch", rid, "r2"), ("first", rid, 0), ("finish", rid, 3)]
    assert book.replicas["r1"].num_ongoing == book.replicas["r2"].num_ongoing == 0  # and ended there


def test_validation_happens_before_dispatch(tok):
    s, calls, _ = serving(tok, lambda: FakeStream([]))
    cases = [
        (b'{"prompt": "x", "max_tokens": 200}', 400, "context_length_exceeded"),
        (json.dumps({"prompt": list(range(130))}).encode(), 400, "context_length_exceeded"),
        (b'{"prompt": []}', 400, None),
        (b'{"prompt": [[1, 2], []]}', 400, None),  # batched prompts: each is checked
        (b'{"model": "other", "prompt": "x"}', 404, "model_not_found"),
        (b'{"prompt": "x", "slo_class": "gold"}', 400, None),
        (b'not json', 400, "invalid_json"),
    ]
    for raw, status, code in cases:
        resp = run(s.handle("completions", raw, {}))
        assert resp.status_code == status, raw
        if code:
            assert json.loads(resp.body)["error"]["code"] == code
    resp = run(s.handle("completions", b'{"prompt": "x"}', {"x-slo-tpot-ms": "nope"}))
    assert resp.status_code == 400 and json.loads(resp.body)["error"]["param"] == "x-slo-tpot-ms"
    assert not calls


class ThreadRecordingTokenizer:
    """The tokenizer, noting the thread of every encode and chat-template call."""

    def __init__(self, tok):
        self._tok = tok
        self.threads = []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def __call__(self, *a, **k):
        self.threads.append(threading.get_ident())
        return self._tok(*a, **k)

    def apply_chat_template(self, *a, **k):
        self.threads.append(threading.get_ident())
        return self._tok.apply_chat_template(*a, **k)


def test_long_prompts_are_tokenized_off_the_event_loop_and_huge_ones_not_at_all(tok):
    rec = ThreadRecordingTokenizer(tok)
    s, _, _ = serving(tok, lambda: FakeStream([batch([1], "length")]), info=ModelInfo(rec, 4096, 16, len(tok)))

    async def main():
        loop_thread = threading.get_ident()
        short = json.dumps({"prompt": "a short prompt", "max_tokens": 1}).encode()
        long = json.dumps({"prompt": "word " * (INLINE_TOKENIZE_CHARS // 4), "max_tokens": 1}).encode()
        chat = json.dumps({"messages": [{"role": "user", "content": "word " * (INLINE_TOKENIZE_CHARS // 4)}],
                           "max_tokens": 1}).encode()
        await s.handle("completions", short, {})
        assert rec.threads == [loop_thread]
        await s.handle("completions", long, {})
        await s.handle("chat", chat, {})
        assert len(rec.threads) == 4 and all(t != loop_thread for t in rec.threads[1:])
        huge = json.dumps({"prompt": "x" * (4096 * s.info.max_token_chars + 1)}).encode()
        resp = await s.handle("completions", huge, {})
        assert resp.status_code == 400 and json.loads(resp.body)["error"]["code"] == "context_length_exceeded"
        assert len(rec.threads) == 4  # refused by its length in characters: never tokenized

    run(main())


def test_a_replica_that_fails_before_the_first_token_is_left_out_on_a_retry(tok):
    outcomes = iter([FakeStream([], fail_after=0),  # the replica died
                     FakeStream([Refusal(503, "engine died", replica_id="r2")]),
                     FakeStream([batch([5]), batch([6], "length")])])

    def factory():
        return next(outcomes)

    from kvray.router.least_load import LeastLoadPolicy
    s, calls, _ = serving(tok, factory, policy=LeastLoadPolicy(), replicas=("r1", "r2", "r3"))
    s.sender.client.bound_to = "r1"  # where the first call went
    resp = run(s.handle("completions", b'{"prompt": [1, 2], "max_tokens": 2}', {}))
    assert resp.status_code == 200 and json.loads(resp.body)["usage"]["completion_tokens"] == 2
    assert len(calls) == 3
    hint = calls[-1][3]
    assert hint.avoid == ("r1", "r2") and hint.route == ("r3",)  # both failed replicas are left out


def test_full_replicas_mean_a_429_at_once(tok):
    full = "the engine's queue is full"
    replies = iter([FakeStream([Refusal(429, full, 1.0, "r1")]), FakeStream([Refusal(429, full, 1.0, "r2")])])
    s, calls, _ = serving(tok, lambda: next(replies))
    resp = run(s.handle("completions", b'{"prompt": [1, 2], "max_tokens": 2}', {}))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert json.loads(resp.body)["error"]["code"] == "queue_full" and len(calls) == 2  # each replica tried once
    # a Router that alone holds as many requests as the replicas admit refuses before parsing
    s2, calls2, _ = serving(tok, lambda: FakeStream([batch([5], "length")]))
    s2.dispatcher.book.capacity = lambda: 3
    s2.num_in_flight = 3
    resp = run(s2.handle("completions", b"not even json", {}))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1" and not calls2
    s2.num_in_flight = 2
    assert run(s2.handle("completions", b'{"prompt": [1], "max_tokens": 1}', {})).status_code == 200
    assert s2.num_in_flight == 2  # back to where it was once that request finished


def test_every_request_is_counted_once_and_an_abandoned_stream_is_let_go(tok):
    """A streaming client that leaves before the first chunk is sent never starts the response's
    generator: the request is still aborted on the replica, counted (499) and taken off the books."""
    ids = tok(" a b c").input_ids
    streams = []

    def make():
        streams.append(FakeStream([batch(ids[:1]), batch(ids[1:2]), batch(ids[2:], "length")]))
        return streams[-1]

    s, _, metrics = serving(tok, make)

    async def leave_at_once():
        resp = await s.handle("completions", b'{"prompt": "x", "stream": true}', {})
        sent = []

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):  # a slow client: the disconnect comes while the headers go out
            sent.append(message["type"])
            await asyncio.sleep(0.5)

        await resp({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return sent

    sent = run(leave_at_once())
    assert sent == ["http.response.start"]  # nothing of the stream went out: its generator never ran
    assert streams[0].closed is True  # the replica call was aborted
    assert s.num_in_flight == 0 and not s.dispatcher.book.replicas["r1"].inflight
    # a complete stream, a JSON request and a bad one: each counted once, with the one that left
    run(body_of(run(s.handle("completions", b'{"prompt": "x", "stream": true}', {}))))
    run(s.handle("completions", b'{"prompt": "x"}', {}))
    run(s.handle("completions", b'{"prompt": "x", "max_tokens": -1}', {}))
    total = metrics.sink.total
    assert total("kvray_requests_total") == 4
    assert (total("kvray_requests_total", status="499"), total("kvray_requests_total", status="200"),
            total("kvray_requests_total", status="400")) == (1, 2, 1)
    assert total("kvray_generation_tokens_total") == 2 * len(ids) + 1  # the one that left had its first token
    assert len(metrics.sink.observations("kvray_inter_token_latency_seconds")) == 2 * 2  # 2 gaps per stream
    assert len(metrics.sink.observations("kvray_time_to_first_token_seconds")) == 3  # the one that left too
