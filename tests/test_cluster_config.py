"""cluster.yaml: Ray's own validation, offline, and what the README promises about the cluster.

`prepare_config` only merges the provider's defaults.yaml (no cloud call, no credentials) and
`validate_config` checks Ray's JSON schema and node types; `ray up` runs both on every launch. The GCP and
on-premise variants are the YAML blocks of the README's "Running on a cluster" section, laid over
cluster.yaml the way the section says.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
README = REPO / "README.md"

# Fenced ```yaml blocks of the README that start with these lines are the variants.
GCP_MARKER = "# GCP:"
ON_PREM_MARKER = "# On-premise:"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """cluster.yaml as `ray up` sees it before contacting AWS (defaults filled, setup commands merged)."""
    return prepare_config(copy.deepcopy(raw))


def _head(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _gpu_workers(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cfg["available_node_types"].items()
            if name != cfg["head_node_type"] and t.get("resources", {}).get("GPU", 0) > 0}


def _settings(raw: dict[str, Any]) -> dict[str, str]:
    """The NAME=value settings the first setup command writes to ~/reid-tune.env."""
    first = raw["setup_commands"][0]
    assert "> ~/reid-tune.env" in first, "the first setup command writes the settings file"
    return dict(re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", first))


def _all_commands(cfg: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in cfg.get(key, [])]


# ---------------------------------------------------------------- Ray's validation


def test_ray_accepts_the_config_offline(cfg: dict[str, Any]) -> None:
    validate_config(cfg)


def test_every_command_is_valid_shell(cfg: dict[str, Any]) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash to parse the commands with")
    for cmd in _all_commands(cfg):
        result = subprocess.run([bash, "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


# ---------------------------------------------------------------- nodes


def test_head_is_a_cpu_node(cfg: dict[str, Any]) -> None:
    head = _head(cfg)
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head is no GPU instance"
    assert head["max_workers"] == 0


def test_gpu_workers_scale_from_zero(cfg: dict[str, Any]) -> None:
    workers = _gpu_workers(cfg)
    assert workers, "a worker type with GPU resources"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert 0 < node_type["max_workers"] <= cfg["max_workers"], name
        assert re.match(r"(g|p)\d", node_type["node_config"]["InstanceType"]), name
        assert node_type["resources"]["CPU"] >= 1, name


def test_every_node_runs_the_same_image(cfg: dict[str, Any]) -> None:
    images = {t["node_config"]["ImageId"] for t in cfg["available_node_types"].values()}
    assert len(images) == 1, "one image, hence one Python version, on every node"


def test_shipped_search_spaces_fit_on_a_gpu_worker(cfg: dict[str, Any]) -> None:
    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert spaces
    for path in spaces:
        resources = (yaml.safe_load(path.read_text()) or {}).get("resources") or {}
        cpus, gpus = resources.get("cpus_per_worker", 1), resources.get("gpus_per_worker", 0)
        fits = [name for name, t in _gpu_workers(cfg).items()
                if cpus <= t["resources"]["CPU"] and gpus <= t["resources"]["GPU"]]
        assert fits, f"{path.name}: a Train worker ({cpus} CPUs, {gpus} GPUs) fits no GPU worker type"


# ---------------------------------------------------------------- software and settings


def test_setup_installs_a_pinned_release(raw: dict[str, Any], cfg: dict[str, Any]) -> None:
    settings = _settings(raw)
    version = settings["REID_TUNE_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "an exact release, not a branch or a range"
    assert Version(version) <= Version(metadata.version("reid-tune")), "a release that exists"

    ray_version = settings["REID_TUNE_RAY_VERSION"]
    requirements = [Requirement(r) for r in metadata.requires("reid-tune") or []]
    ray_requirement = next(r for r in requirements if r.name == "ray" and not r.marker)
    assert ray_requirement.specifier.contains(ray_version), f"ray {ray_version} is outside {ray_requirement}"

    installs = [c for c in raw["setup_commands"] if "pip install" in c and "reid-tune @" in c]
    assert len(installs) == 1, "one command installs the project, on every node"
    assert "@v${REID_TUNE_VERSION}" in installs[0]
    assert '"ray[default,tune,train]==${REID_TUNE_RAY_VERSION}"' in installs[0]
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert installs[0] in commands


def test_node_environment(raw: dict[str, Any]) -> None:
    settings = _settings(raw)
    assert settings["RAY_USAGE_STATS_ENABLED"] == "0"
    assert settings["RAY_AUTH_MODE"] == "token"
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "one token on every node"
    hook = raw["setup_commands"][1]
    assert ". ~/reid-tune.env" in hook and ">> ~/.bashrc" in hook, "the settings reach every later command"


def test_search_spaces_are_mounted(raw: dict[str, Any]) -> None:
    assert raw["file_mounts"]["~/search_spaces"] == "search_spaces"
    assert (REPO / "search_spaces").is_dir(), "`ray up` runs from the repository root"


def test_shared_storage_is_s3(raw: dict[str, Any], cfg: dict[str, Any]) -> None:
    assert _settings(raw)["REID_TUNE_STORAGE"].startswith("s3://")
    for name, node_type in cfg["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} needs the bucket"


# ---------------------------------------------------------------- MLflow on the head


def test_mlflow_server_on_the_head(cfg: dict[str, Any]) -> None:
    head_setup = "\n".join(cfg["head_setup_commands"])
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://" in head_setup
    unit = next(c for c in cfg["head_setup_commands"] if "mlflow server" in c)
    assert "--backend-store-uri \\${MLFLOW_BACKEND_STORE_URI}" in unit
    assert "--serve-artifacts --artifacts-destination \\${REID_TUNE_STORAGE}/" in unit
    assert "--host 0.0.0.0" in unit, "reachable by the workers (the security group keeps it in the cluster)"
    assert "mlflow server --app-name reid-tune " in unit  # the UI opens on the runs tables


def test_head_starts_mlflow_and_ray(cfg: dict[str, Any]) -> None:
    start = "\n".join(cfg["head_start_ray_commands"])
    assert "systemctl restart reid-tune-mlflow" in start
    assert "ray start --head" in start


def test_every_node_tracks_to_the_head(cfg: dict[str, Any]) -> None:
    for key in ("head_setup_commands", "worker_setup_commands"):
        uri = [c for c in cfg[key] if "MLFLOW_TRACKING_URI=http://" in c]
        assert uri, f"{key} set MLFLOW_TRACKING_URI"
        assert not any(loopback in c for c in uri for loopback in ("127.0.0.1", "localhost")), \
            "the URI is handed on to trials on other nodes"
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(cfg["worker_setup_commands"])


# ---------------------------------------------------------------- nothing open to the world


def test_no_port_open_to_the_world_but_ssh(cfg: dict[str, Any]) -> None:
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        everyone = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        if everyone:
            assert rule.get("FromPort") == rule.get("ToPort") == 22, rule


def test_dashboard_only_on_loopback(cfg: dict[str, Any]) -> None:
    start = next(c for c in cfg["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in start


# ---------------------------------------------------------------- the README's variants


def _readme_block(marker: str) -> dict[str, Any]:
    text = README.read_text() if README.exists() else ""
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        if block.startswith(marker):
            return yaml.safe_load(block)
    pytest.fail(f"README.md has no ```yaml block starting with {marker!r} (section 'Running on a cluster')")


def test_gcp_variant_validates(raw: dict[str, Any]) -> None:
    block = _readme_block(GCP_MARKER)
    assert set(block) == {"provider", "auth", "available_node_types"}
    variant = prepare_config({**copy.deepcopy(raw), **block})
    validate_config(variant)
    assert variant["provider"]["type"] == "gcp"
    workers = _gpu_workers(variant)
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())


def test_on_premise_variant_validates(raw: dict[str, Any]) -> None:
    block = _readme_block(ON_PREM_MARKER)
    assert set(block) == {"provider", "auth", "max_workers"}
    variant = {**copy.deepcopy(raw), **block}
    # The local provider has one node type of its own: the README says to delete these two.
    del variant["available_node_types"], variant["head_node_type"]
    prepared = prepare_config(variant)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert prepared["max_workers"] == len(block["provider"]["worker_ips"])
