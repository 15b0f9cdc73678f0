"""``kvray check-config``: every problem of a Serve config file (or a KubeRay RayService), offline:
Serve's own schema, then kvray's ``args``, then the model where this machine can see it (an
unknown preset; a local checkpoint's or GGUF file's architecture, files and tensor types), then
GPUs: a replica's against its tensor-parallel ranks and, in a RayService, against the worker
groups' nodes. ``serve run`` with a config file never exits on a failed deploy, so this is how to
fail fast.

``serve_config_errors`` takes the parsed YAML and never raises: whatever the document holds, each
problem comes back as one line (the CLI exits 1 on them; an uncaught exception would also exit 1
and be mistaken for a config problem)."""
from __future__ import annotations

from pydantic import ValidationError

from kvray.app_config import ConfigError, parse_args
from kvray.platform.autoscaling.defaults import REPLICA_DEPLOYMENT

KVRAY_BUILDERS = ("kvray.platform:build_app", "kvray.platform.app:build_app")


def serve_config_errors(doc) -> list[str]:
    """Every problem of a Serve config dict (a RayService's ``serveConfigV2`` is read through):
    Serve's own schema, then the ``args`` of each kvray application, each as ``where: why``."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cluster = None
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
        cluster = spec.get("rayClusterConfig") if isinstance(spec.get("rayClusterConfig"), dict) else {}
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
        from kvray.replica.parallel.model_check import tensor_parallel_problem
        where = f"applications[{i}] ({app.get('name')})"
        problem = checkpoint_problem(args.model)
        if problem:
            errors.append(_one_line(f"{where}: args.model: {problem}"))
        elif problem := tensor_parallel_problem(args.model, args.engine.tensor_parallel_size):
            errors.append(_one_line(f"{where}: args.engine.tensor_parallel_size: {problem}"))
        errors += [f"{where}: {p}" for p in replica_gpu_errors(_replica_deployment(app), args.engine)]
        if cluster is not None:
            errors += [f"{where}: {p}" for p in node_gpu_errors(_replica_deployment(app), cluster)]
    return errors


def _replica_deployment(app: dict) -> dict:
    for d in app.get("deployments") or []:
        if d.get("name") == REPLICA_DEPLOYMENT:
            return d
    return {}


def replica_gpus(deployment: dict) -> float:
    """The GPUs one LLMReplica holds: its ``ray_actor_options.num_gpus`` (Serve's default: 0)."""
    return float((deployment.get("ray_actor_options") or {}).get("num_gpus") or 0)


def replica_gpu_errors(deployment: dict, engine) -> list[str]:
    """A replica's GPUs against its engine: one GPU per tensor-parallel rank, reserved by
    ``ray_actor_options.num_gpus`` (the ranks are child processes of the replica: they can use
    only the GPUs Ray gives the replica's own actor, not other bundles of a placement group)."""
    tp, gpus = engine.tensor_parallel_size, replica_gpus(deployment)
    key = f"deployments.{REPLICA_DEPLOYMENT}.ray_actor_options.num_gpus"
    errors = []
    bundles = deployment.get("placement_group_bundles") or []
    bundle_gpus = sum(float(b.get("GPU", 0)) for b in bundles if isinstance(b, dict))
    if bundle_gpus > gpus:
        errors.append(f"deployments.{REPLICA_DEPLOYMENT}.placement_group_bundles reserve {bundle_gpus:g} GPUs but the "
                      f"replica's actor takes {gpus:g} ({key}): a replica uses only its own GPUs; reserve them with "
                      f"num_gpus: {tp} and no GPU bundles")
    if gpus and tp > 1 and gpus != tp:
        errors.append(f"{key} is {gpus:g} but args.engine.tensor_parallel_size is {tp}: a replica needs one GPU per "
                      f"rank (num_gpus: {tp})")
    elif gpus > 1 and tp == 1:
        errors.append(f"{key} is {gpus:g} with args.engine.tensor_parallel_size 1: {gpus - 1:g} GPU(s) would sit "
                      f"idle (set tensor_parallel_size: {gpus:g} to split the model over them)")
    elif not gpus and str(engine.device).startswith("cuda"):
        errors.append(f"{key} is 0 but args.engine.device is {engine.device}: the replica would see no GPU "
                      f"(num_gpus: {tp})")
    return errors


def node_gpu_errors(deployment: dict, cluster: dict) -> list[str]:
    """A RayService's worker groups must have a node that holds one replica's GPUs (Ray places an
    actor's GPUs on one node), and room for ``max_replicas`` replicas."""
    need = replica_gpus(deployment)
    if not need:
        return []
    groups = [g for g in cluster.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    per_node = {g.get("groupName"): float((g.get("rayStartParams") or {}).get("num-gpus", 0)) for g in groups}
    fits = [g for g in groups if per_node[g.get("groupName")] >= need]
    if not fits:
        have = ", ".join(f"{k}: {v:g}" for k, v in per_node.items()) or "no worker groups"
        return [f"no worker group has {need:g} GPUs per node (num-gpus; {have}), which one LLMReplica needs: "
                "the autoscaler could never place it"]
    capacity = sum(int(g.get("maxReplicas", 0)) * int(per_node[g.get("groupName")] // need) for g in fits)
    max_replicas = (deployment.get("autoscaling_config") or {}).get("max_replicas") or deployment.get("num_replicas")
    if isinstance(max_replicas, int) and max_replicas > capacity:
        return [f"deployments.{REPLICA_DEPLOYMENT} may run {max_replicas} replicas of {need:g} GPUs but the worker "
                f"groups hold at most {capacity} (maxReplicas x num-gpus // {need:g})"]
    return []


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
