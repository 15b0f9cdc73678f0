"""`kvray check-config`: offline validation of the Serve configs users deploy. Exit 0: ok; 1: the config
has problems (one line each, every bad field named); 2: the file cannot be read or is not YAML."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from kvray.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["cluster-configs/local.yaml", "cluster-configs/gpu.yaml", "cluster-configs/gpu-tp2.yaml",
           "cluster-configs/kuberay/rayservice.yaml",
           "cluster-configs/kuberay/rayservice-cpu.yaml"]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_pass(path, capsys):
    assert main(["check-config", str(ROOT / path)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_unknown_and_bad_args_are_each_named(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "cluster-configs/local.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["bogus_key"] = 1
    args["engine"]["max_num_seqs"] = "many"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "applications[0] (kvray): args.bogus_key: unknown field" in err
    assert "args.engine.max_num_seqs" in err


@pytest.mark.parametrize("value,ok", [("auto", True), ("none", True), ("hermes", True), ("llama3_json", True),
                                      ("qwen3_coder", True), ("pythonic", True), ("mistral", False), (1, False)])
def test_tool_call_parser(tmp_path, capsys, value, ok):
    cfg = yaml.safe_load((ROOT / "cluster-configs/local.yaml").read_text())
    cfg["applications"][0]["args"]["tool_call_parser"] = value
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == (0 if ok else 1)
    if not ok:
        err = capsys.readouterr().err
        assert "applications[0] (kvray): args.tool_call_parser: Input should be 'auto', 'none', 'hermes'" in err


def test_rayservice_serve_config_is_read_through(tmp_path, capsys):
    doc = yaml.safe_load((ROOT / "cluster-configs/kuberay/rayservice-cpu.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve_cfg["applications"][0]["args"]["router"] = {"policy": "fastest"}
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve_cfg)
    path = tmp_path / "rayservice.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["check-config", str(path)]) == 1
    assert "router.policy 'fastest' is not one of" in capsys.readouterr().err


def test_serve_schema_errors_and_unreadable_files(tmp_path, capsys):
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "kvray.platform:build_app",
                                                      "deployments": "LLMReplica"}]}))
    assert main(["check-config", str(path)]) == 1
    assert "applications.0.deployments" in capsys.readouterr().err
    path.write_text("applications: [unclosed")
    assert main(["check-config", str(path)]) == 2
    assert "is not YAML: line 1, column 24" in capsys.readouterr().err


# The console script as users run it, in a fresh process: the exit status is what the shell sees
# (an uncaught exception would exit 1 too, so each test also checks the message and no traceback).

def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "kvray"  # the installed console script
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kvray.cli"]
    return subprocess.run(cmd + ["check-config", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _bad_local_config(tmp_path) -> Path:
    cfg = yaml.safe_load((ROOT / "cluster-configs/local.yaml").read_text())
    cfg["applications"][0]["args"]["engine"]["max_num_seqz"] = 64
    cfg["applications"][0]["args"]["router"]["policy"] = "fastest"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("path", ["cluster-configs/gpu.yaml", "cluster-configs/local.yaml"])
def test_console_exit_0_on_a_good_file(path):
    r = _cli(path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{path}: ok\n"
    assert r.stderr == ""


def test_console_exit_1_names_each_bad_field_one_line_each(tmp_path):
    path = _bad_local_config(tmp_path)
    r = _cli(str(path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert all(line.startswith(f"{path}: applications[0] (kvray): args.") for line in lines), r.stderr
    assert any("args.engine.max_num_seqz: unknown field" in line for line in lines), r.stderr
    assert any("args.router: " in line and "router.policy 'fastest' is not one of" in line for line in lines), r.stderr


def test_console_exit_1_on_a_rayservice_whose_serve_config_is_not_yaml(tmp_path):
    doc = yaml.safe_load((ROOT / "cluster-configs/kuberay/rayservice-cpu.yaml").read_text())
    doc["spec"]["serveConfigV2"] = "applications: [unclosed\n"
    path = tmp_path / "rayservice.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = _cli(str(path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"{path}: spec.serveConfigV2: not YAML: line 2, column 1: while parsing a "
                                     "flow sequence, expected ',' or ']', but got '<stream end>'"]


@pytest.mark.parametrize("text", ["applications: [unclosed\n", "name: a\n---\nname: b\n", "a: b: c\n"])
def test_console_exit_2_on_broken_yaml(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    r = _cli(str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith(f"kvray check-config: {path} is not YAML: line "), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "not utf-8"])
def test_console_exit_2_when_the_file_cannot_be_read(tmp_path, kind):
    path = tmp_path / "config.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not utf-8":
        path.write_bytes(b"applications: []\n# \xff\xfe\n")
    r = _cli(str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith(f"kvray check-config: cannot read {path}: "), r.stderr


def test_console_help_documents_the_exit_codes():
    r = _cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Exit 0: ok; 1: the config has problems (one line each, every bad field named); 2: the file cannot " \
           "be read or is not YAML" in text, r.stdout


# ---- GPUs per replica: one per tensor-parallel rank ----------------------------------------------

def _gpu_config(tp: int, num_gpus, **deployment) -> dict:
    cfg = yaml.safe_load((ROOT / "cluster-configs/gpu.yaml").read_text())
    cfg["applications"][0]["args"]["engine"]["tensor_parallel_size"] = tp
    dep = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "LLMReplica")
    dep["ray_actor_options"]["num_gpus"] = num_gpus
    dep.update(deployment)
    return cfg


def test_gpus_per_replica_must_equal_tensor_parallel_size():
    from kvray.platform.check_config import serve_config_errors

    assert serve_config_errors(_gpu_config(2, 2)) == []
    [err] = serve_config_errors(_gpu_config(2, 1))
    assert err == ("applications[0] (kvray): deployments.LLMReplica.ray_actor_options.num_gpus is 1 but "
                   "args.engine.tensor_parallel_size is 2: a replica needs one GPU per rank (num_gpus: 2)")
    [err] = serve_config_errors(_gpu_config(1, 2))
    assert "num_gpus is 2 with args.engine.tensor_parallel_size 1: 1 GPU(s) would sit idle" in err
    assert serve_config_errors(_gpu_config(1, 0.5)) == []  # a fraction of a GPU per replica is fine
    # GPUs in placement-group bundles are never the replica's: its ranks could not use them
    bundles, per_rank = serve_config_errors(_gpu_config(2, 1, placement_group_bundles=[{"GPU": 1, "CPU": 4}, {"GPU": 1}],
                                                     placement_group_strategy="STRICT_PACK"))
    assert "placement_group_bundles reserve 2 GPUs but the replica's actor takes 1" in bundles
    assert "num_gpus is 1 but args.engine.tensor_parallel_size is 2" in per_rank


def test_a_cpu_replica_may_run_tensor_parallel_ranks():
    from kvray.platform.check_config import serve_config_errors

    cfg = yaml.safe_load((ROOT / "cluster-configs/local.yaml").read_text())
    cfg["applications"][0]["args"]["model"] = "kvray:tiny-qwen3"
    cfg["applications"][0]["args"]["engine"]["tensor_parallel_size"] = 2
    assert serve_config_errors(cfg) == []
    cfg["applications"][0]["args"]["engine"]["tensor_parallel_size"] = 3  # 4 heads: not over 3 ranks
    [err] = serve_config_errors(cfg)
    assert err.startswith("applications[0] (kvray): args.engine.tensor_parallel_size: invalid engine option "
                          "tensor_parallel_size=3: the model's num_attention_heads=4 is not divisible by it"), err
    cfg["applications"][0]["args"]["engine"]["tensor_parallel_size"] = 2
    cfg["applications"][0]["args"]["engine"]["device"] = "cuda"
    [err] = serve_config_errors(cfg)
    assert "num_gpus is 0 but args.engine.device is cuda" in err


def test_a_rayservice_needs_nodes_that_hold_a_replica():
    from kvray.platform.check_config import serve_config_errors

    doc = yaml.safe_load((ROOT / "cluster-configs/kuberay/rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve_cfg["applications"][0]["args"]["engine"]["tensor_parallel_size"] = 2
    next(d for d in serve_cfg["applications"][0]["deployments"]
         if d["name"] == "LLMReplica")["ray_actor_options"]["num_gpus"] = 2
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve_cfg)
    [err] = serve_config_errors(doc)
    assert "no worker group has 2 GPUs per node (num-gpus; gpu: 1), which one LLMReplica needs" in err
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-gpus"] = "2"
    assert serve_config_errors(doc) == []
    group["maxReplicas"] = 2  # 4 replicas of 2 GPUs do not fit 2 nodes of 2
    [err] = serve_config_errors(doc)
    assert "may run 4 replicas of 2 GPUs but the worker groups hold at most 2" in err
