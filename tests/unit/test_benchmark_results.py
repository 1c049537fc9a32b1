"""Benchmark results are data: every current result says what ran, where, when and on which
code, is named after that, is the only one of its script on its machine, and the published
figures (docs/benchmarks.md, README's block) are what benchmarks/figures.py computes from them."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _load(name):
    """A module of benchmarks/ by its path: the folder holds scripts, not a package, and on
    sys.path its names (serving, search, storage) would shadow others."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures, common = _load("figures"), _load("common")

CURRENT = sorted((BENCHMARKS / "results").glob("*.json"))
NAME = re.compile(r"(?P<name>[a-z_]+(-[a-z0-9]+)?)_(?P<slug>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})\.json")


def _meta(path):
    return json.loads(path.read_text())["meta"]


def test_there_are_current_results():
    assert CURRENT


@pytest.mark.parametrize("path", CURRENT, ids=lambda p: p.name)
def test_a_result_says_what_ran_where_when_and_on_which_code(path):
    meta = _meta(path)
    for key in ("script", "args", "machine", "date", "commit", "versions"):
        assert key in meta, f"{path.name}: meta has no {key}"
    assert (BENCHMARKS / f"{meta['script']}.py").is_file(), f"{path.name}: no script {meta['script']}.py"
    assert {"cpu", "cores", "gpu", "slug"} <= set(meta["machine"])
    assert {"hash", "dirty"} <= set(meta["commit"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["date"])


@pytest.mark.parametrize("path", CURRENT, ids=lambda p: p.name)
def test_a_result_is_named_after_its_meta(path):
    meta = _meta(path)
    match = NAME.fullmatch(path.name)
    assert match, f"{path.name} is not <script>[-<variant>]_<machine>_<date>.json"
    variant = f"-{meta['variant']}" if meta.get("variant") else ""
    assert match["name"] == meta["script"] + variant
    assert match["slug"] == meta["machine"]["slug"]
    assert match["date"] == meta["date"]


def test_one_current_result_per_script_and_machine():
    seen = {}
    for path in CURRENT:
        meta = _meta(path)
        key = (meta["script"], meta.get("variant"), meta["machine"]["slug"])
        assert key not in seen, f"{path.name} and {seen[key]}: move the older one to results/archive/"
        seen[key] = path.name


def test_the_published_figures_are_those_of_the_results():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "figures.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_script_has_a_section_or_is_listed_as_not_yet_run():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    sections = set(re.findall(r"^## (\S+)$", page, re.M))
    not_run = page.partition(figures.NOT_RUN)[2]
    for script in figures.scripts():
        assert script in sections or f"- `{script}`" in not_run, f"{script}: no section in docs/benchmarks.md"
    assert figures.scripts() and "common" not in figures.scripts()


def test_the_machine_slug_is_short_and_stable():
    assert common.machine_slug("AMD EPYC 7B13", 2, None) == "amd-epyc-7b13-2c"
    assert common.machine_slug("Intel(R) Xeon(R) Processor", 2, None) == "intel-xeon-2c"
    assert common.machine_slug("AMD EPYC", 16, "NVIDIA H100 80GB HBM3") == "h100"
    assert common.machine_slug(None, None, "NVIDIA H200 x8") == "h200x8"


def test_a_newer_result_retires_the_older_one(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "ARCHIVE", tmp_path / "archive")
    monkeypatch.setattr(common, "ROOT", tmp_path.parent)
    for name in ("serving_amd-epyc-2c_2026-01-01.json", "serving_intel-xeon-2c_2026-01-01.json",
                 "serving-x_amd-epyc-2c_2026-01-01.json"):
        (tmp_path / name).write_text("{}")
    common.retire_older(tmp_path / "serving_amd-epyc-2c_2026-02-01.json")
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "serving-x_amd-epyc-2c_2026-01-01.json", "serving_intel-xeon-2c_2026-01-01.json"]
    assert [p.name for p in (tmp_path / "archive").iterdir()] == ["serving_amd-epyc-2c_2026-01-01.json"]
