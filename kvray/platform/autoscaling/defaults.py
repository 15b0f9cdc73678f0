"""kvray's autoscaling defaults, derived from the engine's batch size, and where they apply.

How Serve 2.60 merges options (checked in ``ray/serve/_private/application_state.py``): a key
under ``deployments:`` in the config file replaces the code's value *as a whole*. An
``autoscaling_config`` written in the file therefore drops every code default, and the keys it
leaves out take Serve's defaults (``target_ongoing_requests: 2``, ``upscale_delay_s: 30``,
``downscale_delay_s: 600``), not the code's. A code-side ``autoscaling_config`` would also turn
a file's fixed ``num_replicas`` into autoscaling. So kvray applies its defaults where the merged
config is visible:

* ``apply_autoscaling_defaults`` / ``fill_serve_config``: for Python callers (``make_app``
  overrides) and for writing a config file with every value spelled out
  (``python -m kvray.platform.autoscaling CONFIG.yaml``). Keys the user set always win.
* the policy (``kvray.platform.autoscaling.policy``, in the controller): when the file leaves
  ``target_ongoing_requests`` at Serve's default, it uses ``derived_target`` of the
  ``max_num_seqs`` that the replicas report (``user_set`` tells).
"""
from __future__ import annotations

REPLICA_DEPLOYMENT = "LLMReplica"

# Derived defaults (see ``derive_autoscaling_defaults``).
TARGET_FRACTION = 0.75        # target ongoing requests = this share of the engine's batch slots
UPSCALE_DELAY_S = 10.0        # a burst must last this long before a (slow, costly) replica starts
DOWNSCALE_DELAY_S = 300.0     # headroom must last this long before a warm replica is released
LOOK_BACK_PERIOD_S = 15.0     # window Serve averages ongoing requests over
SERVE_DEFAULT_TARGET = 2.0   # AutoscalingConfig.target_ongoing_requests default in Serve 2.60


def derived_target(max_num_seqs: int) -> int:
    """Ongoing requests per replica to aim for: most of the engine's batch slots, so Serve adds
    a replica before requests queue inside the engine (``max_ongoing_requests`` is 2x)."""
    return max(1, round(TARGET_FRACTION * int(max_num_seqs)))


def derive_autoscaling_defaults(max_num_seqs: int) -> dict[str, float]:
    return {"target_ongoing_requests": derived_target(max_num_seqs), "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S, "look_back_period_s": LOOK_BACK_PERIOD_S}


def apply_autoscaling_defaults(autoscaling_config, max_num_seqs: int) -> dict | None:
    """The user's autoscaling_config (dict or AutoscalingConfig; only the keys they set count)
    over kvray's derived defaults. None stays None: fixed ``num_replicas``, nothing to scale."""
    if autoscaling_config is None:
        return None
    if not isinstance(autoscaling_config, dict):
        autoscaling_config = autoscaling_config.model_dump(exclude_unset=True)
    return {**derive_autoscaling_defaults(max_num_seqs), **autoscaling_config}


def fill_serve_config(config: dict) -> dict:
    """A Serve config file (dict) with kvray's defaults written into each kvray application's
    LLMReplica ``autoscaling_config`` (``max_num_seqs`` from its args; keys already set win)."""
    from kvray.app_config import parse_args

    out = dict(config)
    apps = []
    for app in config.get("applications", []):
        app = dict(app)
        if str(app.get("import_path", "")).startswith("kvray.platform"):
            seqs = parse_args(app.get("args") or {}).engine.max_num_seqs
            deps = []
            for d in app.get("deployments", []):
                if d.get("name") == REPLICA_DEPLOYMENT and d.get("autoscaling_config") is not None:
                    d = {**d, "autoscaling_config": apply_autoscaling_defaults(d["autoscaling_config"], seqs)}
                deps.append(d)
            app["deployments"] = deps
        apps.append(app)
    out["applications"] = apps
    return out


def user_set(config, name: str) -> bool:
    """Whether the Serve config set ``name``: a value other than Serve's default. (Which keys a
    file gave does not survive the trip to the controller: the deployment config is rebuilt
    from a full dump. So setting Serve's default value itself reads as unset.)"""
    return getattr(config, name) != type(config).model_fields[name].default
