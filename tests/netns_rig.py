"""Machines of their own on this one: Linux network namespaces on a bridge, each with its own
address, as PLATFORM.md's rig describes. Used by tests/integration/test_cluster_rig.py.

A bridge in this (the root) namespace holds 198.18.0.254/24, the address of the servers the
test runs here (the S3 server); every machine is a namespace with `lo` up and a veth `eth0`
on the bridge at 198.18.0.N. Only 198.18.0.0/24, the range reserved for network benchmarks,
and only inside namespaces made here. Namespaces do not separate process ids: whatever runs
in one is stopped by its process id (`ray_nodes.kill_tree`), never by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SUBNET = "198.18.0"
HOST = f"{SUBNET}.254"  # this namespace's address on the bridge


def unavailable() -> str | None:
    """Why a rig cannot be made here (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    missing = [tool for tool in ("ip", "unshare", "nft", "mount") if not shutil.which(tool)]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux, nftables)"
    probe = f"dprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot create a network namespace: {made.stderr.strip()}"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


class Rig:
    """`Rig()`, then `add(name, n)` per machine (address 198.18.0.n), `exec(name)` as a
    command prefix, `link(name, up)` to partition one, `remove()` at the end."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.tag, self.bridge = tag, f"dbr{tag}"
        self.addresses: dict[str, str] = {}
        self.on_add = lambda name: None  # what a new machine gets before anything runs on it (its firewall)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{HOST}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def namespace(self, name: str) -> str:
        return f"d{self.tag}{name}"

    def add(self, name: str, n: int) -> str:
        """A machine `name` at 198.18.0.`n`; returns its address."""
        ns, veth = self.namespace(name), f"v{self.tag}{n}"
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.addresses[name] = f"{SUBNET}.{n}"
        self.on_add(name)
        return self.addresses[name]

    def exec(self, name: str, private: Path | None = None) -> list[str]:
        """The prefix that runs a command on machine `name`; with `private`, that folder is a
        disk of the machine's own (a tmpfs in a mount namespace of its own): what another
        machine writes there, this one does not see."""
        prefix = ["ip", "netns", "exec", self.namespace(name)]
        if private is None:
            return prefix
        private.mkdir(parents=True, exist_ok=True)
        return [*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private)]

    def run(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec(name), *argv], **kwargs)

    def link(self, name: str, up: bool) -> None:
        """Cut machine `name` off the network (its link down) or put it back."""
        _ip("-n", self.namespace(name), "link", "set", "eth0", "up" if up else "down")

    def remove(self) -> None:
        """Delete the namespaces and the bridge (stop what runs in them first: a process
        outlives its namespace's deletion)."""
        for name in self.addresses:
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
