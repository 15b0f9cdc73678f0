"""`kvray serve` without starting Ray: how long its stop may wait, and a file it cannot use.
(Its signals, end to end: tests/platform/test_platform_shutdown.py.)"""
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("ray")

from serve_app import ROOT, local_config  # noqa: E402

from kvray.platform.launch import drain_bound_s, load_config  # noqa: E402


def test_the_stop_waits_at_most_until_serve_would_kill_the_replicas(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(local_config()))
    assert drain_bound_s(load_config(path)) == 10 + 5  # local.yaml: graceful_shutdown_timeout_s 10
    cfg = local_config()
    cfg["applications"][0]["args"].pop("graceful_shutdown_timeout_s")  # the default, 30
    cfg["applications"].append({"name": "other", "route_prefix": "/other", "import_path": "my_app:app",
                                "deployments": [{"name": "Slow", "graceful_shutdown_timeout_s": 90}]})
    path.write_text(yaml.safe_dump(cfg))
    assert drain_bound_s(load_config(path)) == 90
    cfg["applications"].pop()
    cfg["applications"][0]["args"]["bogus"] = 1  # an app that never deploys: the default bound
    path.write_text(yaml.safe_dump(cfg))
    assert drain_bound_s(load_config(path)) == 30 + 5


def test_a_file_it_cannot_use_is_status_2_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x}]\n")  # no import_path
    for path in (tmp_path / "missing.yaml", bad):
        r = subprocess.run([sys.executable, "-m", "kvray.cli", "serve", str(path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and f"kvray serve: cannot use {path}" in r.stderr, r.stderr[-2000:]
        assert "Started a local Ray instance" not in r.stderr + r.stdout
