"""Helpers for the end-to-end tests that run kvray on a local Ray + Serve (CPU)."""
import contextlib
import random
import socket
import time

import requests


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
def running_app(args: dict, num_replicas: int = 2):
    """Start Ray, Serve and the kvray app (``num_replicas`` LLMReplica, one Router) on a free
    port; yield its base URL once ``/health`` answers; shut everything down afterwards."""
    import ray
    from ray import serve

    from kvray.platform.app import make_app
    from kvray.platform.config import parse_args

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
