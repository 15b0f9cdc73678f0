"""`kvray check-config`: offline validation of the Serve configs users deploy (exit 1 names each bad field)."""
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from kvray.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["cluster-configs/local.yaml", "cluster-configs/gpu.yaml", "cluster-configs/kuberay/rayservice.yaml",
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
    assert "cannot read" in capsys.readouterr().err
