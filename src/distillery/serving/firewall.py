"""The firewall rules a node of a distillery cluster applies (`distillery firewall | nft -f -`,
cluster.yaml's start commands): users reach the ingress and nothing else.

On a cluster of several machines Serve's listeners bind every interface (`serve.host=0.0.0.0`):
Ray addresses a replica on another node at that node's address and one on the same node at
127.0.0.1, so no single address serves both (cluster.yaml's comments, docs/reliability.md).
What keeps the replica ports and fallback proxies away from users is this rule set: from
the nodes' own range every port is open (Ray and Serve talk among the nodes on many ports),
from anywhere else only the ports named open (the ingress; Ray's token-protected dashboard
and GCS where operators reach them that way). Refused connections get a TCP reset, so a
client learns at once instead of waiting for a timeout. nftables, Debian's `nftables`.
"""

from __future__ import annotations

import ipaddress

from distillery.core.errors import UserError

TABLE = "distillery"


def rules(nodes: list[str], open_ports: list[int]) -> str:
    """An nftables script (for `nft -f -`) that replaces the table `distillery`: TCP from
    `nodes` (CIDRs) anywhere, from elsewhere only to `open_ports`."""
    nets = [_network(n) for n in nodes]
    if not nets:
        raise UserError("distillery firewall: name the nodes' range with --nodes CIDR (the cluster's subnet)")
    if not open_ports or not all(0 < p < 65_536 for p in open_ports):
        raise UserError(f"distillery firewall: --open needs ports between 1 and 65535, got {open_ports}")
    v4 = ", ".join(str(n) for n in nets if n.version == 4)
    v6 = ", ".join(str(n) for n in nets if n.version == 6)
    ports = ", ".join(str(p) for p in sorted(set(open_ports)))
    lines = [
        f"table inet {TABLE}", f"delete table inet {TABLE}",  # declare, then delete: replaces a previous one
        f"table inet {TABLE} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        *([f"    ip saddr {{ {v4} }} accept"] if v4 else []),
        *([f"    ip6 saddr {{ {v6} }} accept"] if v6 else []),
        f"    tcp dport {{ {ports} }} accept",
        "    meta l4proto tcp reject with tcp reset",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise UserError(f"distillery firewall: --nodes {cidr!r} is not an address range "
                        "(e.g. 10.0.0.0/16)") from None


def parse_ports(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"distillery firewall: --open {text!r}: comma-separated port "
                        "numbers, e.g. 8000,8001") from None
