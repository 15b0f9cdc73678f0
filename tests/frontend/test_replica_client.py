"""The Router's replica client and its token channels, with fake Serve calls (no Ray)."""
import asyncio

import pytest

from kvray import SamplingParams
from kvray.frontend import replica_client as ch
from kvray.frontend.replica_client import (
    ChannelRequestStream,
    DirectRequestStream,
    ReplicaClient,
    ReplicaLost,
    TokenChannels,
)
from kvray.records import Bound, Refusal, RoutingHint, TokenBatch


class FakeCall:
    """Stands in for a DeploymentResponseGenerator: async iteration over a queue, and cancel()."""

    def __init__(self, items=()):
        self.q = asyncio.Queue()
        for i in items:
            self.q.put_nowait(i)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.q.get()
        if item is StopAsyncIteration:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True
        self.q.put_nowait(asyncio.CancelledError())


def b(ids, finish=None):
    return TokenBatch(ids, finish_reason=finish)


def channels() -> tuple[TokenChannels, list[FakeCall]]:
    """TokenChannels whose channel calls are fakes that bind at once; and the calls it opened."""
    opened: list[FakeCall] = []

    def open_channel(replica_id, channel_id):
        call = FakeCall([Bound(replica_id)])
        opened.append(call)
        return call

    return TokenChannels(open_channel), opened


def test_channel_delivers_and_merges_backlog():
    async def main():
        chans, opened = channels()
        call = FakeCall([Bound("r1")])
        s = ChannelRequestStream(chans, "req", call)
        await asyncio.sleep(0.01)
        assert len(opened) == 1 and chans.open_replicas == ["r1"]
        chan = opened[0]
        chan.q.put_nowait([("req", b([1])), ("other", b([9]))])
        assert (await s.__anext__()).ids == [1]
        # three steps arrive before the request reads: one merged batch
        for items in ([("req", b([2]))], [("req", b([3]))], [("req", b([4], "length"))]):
            chan.q.put_nowait(items)
        await asyncio.sleep(0.01)
        out = await s.__anext__()
        assert out.ids == [2, 3, 4] and out.finish_reason == "length"
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
        s.close(abort=False)
        assert not call.cancelled
        await chans.close()

    asyncio.run(main())


def test_errors_from_the_call_and_from_the_channel():
    async def main():
        chans, chan_calls = channels()
        # an engine refusal comes on the request's own stream
        s = ChannelRequestStream(chans, "bad", FakeCall([Bound("r1"), Refusal(400, "nope")]))
        assert (await s.__anext__()).status == 400
        # the channel dies: requests bound to that replica fail instead of hanging
        s2 = ChannelRequestStream(chans, "victim", FakeCall([Bound("r1")]))
        await asyncio.sleep(0.01)
        chan_calls[-1].q.put_nowait(ConnectionError("replica died"))
        with pytest.raises(ReplicaLost):
            await asyncio.wait_for(s2.__anext__(), 5)
        # an aborted request cancels its call
        call = FakeCall([Bound("r2")])
        s3 = ChannelRequestStream(chans, "gone", call)
        await asyncio.sleep(0.01)
        s3.close(abort=True)
        assert call.cancelled
        await chans.close()

    asyncio.run(main())


def test_idle_channel_reopens_for_waiting_requests_and_ended_calls_time_out(monkeypatch):
    monkeypatch.setattr(ch, "FINISH_GRACE_S", 0.05)

    async def main():
        chans, chan_calls = channels()
        s = ChannelRequestStream(chans, "req", FakeCall([Bound("r1")]))
        await asyncio.sleep(0.01)
        chan_calls[0].q.put_nowait(StopAsyncIteration)  # the replica closed the idle channel
        await asyncio.sleep(0.01)
        assert len(chan_calls) == 2  # reopened: "req" still waits for tokens
        chan_calls[1].q.put_nowait([("req", b([7]))])
        assert (await s.__anext__()).ids == [7]
        # the request call ends but its last batch never comes: an error, not a hang
        s2 = ChannelRequestStream(chans, "lost", FakeCall([Bound("r1"), StopAsyncIteration]))
        with pytest.raises(ReplicaLost):
            await asyncio.wait_for(s2.__anext__(), 5)
        await chans.close()

    asyncio.run(main())


def test_direct_stream():
    async def main():
        bound = []
        call = FakeCall([Bound("r2"), b([1]), b([2], "stop")])
        s = DirectRequestStream(call, bound.append)
        assert [(await s.__anext__()).ids, (await s.__anext__()).ids] == [[1], [2]]
        assert bound == ["r2"]  # the replica that took it, told once, before its first batch
        s.close(abort=True)
        assert call.cancelled

    asyncio.run(main())


class FakeMethod:
    def __init__(self, name, calls, replies):
        self.name, self.calls, self.replies = name, calls, replies

    def remote(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
        return self.replies(self.name, args, kwargs)


class FakeHandle:
    """A deployment handle: ``options(stream=True).generate/channel.remote(...)`` record their
    calls; ``replies(name, args, kwargs)`` makes each call's stream."""

    def __init__(self, replies):
        self.calls, self._replies, self.stream = [], replies, None

    def options(self, stream=False):
        self.stream = stream
        return self

    def __getattr__(self, name):
        return FakeMethod(name, self.__dict__["calls"], self.__dict__["_replies"])


def test_the_client_sends_through_a_channel_pinned_to_the_replica_that_took_the_request():
    def replies(name, args, kwargs):
        if name == "channel":
            call = FakeCall([Bound(kwargs["hint"].pin_replica)])
            channels.append(call)
            return call
        return FakeCall([Bound("r2")])  # Serve sent it to the route's second replica

    async def main():
        handle = FakeHandle(replies)
        client = ReplicaClient(handle)
        hint, bound = RoutingHint("req", 3, 4, route=("r1", "r2")), []
        s = client.send(hint, [1, 2, 3], SamplingParams(max_tokens=4), bound.append)
        await asyncio.sleep(0.01)
        assert handle.stream is True and bound == ["r2"]
        (name, args, kw), (cname, cargs, ckw) = handle.calls
        assert name == "generate" and args == ("req", [1, 2, 3], args[2]) and kw["hint"] is hint
        assert cname == "channel" and cargs == (kw["channel"],) and ckw["hint"].pin_replica == "r2"
        channels[0].q.put_nowait([("req", b([5], "length"))])
        assert (await s.__anext__()).ids == [5]
        direct = ReplicaClient(FakeHandle(lambda *a: FakeCall([Bound("r1"), b([6], "stop")])), token_channels=False)
        d = direct.send(RoutingHint("d", 1, 1), [1], SamplingParams(), None)
        assert (await d.__anext__()).ids == [6]

    channels = []
    asyncio.run(main())


def test_a_request_router_that_ignores_pins_disables_channels():
    """With a non-kvray request router the channel lands on another replica: the waiting request
    fails fast with a clear error (no hang), and the channels switch themselves off."""
    async def main():
        chans = TokenChannels(lambda replica_id, channel_id: FakeCall([Bound("some-other-replica")]))
        s = ChannelRequestStream(chans, "req", FakeCall([Bound("r1")]))
        with pytest.raises(ReplicaLost, match="kvray's request router"):
            await asyncio.wait_for(s.__anext__(), 5)
        assert chans.disabled
        await chans.close()

    asyncio.run(main())


class ServeCancelled(Exception):
    """What a cancelled DeploymentResponseGenerator raises (Serve's RequestCancelledError)."""


class CancellableCall(FakeCall):
    def cancel(self):
        self.cancelled = True
        self.q.put_nowait(ServeCancelled())


def test_fail_ends_a_stream_at_once_with_the_error():
    """How the Router's drain ends a request: the error comes ahead of batches still queued (a
    channel) or interrupts the wait for the next one (a direct call, whose cancellation is turned
    into the error), and the direct call is cancelled so the replica aborts the request."""
    async def main():
        chans, opened = channels()
        s = ChannelRequestStream(chans, "req", FakeCall([Bound("r1")]))
        await asyncio.sleep(0.01)
        opened[0].q.put_nowait([("req", b([1])), ("req", b([2]))])
        await asyncio.sleep(0.01)
        s.fail(TimeoutError("cut"))
        with pytest.raises(TimeoutError, match="cut"):
            await s.__anext__()
        await chans.close()

        call = CancellableCall()
        d = DirectRequestStream(call)
        waiting = asyncio.ensure_future(d.__anext__())
        await asyncio.sleep(0.01)
        d.fail(TimeoutError("cut"))
        with pytest.raises(TimeoutError, match="cut"):
            await asyncio.wait_for(waiting, 5)
        assert call.cancelled
        with pytest.raises(TimeoutError):  # and so on every later read
            await d.__anext__()

    asyncio.run(main())


def test_channels_to_replicas_serve_stops_close_once_no_request_is_bound():
    async def main():
        chans, opened = channels()
        s1 = ChannelRequestStream(chans, "a", FakeCall([Bound("r1")]))
        ChannelRequestStream(chans, "b", FakeCall([Bound("r2")]))
        await asyncio.sleep(0.01)
        assert sorted(chans.open_replicas) == ["r1", "r2"]
        chans.close_unlisted(["r2"])  # r1 is being stopped, but "a" is still bound there
        await asyncio.sleep(0.01)
        assert sorted(chans.open_replicas) == ["r1", "r2"]
        s1.close(abort=False)
        chans.close_unlisted(["r2"])
        await asyncio.sleep(0.01)
        assert chans.open_replicas == ["r2"]
        await chans.close()

    asyncio.run(main())
