"""Metrics that add up: ``serve run`` of local.yaml with 2 Router replicas and 2 LLMReplicas; N
requests of every kind (streamed, JSON, bad, unknown model, and clients that hang up right after
sending) are each counted exactly once by every scrape of the documented ``GET /metrics``,
whichever Router answers it: Serve's ``ray_serve_num_http_requests_total`` counts all N (also the
clients that left before a Router saw them), and ``ray_kvray_requests_total`` every request a
Router answered, by status and SLO class."""
import asyncio
import json
import socket
import time

import pytest
import requests

pytest.importorskip("ray")

from serve_app import ServeRun, local_config, metric, wait_until  # noqa: E402

NAME = "tiny-qwen3"


def _hang_up(port: int, i: int) -> None:
    """Send a whole streamed request, then close the connection without reading a byte."""
    body = json.dumps({"model": NAME, "prompt": f"gone {i}", "max_tokens": 64, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)


async def _send_all(url: str, port: int) -> dict[str, int]:
    import aiohttp

    sent = {"200": 0, "400": 0, "404": 0, "hang_up": 0}

    async def ok(session, i, stream):
        body = {"model": NAME, "prompt": f"request {i}", "max_tokens": 8, "ignore_eos": True, "stream": stream}
        async with session.post(url + "/v1/completions", json=body) as r:
            await r.read()
            assert r.status == 200
            sent["200"] += 1

    async def bad(session, body, status):
        async with session.post(url + "/v1/completions", json=body) as r:
            await r.read()
            assert r.status == int(status)
            sent[status] += 1

    async def hang_up(i):
        await asyncio.to_thread(_hang_up, port, i)
        sent["hang_up"] += 1

    async with aiohttp.ClientSession() as session:
        jobs = [ok(session, i, i % 2 == 0) for i in range(40)]
        jobs += [bad(session, {"model": NAME, "prompt": "x", "max_tokens": -1}, "400") for _ in range(10)]
        jobs += [bad(session, {"model": "no-such-model", "prompt": "x"}, "404") for _ in range(10)]
        jobs += [hang_up(i) for i in range(20)]
        await asyncio.gather(*jobs)
    return sent


def test_every_scrape_counts_every_request_once_with_two_routers(tmp_path):
    cfg = local_config()
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Router":
            d["num_replicas"] = 2
    run = ServeRun(cfg, tmp_path, fast_metrics=True)
    try:
        run.wait_healthy()
        wait_until(lambda: len(requests.get(run.url + "/v1/kvray/replicas").json()["replicas"]) == 2, 120,
                   "the 2 LLMReplicas never came up")
        # warm both Routers (their counts are part of the total too)
        for _ in range(6):
            assert requests.post(run.url + "/v1/completions", json={"model": NAME, "prompt": "warm",
                                                                     "max_tokens": 2}).status_code == 200
        sent = asyncio.run(_send_all(run.url, run.port))
        n = sum(sent.values()) + 6
        answered = sent["200"] + 6 + sent["400"] + sent["404"]  # by a Router, with a status of its own

        def counts():
            kv = {st: metric(run.url, "kvray_requests_total", status=st) for st in ("200", "400", "404", "499")}
            return metric(run.url, "serve_num_http_requests_total", application="kvray", method="POST"), kv

        wait_until(lambda: counts()[0] == n and sum(counts()[1].values()) >= answered, 60,
                   f"the scrapes never counted {n} requests (last {counts()})")
        time.sleep(1.0)
        seen, routers = [], set()
        for _ in range(8):  # every scrape, whichever Router answers it, counts all of them once
            text = requests.get(run.url + "/metrics", timeout=10).text
            routers |= {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                        if line.startswith("ray_kvray_requests_total{")}
            seen.append(counts())
            time.sleep(0.3)
        assert all(c == seen[0] for c in seen), seen
        total, kv = seen[0]
        assert total == n, seen[0]  # Serve's count: every request once
        assert kv["200"] >= sent["200"] + 6 and kv["400"] == sent["400"] and kv["404"] == sent["404"], kv
        # the hang-ups a Router saw are 499s (or 200s, when the stream was done first); none twice
        assert kv["200"] + kv["499"] <= sent["200"] + 6 + sent["hang_up"], kv
        assert len(routers) == 2, routers  # both Routers served requests; each labels its own series
    finally:
        run.stop()
