"""Helpers for the end-to-end tests that run kvray on a local Ray + Serve (CPU)."""
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), so that none of the connections
    and port-0 listeners Ray opens while the app starts can take it before the HTTP proxy binds it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 29000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29000")


@contextlib.contextmanager
def running_app(args: dict, num_replicas: int = 2, fast_metrics: bool = False, env: dict | None = None):
    """Start Ray, Serve and the kvray app (``num_replicas`` LLMReplica, one Router) on a free
    port; yield its base URL once ``/health`` answers; shut everything down afterwards.
    ``fast_metrics``: the processes report metrics every 200 ms (METRICS_ENV), for tests that
    read ``/metrics``; it costs CPU that timing tests on a 2-core machine do not have. ``env``:
    more variables for the Ray processes (HAPROXY: the ingress of the shipped configs)."""
    import ray
    from ray import serve

    from kvray.app_config import parse_args
    from kvray.platform.app import make_app

    extra = {**(METRICS_ENV if fast_metrics else {}), **(env or {})}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # read by the Ray processes ray.init starts
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = make_app(parse_args(args), {"num_replicas": num_replicas, "ray_actor_options": {"num_cpus": 1}},
                       {"ray_actor_options": {"num_cpus": 0}})
        serve.run(app, name="kvray", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while requests.get(url + "/health", timeout=10).status_code != 200:
            assert time.time() < deadline, "the app never became healthy"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


KVRAY_SERVE = [sys.executable, "-m", "kvray.cli", "serve"]  # `kvray serve`, from this checkout


class ServeRun:
    """``serve run CONFIG`` as a user runs it, in a subprocess (its own local Ray, on a free port);
    ``env`` adds environment variables (an ingress choice, say); ``command`` replaces ``serve run``
    (``KVRAY_SERVE``)."""

    def __init__(self, cfg: dict, tmp_path: Path, env: dict | None = None, fast_metrics: bool = False,
                 command: list[str] | None = None):
        self.port = free_port()
        cfg["http_options"]["port"] = self.port
        self.config_path = path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0", **(METRICS_ENV if fast_metrics else {}),
               **(env or {})}
        self.proc = subprocess.Popen([*(command or ["serve", "run"]), str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        """Until /health answers 200; fails with the command's output if it exits or takes too long."""
        deadline = time.time() + timeout_s
        while not self.healthy():
            assert self.proc.poll() is None, self.output[-4000:]
            assert time.time() < deadline, self.output[-4000:]
            time.sleep(1)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # `serve run` shuts Serve and its Ray down on Ctrl-C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)


def module_processes(module: str, skip_zombies: bool = False) -> dict[int, int]:
    """pid -> parent pid of every process running ``python -m <module>``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if module.encode() in cmd and not (skip_zombies and state == "Z"):
            found[int(entry.name)] = int(ppid)
    return found


def engine_processes() -> dict[int, int]:
    """pid -> parent pid of every running engine child process (``kvray.replica.engine_process``)."""
    return module_processes("kvray.replica.engine_process")


async def long_stream(session, url: str, model: str, prompt: str, started) -> tuple[str, float, dict | None]:
    """A streamed completion of 1,500 tokens; sets ``started`` at its first event. Returns how it
    ended ("done", "error" with the error object, or "cut": the body ended without [DONE]) and when."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            if not raw.startswith(b"data: "):
                continue
            started.set()
            if raw.strip() == b"data: [DONE]":
                return "done", time.monotonic(), None
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                return "error", time.monotonic(), chunk["error"]
    return "cut", time.monotonic(), None


def wait_until(cond, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.5)


# The ingress that gpu.yaml, the RayServices and the launcher config start (docs/deploy.md, "Which ingress").
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# Ray's metrics agent gets new values from each process this often (default 10 s): the apps of the
# tests that read /metrics report fast (fast_metrics=True), so that a scrape shows a request soon
# after it ends.
METRICS_ENV = {"RAY_metrics_report_interval_ms": "200"}


def metric(url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """Sum over the series of ``ray_<name>`` in a scrape of ``url/metrics`` whose labels include
    ``labels``: every process's share (Routers, replicas) counted once."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", headers=headers, timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "ray_" + name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def settled_metric(url: str, name: str, timeout_s: float = 30.0, **labels: str) -> float:
    """``metric`` once two scrapes 1 s apart agree (what had been recorded has reached the agent)."""
    deadline = time.time() + timeout_s
    last = metric(url, name, **labels)
    while True:
        time.sleep(1.0)
        now = metric(url, name, **labels)
        if now == last:
            return now
        assert time.time() < deadline, f"{name} kept changing: {last} -> {now}"
        last = now


def wait_metric(url: str, name: str, value: float, timeout_s: float = 30.0, **labels: str) -> None:
    wait_until(lambda: metric(url, name, **labels) == value, timeout_s,
               f"{name}{labels} never reached {value} (last {metric(url, name, **labels)})")


TINY_MODEL = {"model": "kvray:tiny-qwen3", "served_model_name": "tiny-qwen3"}


def local_config(real_model: bool = False) -> dict:
    """cluster-configs/local.yaml, parsed (tests change the port and what they need). It serves
    the real SmolLM2 preset; unless ``real_model``, the model is swapped for the random-weight
    ``kvray:tiny-qwen3`` (served as ``tiny-qwen3``): the tests of serving mechanics (metrics,
    overload, ingress, the API's features) need its speed on 2 cores, not its answers."""
    cfg = yaml.safe_load((ROOT / "cluster-configs" / "local.yaml").read_text())
    if not real_model:
        cfg["applications"][0]["args"].update(TINY_MODEL)
    return cfg


def served_name(cfg: dict) -> str:
    return cfg["applications"][0]["args"]["served_model_name"]


def burst_of_streams(url: str, n: int, headers: dict | None = None, max_tokens: int = 48,
                     timeout_s: float = 60.0) -> tuple[list[float], list[float]]:
    """``n`` streamed completions at once. Each must complete (every chunk, then [DONE]) or get a
    429 in the OpenAI error shape with a Retry-After header; no failure, no client timeout.
    Returns (seconds to completion of each completed request, seconds to each 429)."""
    import asyncio
    import json

    import aiohttp

    async def one(session, i):
        body = {"model": "tiny-qwen3", "prompt": f"stream {i} under load", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        t0 = time.monotonic()
        async with session.post(url + "/v1/completions", json=body, headers=headers or {}) as r:
            if r.status == 429:
                err = (await r.json())["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["type"] == "rate_limit_error", err
                assert int(r.headers["Retry-After"]) >= 1
                return "429", time.monotonic() - t0
            assert r.status == 200, await r.text()
            done = False
            async for raw in r.content:
                if raw.strip() == b"data: [DONE]":
                    done = True
                elif raw.startswith(b"data: "):
                    assert "error" not in json.loads(raw[6:]), raw
            assert done
            return "ok", time.monotonic() - t0

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            return await asyncio.gather(*(one(session, i) for i in range(n)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]  # no timeouts, no failures
    return [t for k, t in results if k == "ok"], [t for k, t in results if k == "429"]
