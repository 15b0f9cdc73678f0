"""`serve run cluster-configs/local.yaml` as users run it: a subprocess, then HTTP calls.

The config is used as is, except for the HTTP port (a free one, so the test never collides
with another server on the machine). ``RAY_ADDRESS=local`` makes `serve run` start its own
Ray instance instead of joining one that may be running here.
"""
import json
import os
import signal
import time

import pytest
import requests

pytest.importorskip("ray")

from serve_app import ServeRun, engine_processes, local_config, served_name, wait_until  # noqa: E402


def test_serve_run_local_yaml(tmp_path):
    """The shipped file as is: the real SmolLM2 preset answers the README's questions."""
    before = set(engine_processes())
    cfg = local_config(real_model=True)
    name = served_name(cfg)
    run = ServeRun(cfg, tmp_path)
    try:
        run.wait_healthy()
        r = requests.post(run.url + "/v1/completions", json={"model": name, "prompt": "The capital of France is",
                                                              "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        assert "Paris" in r.json()["choices"][0]["text"], r.json()
        r = requests.post(run.url + "/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert "Paris" in "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                  for line in r.text.splitlines() if line.startswith("data: {")), r.text
        assert requests.get(run.url + "/v1/models").json()["data"][0]["id"] == name
        # local.yaml asks for 2 LLMReplica replicas; /health needs only the first, so wait for both
        deadline = time.time() + 60
        while len(replicas := requests.get(run.url + "/v1/kvray/replicas").json()["replicas"]) < 2:
            assert time.time() < deadline, replicas
            time.sleep(1)
        assert len(replicas) == 2
        # each replica runs its engine in a child process; one whose replica dies goes with it,
        # and Serve's replacement serves again
        ours = {pid: ppid for pid, ppid in engine_processes().items() if pid not in before}
        assert len(ours) == 2, ours
        victim, replica_pid = next(iter(ours.items()))
        os.kill(replica_pid, signal.SIGKILL)
        wait_until(lambda: victim not in engine_processes(), 30, "the dead replica's engine process lingers")
        wait_until(lambda: len([p for p in engine_processes() if p not in before]) == 2, 180,
                   "Serve did not replace the replica")
        wait_until(run.healthy, 60, "unhealthy after the replica was replaced")
        r = requests.post(run.url + "/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 5})
        assert r.status_code == 200
    finally:
        run.stop()
    wait_until(lambda: not set(engine_processes()) - before, 30, "engine processes outlived `serve run`")


def test_serve_run_rejects_an_unknown_arg(tmp_path):
    cfg = local_config()
    cfg["applications"][0]["args"]["bogus_key"] = 1
    run = ServeRun(cfg, tmp_path)
    try:
        deadline = time.time() + 120
        while "args.bogus_key" not in run.output:
            assert time.time() < deadline, run.output[-4000:]
            time.sleep(0.5)
        assert "unknown field" in run.output
        assert not run.healthy()
    finally:
        run.stop()
