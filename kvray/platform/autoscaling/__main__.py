"""``python -m kvray.platform.autoscaling CONFIG.yaml``: print the Serve config with kvray's
autoscaling defaults written out (what the LLMReplica deployment will run with)."""
from __future__ import annotations

import sys

from kvray.platform.autoscaling.defaults import fill_serve_config


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvray.platform.autoscaling SERVE_CONFIG.yaml", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        print(yaml.safe_dump(fill_serve_config(yaml.safe_load(f)), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
