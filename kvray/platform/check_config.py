"""``kvray check-config``: every problem of a Serve config file (or a KubeRay RayService), offline:
Serve's own schema, then kvray's ``args``. ``serve run`` with a config file never exits on a
failed deploy, so this is how to fail fast."""
from __future__ import annotations

from pydantic import ValidationError

from kvray.app_config import ConfigError, parse_args

KVRAY_BUILDERS = ("kvray.platform:build_app", "kvray.platform.app:build_app")


def serve_config_errors(doc) -> list[str]:
    """Every problem of a Serve config dict (a RayService's ``serveConfigV2`` is read through):
    Serve's own schema, then the ``args`` of each kvray application, each as ``where: why``."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if isinstance(doc, dict) and doc.get("kind") == "RayService":
        doc = yaml.safe_load((doc.get("spec") or {}).get("serveConfigV2") or "null")
    if not isinstance(doc, dict):
        return ["the file holds no Serve config (a mapping with `applications:`)"]
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        return [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
    errors = []
    for i, app in enumerate(doc.get("applications") or []):
        if app.get("import_path") not in KVRAY_BUILDERS:
            continue
        try:
            parse_args(app.get("args"))
        except ConfigError as e:
            errors += [f"applications[{i}] ({app.get('name')}): {p}" for p in e.problems]
    return errors
