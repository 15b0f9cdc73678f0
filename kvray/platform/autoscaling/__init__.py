"""Autoscaling that understands LLM load: kvray's Serve policy (``policy``), the load signal the
replicas report for it (``signal``), and defaults derived from the engine (``defaults``). Serve
configs name the policy as ``kvray.platform.autoscaling:SLOHeadroomPolicy``;
``python -m kvray.platform.autoscaling CONFIG.yaml`` prints a config with the defaults written
out (``__main__``).
"""
from kvray.platform.autoscaling.defaults import (apply_autoscaling_defaults, derive_autoscaling_defaults,
                                                 derived_target, fill_serve_config, user_set)
from kvray.platform.autoscaling.policy import Signals, SLOHeadroomPolicy
from kvray.platform.autoscaling.signal import replica_autoscaling_stats

POLICY_PATH = "kvray.platform.autoscaling:SLOHeadroomPolicy"

__all__ = ["POLICY_PATH", "SLOHeadroomPolicy", "Signals", "apply_autoscaling_defaults", "derive_autoscaling_defaults",
           "derived_target", "fill_serve_config", "replica_autoscaling_stats", "user_set"]
