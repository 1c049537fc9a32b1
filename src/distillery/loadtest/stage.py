"""The `serve` stage of a run: the frontier deployed on Ray Serve (`serving.launch`), then
load-tested over HTTP (`loadtest.run`); left out with `serve.enabled: false`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery.config import PipelineConfig
from distillery.core import console
from distillery.run.rundir import RunDir

Log = Callable[[str], None]


def serve_models(run: RunDir, cfg: PipelineConfig, log: Log) -> tuple[list[Path], dict[str, Any]]:
    """Deploy the frontier on Ray Serve (autoscaled) and load-test it over HTTP."""
    from distillery.loadtest.run import run_loadtest, summary, summary_line  # Ray Serve loads only here
    from distillery.serving.launch import deploy_run, write_serve_config  # Ray Serve loads only here

    config = write_serve_config(run.location, cfg, run.root / "serve" / "config.yaml")
    url, headers = deploy_run(run.location, cfg, log, run.root / "serve")
    files = run_loadtest(url.removesuffix("/v2"), run.root, cfg.loadtest, headers,
                         run.root / "serve" / "loadtest", console.detail, slo_ms=cfg.serve.auto_slo_ms)
    log(summary_line(files[0]))
    return [config, *files], {"url": url, **summary(files[0])}
