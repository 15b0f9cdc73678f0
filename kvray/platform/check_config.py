"""``kvray check-config``: every problem of a Serve config file (or a KubeRay RayService), offline:
Serve's own schema, then kvray's ``args``, then the model where this machine can see it (an
unknown preset; a local checkpoint's or GGUF file's architecture, files and tensor types).
``serve run`` with a config file never exits on a failed deploy, so this is how to fail fast.

``serve_config_errors`` takes the parsed YAML and never raises: whatever the document holds, each
problem comes back as one line (the CLI exits 1 on them; an uncaught exception would also exit 1
and be mistaken for a config problem)."""
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
        spec = doc.get("spec")
        text = spec.get("serveConfigV2") if isinstance(spec, dict) else None
        if text is None:
            return ["spec.serveConfigV2: missing (a RayService carries its Serve config there, as a YAML string)"]
        if not isinstance(text, str):
            return [f"spec.serveConfigV2: must be a string holding the Serve config YAML (`serveConfigV2: |`), "
                    f"got {type(text).__name__}"]
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            return [f"spec.serveConfigV2: not YAML: {yaml_error_line(e)}"]
    if not isinstance(doc, dict):
        return ["the file holds no Serve config (a mapping with `applications:`)"]
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        return [_one_line(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") for err in e.errors()]
    errors = []
    for i, app in enumerate(doc.get("applications") or []):
        if app.get("import_path") not in KVRAY_BUILDERS:
            continue
        try:
            args = parse_args(app.get("args"))
        except ConfigError as e:
            errors += [_one_line(f"applications[{i}] ({app.get('name')}): {p}") for p in e.problems]
            continue
        from kvray.replica.models.loader import checkpoint_problem  # imports torch: only when needed
        problem = checkpoint_problem(args.model)
        if problem:
            errors.append(_one_line(f"applications[{i}] ({app.get('name')}): args.model: {problem}"))
    return errors


def yaml_error_line(e) -> str:
    """A PyYAML error as one line: ``line L, column C: problem`` (its str() spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    if getattr(e, "context", None):
        what = f"{e.context}, {what}"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _one_line(where + what)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())
