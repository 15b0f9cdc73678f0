"""The Router's drain without Ray: ``OpenAIServing`` with fake replica streams, a real replica
book and a real ``Drain``. When the Router, or the replica a request is on, has been stopping for
``graceful_shutdown_timeout_s``, a stream still running ends with a ``server_shutdown`` error
event and ``data: [DONE]``, a request that is not streamed gets a 503 with Retry-After, and what
finishes sooner is untouched."""
import asyncio
import json
import time

import pytest

from kvray.frontend.drain import Drain
from kvray.frontend.prepare import ModelInfo
from kvray.frontend.serving import OpenAIServing
from kvray.metrics import MemorySink, RouterMetrics
from kvray.records import TokenBatch
from kvray.replica.models.loader import load_tokenizer, resolve_model
from kvray.router.book import ReplicaBook
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH, Decision, RoutingPolicy
from kvray.slo import SLOTarget

TIMEOUT_S = 0.3
WORD = 454  # " word" in the Qwen tokenizer of kvray:tiny-qwen3


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("kvray:tiny-qwen3"))


class SlowStream:
    """A replica stream: a one-token batch every ``period`` s, ``n`` of them (None: no end);
    ``fail`` as the real streams do (the error at the next read, a pending read woken)."""

    def __init__(self, n=None, period=0.02):
        self.n, self.period, self.sent = n, period, 0
        self.error, self.closed = None, None
        self.failed = asyncio.Event()

    async def __anext__(self):
        if self.error is None:
            try:
                await asyncio.wait_for(self.failed.wait(), self.period)
            except asyncio.TimeoutError:
                pass
        if self.error is not None:
            raise self.error
        self.sent += 1
        return TokenBatch([WORD], finish_reason="length" if self.sent == self.n else None)

    def fail(self, error):
        self.error = error
        self.failed.set()

    def close(self, abort):
        self.closed = abort


class RouteTo(RoutingPolicy):
    """Sends each request to ``next``."""

    name = "route_to"

    def decide(self, request, book, now):
        return Decision(DISPATCH, (self.next,))


class Client:
    """The replica client: the next stream of ``streams`` for each request sent."""

    def __init__(self, streams):
        self.streams = streams

    def send(self, hint, prompt_token_ids, params, on_bound=None):
        return self.streams.pop(0)


def make(tok, streams: list, replicas=("r1", "r2"), policy=None):
    book = ReplicaBook()
    book.sync({r: None for r in replicas})
    closed_channels = []
    drain = Drain(TIMEOUT_S, book, close_channels=closed_channels.append)
    policy = policy or RouteTo()
    s = OpenAIServing(info=ModelInfo(tok, 512, 16, len(tok)), model_names=["tiny"],
                      slo_classes={"interactive": SLOTarget("interactive", 500, 50)}, default_slo_class="interactive",
                      decode_estimate_cap=64, client=Client(streams),
                      metrics=RouterMetrics("tiny", "router-1", MemorySink()),
                      dispatcher=Dispatcher(book, policy), drain=drain)
    return s, policy, closed_channels


async def read_sse(resp) -> tuple[list, float]:
    """The SSE events of a streamed response (``[DONE]`` as the string) and when it ended."""
    events = []
    async for chunk in resp.body_iterator:
        for line in chunk.decode().split("\n\n"):
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events, time.monotonic()


def req(stream=True, max_tokens=400):
    return json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "stream": stream}).encode()


def assert_cut(events):
    assert events[-1] == "[DONE]" and len(events) >= 3, events[-3:]
    err = events[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "server_shutdown" and err["code"] == "shutdown_timeout"
    assert "graceful_shutdown_timeout_s" in err["message"]
    assert all("choices" in e for e in events[:-2])  # tokens, then the error: never a silent end


def test_the_routers_drain_cuts_what_outlives_the_timeout_and_lets_the_rest_finish(tok):
    async def main():
        long_s, short_s, plain_s = SlowStream(), SlowStream(n=5), SlowStream()
        s, policy, _ = make(tok, [long_s, short_s, plain_s])
        policy.next = "r1"
        long_r = await s.handle("completions", req(), {})
        short_r = await s.handle("completions", req(), {})
        plain = asyncio.ensure_future(s.handle("completions", req(stream=False), {}))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        s.drain.begin()
        (long_ev, t_long), (short_ev, _) = await asyncio.wait_for(
            asyncio.gather(read_sse(long_r), read_sse(short_r)), 10)
        plain_r = await asyncio.wait_for(plain, 10)
        assert short_ev[-1] == "[DONE]" and short_ev[-2]["choices"][0]["finish_reason"] == "length"
        assert_cut(long_ev)
        assert TIMEOUT_S - 0.05 <= t_long - t0 <= TIMEOUT_S + 0.25
        assert long_s.closed is True and plain_s.closed is True  # the replica calls are cancelled
        assert plain_r.status_code == 503 and plain_r.headers["Retry-After"] == "1"
        assert json.loads(plain_r.body)["error"]["type"] == "server_shutdown"
        assert s.num_in_flight == 0
        # after the deadline, a request that still reaches this Router is refused at once
        late = await s.handle("completions", req(stream=False), {})
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        assert json.loads(late.body)["error"]["code"] == "draining"
        s.drain.close()

    asyncio.run(main())


def test_a_stopping_replica_gets_no_new_request_and_its_own_are_cut_at_its_deadline(tok):
    async def main():
        s, policy, closed_channels = make(tok, [SlowStream(), SlowStream(n=40)])
        policy.next = "r1"
        r1_resp = await s.handle("completions", req(), {})
        policy.next = "r2"
        r2_resp = await s.handle("completions", req(), {})
        await asyncio.sleep(0.05)
        book = s.dispatcher.book
        t0 = time.monotonic()
        book.sync({"r2": None})  # Serve is stopping r1
        assert [rid for rid, _ in book.draining()] == ["r1"]
        assert [st.replica_id for st in book.live()] == ["r2"]  # no policy routes there any more
        (r1_ev, t_cut), (r2_ev, _) = await asyncio.wait_for(asyncio.gather(read_sse(r1_resp), read_sse(r2_resp)), 10)
        assert_cut(r1_ev)
        assert "replica" in r1_ev[-2]["error"]["message"]
        assert TIMEOUT_S - 0.05 <= t_cut - t0 <= TIMEOUT_S + 0.3
        assert r2_ev[-2]["choices"][0]["finish_reason"] == "length"  # the other replica's request: untouched
        assert not s.drain.draining  # the Router itself is not stopping
        await asyncio.sleep(0.25)
        assert book.draining() == [] and "r1" not in book.replicas  # its last request ended
        assert closed_channels and "r1" not in closed_channels[-1] and "r2" in closed_channels[-1]
        s.drain.close()

    asyncio.run(main())


def test_with_every_replica_stopping_a_new_request_is_told_so(tok):
    """Not a 429 that blames the load: a 503 saying the replicas are being stopped."""
    from kvray.router.least_load import LeastLoadPolicy

    async def main():
        s, _, _ = make(tok, [SlowStream()], replicas=("r1",), policy=LeastLoadPolicy())
        running = await s.handle("completions", req(), {})
        s.dispatcher.book.sync({})  # Serve is stopping r1, the only replica
        late = await s.handle("completions", req(stream=False), {})
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        err = json.loads(late.body)["error"]
        assert err["type"] == "server_shutdown" and "being stopped" in err["message"]
        events, _ = await asyncio.wait_for(read_sse(running), 10)
        assert_cut(events)
        s.drain.close()

    asyncio.run(main())


def test_a_router_listed_again_stops_draining(tok):
    async def main():
        s, policy, _ = make(tok, [SlowStream(n=40)])
        policy.next = "r1"
        resp = await s.handle("completions", req(), {})
        s.drain.begin()
        assert s.drain.draining
        s.drain.resume()  # Serve lists this Router again: no deadline any more
        events, _ = await asyncio.wait_for(read_sse(resp), 10)  # runs 0.8 s, past TIMEOUT_S
        assert events[-2]["choices"][0]["finish_reason"] == "length" and not s.drain.draining
        s.drain.close()

    asyncio.run(main())
