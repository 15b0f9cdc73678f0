"""The serving platform: ``build_app`` (wiring only), the LLMReplica deployment, autoscaling.

``kvray.platform:build_app`` is the Serve application builder. Submodules import Ray and
FastAPI lazily through it, so ``import kvray.platform`` stays light.
"""


def build_app(args: dict | None = None):
    from kvray.platform.app import build_app as _build_app

    return _build_app(args)


__all__ = ["build_app"]
