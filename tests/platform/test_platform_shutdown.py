"""Stopping under load, on the CPU, with `kvray serve CONFIG` (run as users run it, in a subprocess
with its own local Ray): a rolling update and an autoscaler scale-down cut no stream, and a stop
(Ctrl-C, SIGTERM) lets each stream finish or end it with a ``server_shutdown`` error event and
``data: [DONE]`` at ``graceful_shutdown_timeout_s``, within 1 s.

Two app starts: the first (Serve's Python proxy) runs the update, the scale-down and a Ctrl-C with
streams shorter than the timeout; the second (HAProxy, the shipped configs' ingress) a SIGTERM
with streams longer than the timeout and some shorter.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import re
import time

import aiohttp
import pytest
import requests
import yaml

pytest.importorskip("ray")

from serve_app import HAPROXY, KVRAY_SERVE, ServeRun, local_config  # noqa: E402

from kvray.platform.autoscaling import POLICY_PATH  # noqa: E402

pytestmark = pytest.mark.slow

LONG = 1200  # tokens of a long stream: many seconds of decoding here (an update takes a few)
# Serve's log line of a replica it is stopping (LLMReplica counts its token channel too)
DRAIN_LOG = re.compile(r"kvray_(Router|LLMReplica) \S+ -- Waiting for an additional \S+ to shut down: (\d+) ongoing")


async def stream(session, url: str, max_tokens: int, started: asyncio.Event | None = None) -> dict:
    """One streamed completion: how it ended ("done", "error", "cut" for a body that stopped
    without [DONE], or an HTTP "status"), when, its tokens (from the usage chunk) and its error or
    finish reason."""
    body = {"model": "tiny-qwen3", "prompt": "a story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"end": "cut", "tokens": 0, "finish": None, "error": None}
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return {**out, "end": "status", "status": r.status, "t": time.monotonic()}
            async for raw in r.content:
                if not raw.startswith(b"data: "):
                    continue
                if started is not None:
                    started.set()
                if raw.strip() == b"data: [DONE]":
                    out["end"] = "done" if out["error"] is None else "error"
                    break
                chunk = json.loads(raw[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                elif chunk["choices"]:
                    out["finish"] = chunk["choices"][0]["finish_reason"] or out["finish"]
                else:
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except aiohttp.ClientPayloadError as e:  # a broken chunked body
        out["detail"] = repr(e)
    out["t"] = time.monotonic()
    return out


async def probe(session, url: str, stop: asyncio.Event, out: list) -> None:
    """New small requests all along: (send time, status or the exception's name; "hung" when one
    takes 30 s)."""
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            body = {"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 4}
            async with session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                out.append((t0, r.status))
        except aiohttp.ClientError as e:
            out.append((t0, type(e).__name__))
        except asyncio.TimeoutError:
            out.append((t0, "hung"))
        await asyncio.sleep(0.2)


def replicas(url: str) -> dict:
    return requests.get(url + "/v1/kvray/replicas", timeout=10).json()["replicas"]


def apply(run: ServeRun, cfg: dict) -> None:
    """Edit the config file and have `kvray serve` apply it (SIGHUP), as `serve deploy` would."""
    run.config_path.write_text(yaml.safe_dump(cfg))
    os.kill(run.proc.pid, signal.SIGHUP)


async def under_streams(url: str, n: int, change, settled, timeout_s: float = 300.0):
    """``n`` long streams; once all run, ``change()``; then new requests until ``settled()``
    (polled) and every stream has ended. Returns (stream results, probe results, polls)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        started = [asyncio.Event() for _ in range(n)]
        streams = [asyncio.ensure_future(stream(s, url, LONG, e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        stop, probes, polls = asyncio.Event(), [], []
        prober = asyncio.ensure_future(probe(s, url, stop, probes))
        change()
        deadline = time.monotonic() + timeout_s
        while True:
            polls.append(await asyncio.to_thread(replicas, url))
            if settled(polls[-1]) and all(t.done() for t in streams):
                break
            assert time.monotonic() < deadline, polls[-1]
            await asyncio.sleep(0.25)
        stop.set()
        await prober
        return [t.result() for t in streams], probes, polls


def check_all_complete(results: list, probes: list) -> None:
    bad = [r for r in results if r["end"] != "done" or r["finish"] != "length" or r["tokens"] != LONG]
    assert not bad, bad[:3]
    assert probes and all(status == 200 for _, status in probes), [p for p in probes if p[1] != 200][:5]


def autoscaled(cfg: dict, min_replicas: int) -> dict:
    cfg["applications"][0]["deployments"][0] = {
        "name": "LLMReplica", "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
        "autoscaling_config": {
            "min_replicas": min_replicas, "max_replicas": 2, "initial_replicas": 2,
            "target_ongoing_requests": 64, "upscale_delay_s": 600, "downscale_delay_s": 1,
            "look_back_period_s": 1, "metrics_interval_s": 0.5, "policy": {"policy_function": POLICY_PATH}}}
    return cfg


def test_update_and_scale_down_cut_no_stream_and_ctrl_c_lets_short_ones_finish(tmp_path):
    cfg = autoscaled(local_config(), min_replicas=2)
    args = cfg["applications"][0]["args"]
    # SLO targets this loaded CPU meets: the policy scales down on headroom, not held by predicted misses
    args.update(graceful_shutdown_timeout_s=120, router={"policy": "least_load", "stats_period_s": 0.25},
                slo_classes={"interactive": {"ttft_ms": 60000, "tpot_ms": 10000}}, default_slo_class="interactive")
    run = ServeRun(cfg, tmp_path, command=KVRAY_SERVE)
    try:
        run.wait_healthy()
        url = run.url
        deadline = time.time() + 120
        while len(before := replicas(url)) < 2:
            assert time.time() < deadline, before
            time.sleep(1)

        # a rolling update (new args: both deployments get new replicas) under 16 streams
        args["stream_interval_ms"] = 1
        mark = len(run.lines)
        results, probes, _ = asyncio.run(under_streams(
            url, 16, lambda: apply(run, cfg), lambda snap: len(snap) == 2 and not set(snap) & set(before)))
        check_all_complete(results, probes)
        # Serve stopped old replicas of both deployments while streams ran through them
        draining = {m[0] for m in DRAIN_LOG.findall("".join(run.lines[mark:])) if int(m[1]) >= 2}
        assert draining == {"Router", "LLMReplica"}, draining

        # the autoscaler's scale-down to 1 under 16 streams: the replica Serve stops drains
        autoscaled(cfg, min_replicas=1)
        results, probes, polls = asyncio.run(under_streams(
            url, 16, lambda: apply(run, cfg), lambda snap: len(snap) == 1 and not snap_draining(snap)))
        check_all_complete(results, probes)
        drained = [v for snap in polls for v in snap.values() if v["draining_since"] and v["router_active_requests"]]
        assert drained, "no replica was seen draining with streams on it"

        # Ctrl-C with streams shorter than the timeout: they complete, then it exits
        async def ctrl_c():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                started = [asyncio.Event() for _ in range(4)]
                streams = [asyncio.ensure_future(stream(s, url, 300, e)) for e in started]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
                os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
                return await asyncio.gather(*streams)

        short = asyncio.run(ctrl_c())
        assert all(r["end"] == "done" and r["finish"] == "length" for r in short), short
        assert run.proc.wait(60) == 0, run.output[-3000:]
        assert "kvray serve: stopped" in run.output
    finally:
        run.stop()



def snap_draining(snap: dict) -> bool:
    return any(v["draining_since"] for v in snap.values())


def test_sigterm_ends_streams_at_the_timeout_behind_haproxy(tmp_path):
    timeout_s = 4.0
    cfg = local_config()
    cfg["applications"][0]["args"]["graceful_shutdown_timeout_s"] = timeout_s
    cfg["applications"][0]["deployments"][0]["num_replicas"] = 1
    run = ServeRun(cfg, tmp_path, env=HAPROXY, command=KVRAY_SERVE)
    try:
        run.wait_healthy()

        async def main():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                started = [asyncio.Event() for _ in range(12)]
                long = [asyncio.ensure_future(stream(s, run.url, 2000, e)) for e in started[:8]]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:8])), 60)
                short = [asyncio.ensure_future(stream(s, run.url, 100, e)) for e in started[8:]]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[8:])), 60)
                t_signal = time.monotonic()
                os.kill(run.proc.pid, signal.SIGTERM)  # `kill PID`, as a process manager stops it
                stop, probes = asyncio.Event(), []
                prober = asyncio.ensure_future(probe(s, run.url, stop, probes))
                results = await asyncio.gather(*long, *short)
                stop.set()
                await prober
                return t_signal, results[:8], results[8:], probes

        t_signal, long, short, probes = asyncio.run(main())
        assert all(r["end"] == "done" and r["finish"] == "length" for r in short), short
        for r in long:
            assert r["end"] == "error", r  # an error event then [DONE]: never a cut body
            assert r["error"]["type"] == "server_shutdown" and r["error"]["code"] == "shutdown_timeout", r
            assert abs(r["t"] - t_signal - timeout_s) <= 1.0, (r["t"] - t_signal, timeout_s)
        assert probes and "hung" not in {p[1] for p in probes}, probes  # an answer or a refused connection
        assert run.proc.wait(60) == 0, run.output[-3000:]
        print(f"streams ended {min(r['t'] for r in long) - t_signal:.2f}-{max(r['t'] for r in long) - t_signal:.2f} "
              f"s after SIGTERM (timeout {timeout_s} s); new requests during the stop: "
              f"{sorted({p[1] for p in probes}, key=str)}")
    finally:
        run.stop()
