"""An overload burst through HAProxy, the ingress of the GPU configs and the RayService
(`RAY_SERVE_ENABLE_HA_PROXY=1`): `serve run cluster-configs/local.yaml` as users run it, then 300
streams at once on its two replicas, twice. Every request completes or gets a 429 with
Retry-After; completed + 429 = 300; no timeouts, no failures.

How fast the 429s come is set by how fast the one Router takes requests in, which is CPU: on the
2-core CI machine, which also runs both engines and the client, about 350 requests/s while it
streams tokens, so the last of 300 is refused after 0.9-3.1 s (seen). The 1 s figure is measured
on a 16-core machine (benchmarks/RESULTS.md, "Overload burst"); here the bound only says that
nobody waits for a slot."""

import pytest

pytest.importorskip("ray")

from serve_app import HAPROXY, ServeRun, burst_of_streams, local_config  # noqa: E402


def test_300_streams_through_haproxy(tmp_path):
    run = ServeRun(local_config(), tmp_path, env=HAPROXY)
    try:
        run.wait_healthy()
        burst_of_streams(run.url, 8)  # both replicas up and serving
        for burst in ("new connections", "open connections"):
            completed, rejected = burst_of_streams(run.url, 300, max_tokens=160)
            print(f"300 streams, {burst}: {len(completed)} completed (slowest {max(completed):.1f} s), "
                  f"{len(rejected)} got a 429 (slowest {max(rejected) if rejected else 0:.2f} s)")
            assert completed and rejected and len(completed) + len(rejected) == 300, (len(completed), len(rejected))
            assert max(rejected) < 5.0, (burst, sorted(rejected)[-5:])
    finally:
        run.stop()
