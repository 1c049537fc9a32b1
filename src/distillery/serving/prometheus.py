"""A ready Prometheus config for a served run (`distillery serve` and the serve stage write it
into the run's serve folder): Ray's metrics agent on every node, which exports the replicas'
`distillery_*` metrics (`serving.metrics`) and Serve's own, and HAProxy's exporter.

Ray's exporter puts `ray_` before every application metric; the config takes it off the
`distillery_*` ones, so a query reads `distillery_requests_total` as `serving.metrics` names it.
Run it with `prometheus --config.file=RUN_DIR/serve/prometheus.yml`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distillery.core.files import atomic_write_bytes

FILE = "prometheus.yml"


def config(ray_targets: list[str], haproxy_targets: list[str], interval_s: float = 5.0) -> dict:
    """The scrape config: job `ray` (every node's metrics agent), job `haproxy` (the ingress)."""
    strip = {"source_labels": ["__name__"], "regex": "ray_(distillery_.*)", "target_label": "__name__",
             "replacement": "${1}"}
    jobs = [{"job_name": "ray", "static_configs": [{"targets": sorted(ray_targets)}],
             "metric_relabel_configs": [strip]}]
    if haproxy_targets:
        jobs.append({"job_name": "haproxy", "static_configs": [{"targets": sorted(haproxy_targets)}]})
    return {"global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "scrape_configs": jobs}


def write(folder: Path, ray_targets: list[str], haproxy_targets: list[str], interval_s: float = 5.0) -> Path:
    out = Path(folder) / FILE
    text = yaml.safe_dump(config(ray_targets, haproxy_targets, interval_s), sort_keys=False)
    atomic_write_bytes(out, text.encode())
    return out
