"""Helpers for the end-to-end tests that run kvray on a local Ray + Serve (CPU)."""
import contextlib
import socket
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
