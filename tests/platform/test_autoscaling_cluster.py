"""Bursts on a multi-node cluster, on CPU: Serve adds LLMReplica replicas, the Ray autoscaler adds
nodes for them, and both go away after the burst, without a failed request.

The cluster is Ray's fake multi-node provider (``ray.cluster_utils.AutoscalingCluster``): the
head has no GPU; the worker node type advertises a fake ``GPU`` (``{"CPU": 1, "GPU": 1}``), at
most 3 of them. Each replica asks for ``num_gpus: 1`` (and ``max_replicas_per_node: 1``), so
each new replica needs a new node. The engine runs on the CPU (torch has no CUDA here), with the
tiny preset and kvray's SLO-headroom policy with short delays.

Isolation from other Ray instances on the machine: ``AutoscalingCluster.start()`` runs
``ray stop --force``, which kills every Ray process of the user, so this test starts the head
itself, on free ports, in its own session and temp dir, and ends exactly the processes of that
session. (The Ray wheel also lacks the fake provider's ``example.yaml``, which the class builds its
config from, so the config is written here.) The autoscaler is v2, as KubeRay's
``autoscalerOptions.version: v2``; v1 matches fake nodes by IP, and here they all share one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID  # noqa: E402
from ray.cluster_utils import AutoscalingCluster  # noqa: E402

from kvray.platform.autoscaling import POLICY_PATH  # noqa: E402
from kvray.app_config import parse_args  # noqa: E402

pytestmark = pytest.mark.slow

MAX_NODES = 3
MAX_TOKENS = 128
BURST_CONCURRENCY = 24
OBJECT_STORE = 150 * 1024 * 1024
HEAD_TYPE = "ray.head.default"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"

ARGS = {
    "model": "kvray:tiny-qwen3", "served_model_name": "tiny-qwen3",
    # device auto: CPU here, the GPU is fake. The queue holds the whole burst while new replicas start
    # (the default, max_num_seqs = 4 waiting, would answer the rest 429 at once, which is the point
    # of a bounded queue but not of this test: scaling up on sustained load).
    "engine": {"max_num_seqs": 4, "max_model_len": 512, "max_queued_requests": 2 * BURST_CONCURRENCY},
    "slo_classes": {"interactive": {"ttft_ms": 60000, "tpot_ms": 10000}},
    "router": {"policy": "least_load", "stats_period_s": 0.5},
    "graceful_shutdown_timeout_s": 30,
}
# What a Serve config file would hold under deployments: (target_ongoing_requests is left to the
# policy: 0.75 x max_num_seqs = 3 per replica).
REPLICA_OPTIONS = {
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
    "max_replicas_per_node": 1,
    "autoscaling_config": {
        "min_replicas": 1, "max_replicas": MAX_NODES, "upscale_delay_s": 1.0, "downscale_delay_s": 5.0,
        "look_back_period_s": 2.0, "metrics_interval_s": 0.5,
        # 2 cores run the clients, the proxy, the Router and 3 engines here: the engines see a
        # fraction of the burst, so scale down only below half of the target
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"downscale_utilization": 0.5}},
    },
}
ROUTER_OPTIONS = {"ray_actor_options": {"num_cpus": 0, "resources": {"kvray_head": 0.01}}}  # stays on the head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class IsolatedAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` on its own ports and session; ``shutdown`` ends only its processes."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        types = dict(worker_node_types)
        types[HEAD_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        config = {
            "cluster_name": "kvray-fake", "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
            # Ray's fake provider, named as an "external" one: the "fake_multinode" type makes the
            # autoscaler read defaults from the example.yaml that the wheel lacks.
            "provider": {"type": "external", "module": FAKE_PROVIDER, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "head_node_type": HEAD_TYPE, "available_node_types": types,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        if autoscaler_v2:  # instances are matched to nodes by cloud instance id, not by IP
            config["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None):
        self.temp_dir = tempfile.mkdtemp(prefix="kvas_", dir="/tmp")
        ip = ray._private.services.get_node_ip_address()
        port = _free_port()
        self.address = f"{ip}:{port}"
        self._config["provider"]["gcs_address"] = self.address  # fake nodes join this GCS, not :6379
        cfg_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(cfg_path, "w") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        cmd = ["ray", "start", "--head", f"--autoscaling-config={cfg_path}", f"--port={port}",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--num-cpus={head.pop('CPU', 0)}",
               f"--num-gpus={head.pop('GPU', 0)}", f"--object-store-memory={head.pop('object_store_memory', OBJECT_STORE)}"]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token"})
        if self._autoscaler_v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        env.update(override_env or {})
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.session = proc.pid  # every process of this cluster inherits this session id
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed:\n{out}")

    def _session_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == self.session:
                        pids.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    pass
        return pids

    def shutdown(self):
        pids = self._session_pids()
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            while time.time() < deadline and (pids := self._session_pids()):
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _app():
    from kvray.platform.app import make_app

    return make_app(parse_args(ARGS), REPLICA_OPTIONS, ROUTER_OPTIONS)


class Load:
    """Closed-loop HTTP clients; each checks that every response is complete."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple[float, str, bool, str]] = []  # (time, phase, ok, detail)
        self.phase = "burst"
        self._threads: list[tuple[threading.Thread, threading.Event]] = []
        self._lock = threading.Lock()

    def _worker(self, stop: threading.Event, i: int):
        body = {"model": "tiny-qwen3", "prompt": f"request {i}: " + "tell me a story " * 8, "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0}
        with requests.Session() as s:
            while not stop.is_set():
                phase = self.phase
                try:
                    r = s.post(self.url + "/v1/completions", json=body, timeout=180)
                    ok = r.status_code == 200
                    if ok:
                        j = r.json()
                        ok = j["choices"][0]["finish_reason"] == "length" and j["usage"]["completion_tokens"] == MAX_TOKENS
                    detail = "" if ok else f"{r.status_code} {r.text[:300]}"
                except Exception as e:  # noqa: BLE001
                    ok, detail = False, f"{type(e).__name__}: {e}"
                with self._lock:
                    self.results.append((time.time(), phase, ok, detail))

    def add(self, n: int):
        for _ in range(n):
            stop = threading.Event()
            t = threading.Thread(target=self._worker, args=(stop, len(self._threads)), daemon=True)
            t.start()
            self._threads.append((t, stop))

    def keep(self, n: int):
        """Stop all but ``n`` clients (their in-flight requests still complete and count)."""
        for t, stop in self._threads[n:]:
            stop.set()

    def stop(self):
        for t, stop in self._threads:
            stop.set()
        for t, _ in self._threads:
            t.join(200)


def _worker_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def _replicas() -> list[dict]:
    details = serve.context._get_global_client().get_serve_details()
    dep = details["applications"]["kvray"]["deployments"]["LLMReplica"]
    return [r for r in dep["replicas"] if r["state"] == "RUNNING"]


def _served(url: str) -> dict[str, int]:
    snap = requests.get(url + "/v1/kvray/replicas", timeout=10).json()["replicas"]
    return {rid: v.get("router_dispatched_total", 0) for rid, v in snap.items()}


def _wait(what: str, cond, timeout_s: float, trace: list, url: str):
    deadline = time.time() + timeout_s
    while True:
        reps, nodes = _replicas(), _worker_nodes()
        trace.append((round(time.time(), 1), len(reps), len(nodes)))
        if cond(reps, nodes):
            return reps, nodes
        assert time.time() < deadline, f"timed out waiting for {what}; (time, replicas, worker nodes): {trace[-20:]}"
        time.sleep(1.0)


@pytest.fixture
def cluster():
    c = IsolatedAutoscalingCluster(
        head_resources={"CPU": 1, "kvray_head": 1, "object_store_memory": OBJECT_STORE},
        worker_node_types={"gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE},
                                          "node_config": {}, "min_workers": 0, "max_workers": MAX_NODES}},
        autoscaler_v2=True)
    # Ray 2.60 turns token auth on for a new cluster, but a driver given an explicit address only
    # uses it when RAY_AUTH_MODE says so: set it on both sides (the token is ~/.ray/auth_token,
    # made here on a machine that has never started Ray).
    from ray._raylet import Config

    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)

    old_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")

    def _terminated(signum, frame):  # e.g. a CI timeout: still end the cluster in the finally below
        raise SystemExit(f"terminated by signal {signum}")

    old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        c.start()
        try:
            ray.init(address=c.address, namespace="kvray-autoscaling-test", log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()  # the whole cluster goes: no need to drain Serve first
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if old_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_mode
        Config.initialize("")


def test_burst_scales_replicas_and_nodes_up_and_down(cluster):
    t0 = time.time()
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("kvray_head"))
    serve.run(_app(), name="kvray", route_prefix="/")
    trace: list = []

    # min_replicas 1: one replica, on the one worker node the autoscaler started for it
    reps, nodes = _wait("the first replica", lambda r, n: len(r) == 1 and len(n) == 1, 240, trace, url)
    assert reps[0]["node_id"] in nodes and reps[0]["node_id"] != head
    t_ready = time.time()

    load = Load(url)
    try:
        load.add(BURST_CONCURRENCY)

        # the burst: Serve scales to max_replicas, the autoscaler adds a node per replica, and
        # every new replica serves traffic
        def scaled_and_serving(r, n):
            served = _served(url)
            return len(r) == MAX_NODES and all(served.get(x["replica_id"], 0) > 0 for x in r)

        reps, nodes = _wait("3 replicas serving on 3 nodes", scaled_and_serving, 300, trace, url)
        t_peak = time.time()
        placed = [x["node_id"] for x in reps]
        assert len(nodes) == MAX_NODES
        assert sorted(placed) == nodes, (placed, nodes)         # one replica per worker node
        assert head not in placed
        used = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
        assert used == MAX_NODES                                  # each replica holds exactly 1 GPU

        # after the burst: a trickle keeps going while replicas and nodes go away
        load.phase = "trickle"
        load.keep(1)
        reps, nodes = _wait("scale-down to 1 replica and 1 node", lambda r, n: len(r) == 1 and len(n) == 1,
                            240, trace, url)
        assert reps[0]["node_id"] in nodes
        time.sleep(2)  # a few more trickle requests on the final layout
        # the policy ran on the target it derived from max_num_seqs (its decisions are logged)
        logs = "".join(p.read_text() for p in Path(cluster.temp_dir).glob("session_latest/logs/serve/controller_*.log"))
        assert "kvray autoscaling LLMReplica: 1 -> " in logs and "target 3/replica" in logs, logs[-3000:]
    finally:
        load.stop()
    t_end = time.time()

    results = load.results
    failed = [r for r in results if not r[2]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
    burst = [r for r in results if r[1] == "burst"]
    trickle = [r for r in results if r[1] == "trickle"]
    assert len(burst) >= BURST_CONCURRENCY and len(trickle) >= 2
    assert max(n for _, _, n in trace) == MAX_NODES and trace[-1][1:] == (1, 1)
    print(f"\nstartup {t_ready - t0:.0f}s, scale-up to {MAX_NODES} replicas serving {t_peak - t_ready:.0f}s, "
          f"scale-down {t_end - t_peak:.0f}s; {len(burst)} burst + {len(trickle)} trickle requests, all complete")
