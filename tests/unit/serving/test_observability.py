"""What the replicas' metrics are made of, without Ray: the outcome of a request, a cascade's
counts, the Prometheus config the serve stage writes (Prometheus itself reads it in
tests/integration/test_metrics.py)."""

import json
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from distillery.models.cascade import Cascade
from distillery.serving import prometheus
from distillery.serving.protocol import ProtocolError


def test_an_outcome_names_who_was_at_fault():
    from distillery.serving.metrics import outcome

    assert outcome(None) == "ok"
    assert outcome(ProtocolError(400, "bad")) == outcome(ProtocolError(404, "no")) == "client_error"
    assert outcome(ProtocolError(503, "at capacity")) == "refused"
    assert outcome(RuntimeError("boom")) == "failed"


class Constant(nn.Module):
    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1).clone()


def test_a_cascade_counts_the_rows_it_sent_on():
    sure = Cascade(Constant([9.0, 0.0]), Constant([0.0, 1.0]), threshold=0.9)
    sure(torch.zeros(5, 1))
    assert (sure.rows, sure.escalated) == (5, 0)
    unsure = Cascade(Constant([0.1, 0.0]), Constant([0.0, 1.0]), threshold=0.9)
    unsure(torch.zeros(3, 1))
    unsure(torch.zeros(2, 1))
    assert (unsure.rows, unsure.escalated) == (5, 5)


def test_the_scrape_config_names_both_exporters_and_strips_ray_s_prefix(tmp_path):
    out = prometheus.write(tmp_path, ["10.0.0.2:8080", "10.0.0.1:8080"], ["127.0.0.1:9101"], interval_s=2)
    doc = yaml.safe_load(out.read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["ray"]["static_configs"] == [{"targets": ["10.0.0.1:8080", "10.0.0.2:8080"]}]
    assert jobs["haproxy"]["static_configs"] == [{"targets": ["127.0.0.1:9101"]}]
    relabel = jobs["ray"]["metric_relabel_configs"][0]
    assert relabel["regex"] == "ray_(distillery_.*)" and relabel["replacement"] == "${1}"
    assert doc["global"]["scrape_interval"] == "2s"
    assert "haproxy" not in {j["job_name"] for j in prometheus.config(["a:1"], [])["scrape_configs"]}


DASHBOARD = Path(__file__).parents[3] / "serve" / "grafana" / "distillery.json"


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def exported_names() -> set[str]:
    """The names Prometheus holds for what `ReplicaMetrics` creates (after the scrape config
    takes Ray's prefix off): a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`."""
    from distillery.serving import metrics

    made = [(kind, name) for kind, name, *_ in metrics.METRICS.values()]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {name + s for kind, name in made for s in suffixes[kind]}


def test_every_dashboard_query_names_a_metric_the_replicas_or_the_ingress_export():
    names = exported_names()
    assert "distillery_requests_total" in names and "distillery_request_seconds_bucket" in names
    for expr in dashboard_queries():
        used = set(re.findall(r"\b(distillery_\w+|haproxy_\w+)\b", expr))
        assert used, expr
        ours = {n for n in used if n.startswith("distillery_")}
        assert ours <= names, (expr, ours - names)
        assert used - ours <= {"haproxy_backend_http_responses_total"}, (
            expr
        )  # HAProxy's exporter (Ray starts it)


def test_a_tally_keeps_prometheus_histograms_and_hands_counts_over_once():
    from distillery.serving.tally import Tally

    tally, bounds = Tally(), [0.001, 0.01, 0.1]
    for value in (0.0005, 0.001, 0.002, 0.05, 3.0):
        tally.observe("latency", ("m",), value, bounds)
    buckets, total, count = tally.cumulative(("latency", ("m",)), bounds)
    assert buckets == [("0.001", 2), ("0.01", 3), ("0.1", 4), ("+Inf", 5)]  # le: at most the bound
    assert count == 5 and abs(total - 3.0535) < 1e-9
    tally.inc("requests", ("m", "ok"))
    tally.inc("requests", ("m", "ok"), 2)
    assert tally.take_counts() == {("requests", ("m", "ok")): 3.0}
    assert tally.take_counts() == {}  # exported once: a counter is handed over by its increments
