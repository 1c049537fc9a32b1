import socket
from pathlib import Path

import pytest

from distillery.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset, writing its run directory under tmp_path."""
    return load_config(ROOT / "configs" / "tiny.yaml", [f"storage_path={tmp_path / 'runs'}"])
