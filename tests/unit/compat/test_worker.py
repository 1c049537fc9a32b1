"""The setup every process of a distillery job runs first: light, and Serve's patches
applied only where Serve is imported, when it is."""

import subprocess
import sys

from distillery.compat.logs import TRAIN_CONTEXT_LOGGER

HEAVY = ("ray.serve", "ray.data", "ray.train", "torch", "distillery.config")


def test_the_train_context_logger_is_named_by_the_module_s_own_path():
    from ray.train.v2._internal.execution import context  # its logger is `logging.getLogger(__file__)`

    assert context.__file__ == TRAIN_CONTEXT_LOGGER


def _child(code: str) -> str:
    """Run `code` in a fresh interpreter (its imports are the point) with serve.host set as a node
    is started with it."""
    env_code = "import os; os.environ['DISTILLERY_SERVE_HOST'] = '127.0.0.1'\n" + code
    done = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_setup_imports_nothing_heavy_and_patches_serve_when_a_process_imports_it():
    out = _child(
        "import sys, ray\n"
        "from distillery.compat.worker import worker_setup\n"
        "worker_setup()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "import ray.serve\n"
        "from ray.serve._private import default_impl\n"
        "from ray.serve._private.proxy_request_response import gRPCProxyRequest\n"
        "print(getattr(default_impl.add_grpc_address, 'pinned_to', None))\n"
        "print(getattr(gRPCProxyRequest.setup_variables, 'routes_stock_calls', False))\n")
    assert out.splitlines() == ["[]", "127.0.0.1", "True"]


def test_gloo_is_pointed_at_the_interface_holding_the_node_address():
    """Across machines Gloo must not take the hostname's loopback address: the interface that
    holds the node's Ray address is named; none for loopback, where Gloo's default works."""
    import psutil

    from distillery.compat.worker import interface_of

    assert interface_of("127.0.0.1") is None and interface_of("198.18.0.77") is None
    external = [(name, a.address) for name, addrs in psutil.net_if_addrs().items() for a in addrs
                if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    for name, address in external:  # this machine's own interfaces, whatever they are called
        assert interface_of(address) == name
