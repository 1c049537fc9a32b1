"""Deployment configs: cluster.yaml is a valid Ray cluster launcher config (Ray's own schema)
with the node types the project needs and no secrets; serve/example.yaml is well formed."""


import shlex

import yaml
from conftest import ROOT

from distillery.compat import ingress


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_config()))  # what `ray up` does first; raises on a bad config
    broken = _config()
    broken["available_node_types"]["cpu_worker"]["min_wokers"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(broken))


def test_cluster_has_a_head_cpu_and_gpu_workers_and_installs_the_project():
    cfg = _config()
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= nodes.keys()
    for name in ("cpu_worker", "gpu_worker"):
        assert nodes[name]["min_workers"] == 0 < nodes[name]["max_workers"] <= cfg["max_workers"]
    assert any("pip install -e ~/distillery" in c for c in cfg["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if "ray start" in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)  # token auth on every node


def test_cluster_yaml_holds_no_secrets():
    text = (ROOT / "cluster.yaml").read_text().lower()
    for needle in ("aws_secret", "aws_access_key", "ssh_private_key", "password", "begin rsa",
                   "ray_auth_token="):
        assert needle not in text, needle
    cfg = _config()
    assert "ssh_private_key" not in cfg["auth"]
    # The auth token travels as a file from the user's machine: only its path is in the config.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"



def test_the_example_serve_config_is_well_formed():
    """serve/example.yaml: every application's args and settings pass the builder's own types,
    its import path resolves to the typed builder, routes follow the one-hop layout."""
    import importlib
    import sys

    from distillery.config import ServeConfig
    from distillery.serving import grpc_app
    from distillery.serving.serve_apps import AppArgs

    sys.path.insert(0, str(ROOT))
    doc = yaml.safe_load((ROOT / "serve" / "example.yaml").read_text())
    assert doc["http_options"]["host"] == "127.0.0.1"
    for app in doc["applications"]:
        module, _, name = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), name))
        args = AppArgs.model_validate(app["args"])
        ServeConfig.model_validate(args.settings)  # unknown or out-of-range settings raise
        expected = {"server": "/v2", "grpc": "/v2/grpc"}.get(args.kind, f"/v2/models/{app['name']}")
        assert app["route_prefix"] == expected
    assert doc["grpc_options"]["grpc_servicer_functions"] == [grpc_app.SERVICER]


def test_every_node_starts_with_the_serve_settings_distillery_uses():
    """cluster.yaml's `ray start` lines set what `ingress.ingress_env` sets for a local instance."""
    cfg = _config()
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" not in command:
            continue
        words = shlex.split(command)
        ray_at = next(i for i, w in enumerate(words) if w.endswith("/ray"))
        env = dict(w.split("=", 1) for w in words[:ray_at])
        assert (ingress.SERVE_TUNING | ingress.HAPROXY_TUNING).items() <= env.items(), command
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        # Listeners with one job each: Serve's on every interface (the firewall keeps the internal
        # ones to the nodes), HAProxy's stats and metrics on loopback.
        assert env[ingress.SERVE_HOST_VAR] == "0.0.0.0" and env[ingress.STATS_HOST_VAR] == "127.0.0.1"


def test_every_node_applies_the_firewall_before_ray_starts_and_it_opens_only_the_ingress():
    from distillery.cli.main import build_parser

    cfg = _config()
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        wall = next(i for i, c in enumerate(commands) if "distillery firewall" in c)
        assert wall < next(i for i, c in enumerate(commands) if "ray start" in c)
        words = shlex.split(commands[wall].split("|")[0])
        args = build_parser().parse_args(words[1:])
        assert args.open == "8000,8001" and "nft -f -" in commands[wall]
