"""Play a load program (benchmarks/sim/program.py) against kvray's OpenAI API over HTTP.

Each request goes out at its arrival time as a streamed ``/v1/completions`` call: random prompt
token ids of its length, ``max_tokens`` = its output length, ``ignore_eos``, greedy,
``logprobs: 0`` (so every chunk says how many tokens it carries), its class in ``x-slo-class``.
Its ``Outcome`` (``ok``/``rejected``/``timeout``/``error``) is what the simulator produces for the
same request: TTFT from its arrival time to the first token, mean TPOT after the first token; at
the cut-off (``drain_s`` after the last arrival) requests still open are closed and judged on the
tokens they produced so far (none yet: a timeout).
"""
from __future__ import annotations

import asyncio
import json
import random
import time

from benchmarks.sim.program import Outcome
from benchmarks.sim.workload import SimRequest


def prompts(labelled: list[tuple[SimRequest, str]], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = range(vocab)
    return [rng.choices(ids, k=r.prompt_len) for r, _ in labelled]


async def _one(session, url: str, model: str, r: SimRequest, window: str, prompt: list[int], t0: float) -> Outcome:
    import aiohttp

    o = Outcome(r.rid, window, r.slo.name, r.arrival, "timeout")
    await asyncio.sleep(max(0.0, t0 + r.arrival - time.monotonic()))
    start = t0 + r.arrival
    first = last = None
    body = {"model": model, "prompt": prompt, "max_tokens": r.max_tokens, "stream": True, "logprobs": 0,
            "ignore_eos": True, "temperature": 0.0}
    try:
        async with session.post(url, json=body, headers={"x-slo-class": r.slo.name}) as resp:
            if resp.status != 200:
                o.status = "rejected" if resp.status == 429 else "error"
                return o
            async for raw in resp.content:
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(raw[6:])
                if "error" in chunk:
                    o.status = "error"
                    return o
                for c in chunk.get("choices") or ():
                    n = len((c.get("logprobs") or {}).get("token_logprobs") or ()) or (1 if c.get("text") else 0)
                    if n:
                        now = time.monotonic()
                        first = first or now
                        last = now
                        o.n_out += n
                        o.ttft = first - start
                        if o.n_out > 1:
                            o.tpot = (last - first) / (o.n_out - 1)
        o.status = "ok" if first is not None else "error"
    except (aiohttp.ClientError, asyncio.TimeoutError):
        o.status = "error" if first is None else "ok"
    except asyncio.CancelledError:  # the cut-off: judged on what it produced so far
        o.status = "ok" if first is not None else "timeout"
    return o


async def play(base_url: str, labelled: list[tuple[SimRequest, str]], *, drain_s: float, seed: int = 0,
               model: str | None = None) -> list[Outcome]:
    """Every request of ``labelled`` at its arrival time; the outcomes in the same order."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
            info = (await resp.json())["data"][0]
        model = model or info["id"]
        ids = prompts(labelled, int(info.get("vocab_size") or 1000), seed)
        url = base_url.rstrip("/") + "/v1/completions"
        t0 = time.monotonic() + 1.0
        tasks = [asyncio.create_task(_one(session, url, model, r, w, p, t0)) for (r, w), p in zip(labelled, ids)]
        cutoff = t0 + (labelled[-1][0].arrival if labelled else 0.0) + drain_s
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, cutoff - time.monotonic()))
        for t in pending:
            t.cancel()
        return list(await asyncio.gather(*tasks))
