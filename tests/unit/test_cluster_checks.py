"""What the driver refuses on a cluster of several machines before any stage runs."""

import pytest

from distillery.config import ServeConfig
from distillery.core.errors import UserError
from distillery.run.cluster import check_serve_host


def test_loopback_serving_is_refused_on_several_machines_and_fine_on_one(monkeypatch):
    monkeypatch.delenv("DISTILLERY_SERVE_HOST", raising=False)
    with pytest.raises(UserError,
                       match="serve.host=127.0.0.1 on a cluster of 2 machines.*serve.host=0.0.0.0"):
        check_serve_host(ServeConfig(host="127.0.0.1"), ["198.18.0.1", "198.18.0.2"])
    check_serve_host(ServeConfig(host="127.0.0.1"), ["127.0.0.1"])  # one machine, however many nodes
    check_serve_host(ServeConfig(host="0.0.0.0"), ["198.18.0.1", "198.18.0.2"])


def test_a_serve_host_other_than_the_nodes_is_said(monkeypatch, capsys):
    from distillery.core import console

    console.configure(verbose=True, live=False)
    monkeypatch.setenv("DISTILLERY_SERVE_HOST", "0.0.0.0")
    check_serve_host(ServeConfig(host="10.0.0.5"), ["10.0.0.5", "10.0.0.6"])
    assert "DISTILLERY_SERVE_HOST=0.0.0.0" in capsys.readouterr().out


def test_serve_host_defaults_to_what_the_node_was_started_with(monkeypatch):
    monkeypatch.setenv("DISTILLERY_SERVE_HOST", "0.0.0.0")
    assert ServeConfig().host == "0.0.0.0"
    monkeypatch.delenv("DISTILLERY_SERVE_HOST")
    assert ServeConfig().host == "127.0.0.1"
