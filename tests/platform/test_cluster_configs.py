"""The cluster configs are valid for what reads them.

* ``cluster-configs/kuberay/*.yaml``: the KubeRay CRD's OpenAPI schema (read from
  ``../shared/kuberay-crds`` next to the repository, never copied in), strictly: a field the CRD
  does not define is an error, as with ``kubectl apply --validate=strict``.
* Every embedded Serve config (RayService ``serveConfigV2``, the launcher's heredoc) and
  ``local.yaml`` / ``gpu.yaml`` / ``gpu-tp2.yaml``: Ray's ``ServeDeploySchema`` and kvray's ``AppArgs``.
* Resources agree: each group's ``nvidia.com/gpu`` equals its ``num-gpus``, the head has none,
  a replica fits a worker group, ``max_replicas`` fits the groups' capacity, and readiness checks
  the Serve proxy on the serve port.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("ray")

from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from kvray.platform.autoscaling import POLICY_PATH, SLOHeadroomPolicy  # noqa: E402
from kvray.app_config import AppArgs, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster-configs"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
KUBERAY_FILES = sorted((CONFIGS / "kuberay").glob("*.yaml"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
HEREDOC = re.compile(r"<<'(?P<tag>[A-Z_]+)'\n(?P<body>.*?)\n(?P=tag)\s*$", re.S)

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRD schemas not found at {CRD_DIR} "
                                "(the shared folder next to the repository)")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_configs_exist():
    names = {p.name for p in KUBERAY_FILES}
    assert {"rayservice.yaml", "rayservice-cpu.yaml"} <= names
    assert (CONFIGS / "ray-cluster.yaml").is_file()


# ---- KubeRay CRD schema ----------------------------------------------------------------------

def _strict(schema):
    """The structural schema with unknown fields forbidden (Kubernetes would drop them silently)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str) -> dict:
    crd = load(CRD_DIR / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", True), f"{kind} {version} is not served"
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind} has no version {version}")


def validate_crd(doc: dict) -> None:
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "ray.io", doc["apiVersion"]
    schema = crd_schema(doc["kind"], version)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


@needs_crds
@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_yaml_validates_against_the_crd(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in CRD_FILES
        validate_crd(doc)


@needs_crds
def test_strict_validation_catches_a_misspelt_field():
    doc = load(CONFIGS / "kuberay" / "rayservice.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True  # capital S
    with pytest.raises(AssertionError, match="enableInTreeAutoScaling"):
        validate_crd(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"  # a string
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate_crd(bad)


# ---- the Serve configs -----------------------------------------------------------------------

def validate_serve_config(cfg: dict) -> ServeDeploySchema:
    """Ray's schema, Serve's AutoscalingConfig (which imports the policy) and kvray's args model."""
    schema = ServeDeploySchema.model_validate(cfg)
    kvray_apps = [a for a in cfg["applications"] if a["import_path"] == "kvray.platform:build_app"]
    assert kvray_apps, "no kvray application"
    for app in kvray_apps:
        args = parse_args(app.get("args") or {})
        assert isinstance(args, AppArgs)
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"LLMReplica", "Router"}, names
        for d in app.get("deployments", []):
            ac = d.get("autoscaling_config")
            if ac is None:
                continue
            assert "num_replicas" not in d or d["num_replicas"] == "auto", "num_replicas with autoscaling_config"
            AutoscalingConfig.model_validate(ac)  # ServeDeploySchema keeps it a plain dict until deploy time
            policy = ac.get("policy")
            if policy:
                assert policy["policy_function"] == POLICY_PATH
                SLOHeadroomPolicy(**policy.get("policy_kwargs", {}))
    return schema


def embedded_serve_configs() -> list[tuple[str, dict]]:
    out = []
    for path in KUBERAY_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayService":
                assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
                out.append((path.name, yaml.safe_load(doc["spec"]["serveConfigV2"])))
    launcher = load(CONFIGS / "ray-cluster.yaml")
    for cmd in launcher.get("head_setup_commands", []) + launcher.get("setup_commands", []):
        m = HEREDOC.search(cmd)
        if m and "applications:" in m["body"]:
            out.append(("ray-cluster.yaml", yaml.safe_load(m["body"])))
    return out


def test_every_embedded_serve_config_is_found():
    found = [name for name, _ in embedded_serve_configs()]
    assert sorted(found) == ["ray-cluster.yaml", "rayservice-cpu.yaml", "rayservice.yaml"]


@pytest.mark.parametrize("name,cfg", embedded_serve_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_embedded_serve_config_validates(name, cfg):
    validate_serve_config(cfg)
    llm = _deployment(cfg, "LLMReplica")
    assert llm["autoscaling_config"]["policy"]["policy_function"] == POLICY_PATH
    assert llm.get("max_replicas_per_node") == 1  # replicas spread over nodes
    assert cfg["proxy_location"] == "EveryNode"


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml", "gpu-tp2.yaml"])
def test_local_and_gpu_configs_validate(name):
    validate_serve_config(load(CONFIGS / name))


def test_a_bad_serve_config_is_refused():
    name, cfg = embedded_serve_configs()[0]
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["args"]["bogus"] = 1
    with pytest.raises(ValueError, match="args.bogus"):
        validate_serve_config(bad)
    bad = copy.deepcopy(cfg)
    _deployment(bad, "LLMReplica")["autoscaling_config"]["max_replicas"] = 0
    with pytest.raises(ValueError):
        validate_serve_config(bad)


def _deployment(cfg: dict, name: str) -> dict:
    app = next(a for a in cfg["applications"] if a["import_path"] == "kvray.platform:build_app")
    return next(d for d in app["deployments"] if d["name"] == name)


# ---- resources agree -------------------------------------------------------------------------

def _qty(v) -> float:
    s = str(v)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def _groups(doc: dict):
    rc = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    yield "head", rc["headGroupSpec"], True
    for g in rc.get("workerGroupSpecs", []):
        yield g["groupName"], g, False


def _container_total(group: dict, key: str, field: str) -> float:
    total = 0.0
    for c in group["template"]["spec"]["containers"]:
        v = c.get("resources", {}).get(field, {}).get(key)
        total += _qty(v) if v is not None else 0.0
    return total


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_gpu_requests_match_num_gpus_and_the_head_has_none(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        for name, group, is_head in _groups(doc):
            params = group.get("rayStartParams", {})
            assert "num-gpus" in params, f"{path.name} {name}: set num-gpus explicitly"
            num_gpus = _qty(params["num-gpus"])
            limit = _container_total(group, "nvidia.com/gpu", "limits")
            request = _container_total(group, "nvidia.com/gpu", "requests")
            assert limit == num_gpus, f"{path.name} {name}: nvidia.com/gpu limit {limit} != num-gpus {num_gpus}"
            assert request in (0.0, limit), f"{path.name} {name}: GPU request {request} != limit {limit}"
            if is_head:
                assert num_gpus == 0, f"{path.name}: the head must have num-gpus 0"


@pytest.mark.parametrize("path", [p for p in KUBERAY_FILES], ids=lambda p: p.name)
def test_replicas_fit_the_worker_groups_and_autoscaling_is_on(path):
    doc = load(path)
    rc = doc["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    llm = _deployment(cfg, "LLMReplica")
    want_gpus = llm["ray_actor_options"].get("num_gpus", 0)
    want_cpus = llm["ray_actor_options"].get("num_cpus", 1)
    fits = []
    for name, group, is_head in _groups(doc):
        params = group.get("rayStartParams", {})
        gpus = _qty(params.get("num-gpus", 0))
        cpus = _qty(params["num-cpus"]) if "num-cpus" in params else _container_total(group, "cpu", "limits")
        if gpus >= want_gpus and cpus >= want_cpus:
            assert not is_head or want_gpus == 0, "a GPU replica must not fit on the head"
            if not is_head:
                assert group["minReplicas"] <= group["maxReplicas"]
                per_node = llm.get("max_replicas_per_node") or 1
                fits.append(group["maxReplicas"] * per_node)
        if is_head and want_gpus:
            assert gpus == 0
    assert fits, f"{path.name}: no worker group can hold an LLMReplica ({want_gpus} GPU, {want_cpus} CPU)"
    assert llm["autoscaling_config"]["max_replicas"] <= sum(fits), "max_replicas beyond the groups' capacity"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_worker_readiness_follows_serve_health(path):
    doc = load(path)
    port = yaml.safe_load(doc["spec"]["serveConfigV2"]).get("http_options", {}).get("port", 8000)
    for name, group, is_head in _groups(doc):
        for c in group["template"]["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("serve") == port, f"{name}: the container port named 'serve' must be {port}"
            if is_head:
                continue  # KubeRay checks the head's proxy itself; its readiness must not wait for Serve
            probe = " ".join(c["readinessProbe"]["exec"]["command"])
            assert f"localhost:{port}/-/healthz" in probe and "local_raylet_healthz" in probe
            assert "/-/healthz" not in " ".join(c["livenessProbe"]["exec"]["command"])


# ---- the Ray cluster launcher ------------------------------------------------------------------

def test_ray_cluster_launcher_config():
    import json

    import ray.autoscaler

    cfg = load(CONFIGS / "ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "--num-gpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert any("serve deploy" in c for c in cfg["head_start_ray_commands"])
    (_, serve_cfg), = [(n, c) for n, c in embedded_serve_configs() if n == "ray-cluster.yaml"]
    llm = _deployment(serve_cfg, "LLMReplica")
    gpus = llm["ray_actor_options"]["num_gpus"]
    workers = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= gpus]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
    assert llm["autoscaling_config"]["max_replicas"] <= sum(t["max_workers"] for t in workers)
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_pod_takes_the_api_key_from_a_secret(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "RayService":
            continue
        for _, group, _ in _groups(doc):
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                ref = env["KVRAY_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "kvray-api-key" and ref["key"] == "api-key", c["name"]


FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_pod_starts_ray_with_the_fast_ingress(path):
    """HAProxy in front of Routers that serve HTTP themselves: set in every Ray container, so the
    RayService serves at engine speed with nothing extra to know."""
    seen = 0
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "RayService":
            continue
        for _, group, _ in _groups(doc):
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert {k: env.get(k) for k in FAST_INGRESS} == FAST_INGRESS, c["name"]
                seen += 1
    assert seen >= 2


def test_the_launcher_starts_ray_with_the_fast_ingress_and_a_metrics_port():
    cfg = load(CONFIGS / "ray-cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start, key
        for c in start:
            assert all(f"{k}={v} ray start" in c or f"{k}={v} " in c.split("ray start")[0] for k, v in FAST_INGRESS.items()), c
            assert "--metrics-export-port=8080" in c, c
