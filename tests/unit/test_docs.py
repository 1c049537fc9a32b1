"""The documentation: the MkDocs site builds with no broken link or anchor, every page is in
its nav, the README stays a short front page, and the prose carries no dates or work history
(those belong in docs/decisions.md and the generated docs/benchmarks.md)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Pages allowed to carry dates: the decision log, the page generated from dated results, and
# the reference pages generated from the code.
DATED = {"decisions.md", "benchmarks.md"}
GENERATED_DIR = "reference"
# README's blocks that benchmarks/figures.py writes from the result files
FIGURES = re.compile(r"<!-- (figures|console):begin -->.*?<!-- \1:end -->", re.S)
# A measured figure: a percentage (other than a confidence level), a rate, a latency, a duration.
MEASURED = re.compile(r"\b\d[\d,.]*\s*(?:%(?! interval| CI| confidence)|requests/s|images/s|img/s|ms\b"
                      r"|min\b|x faster)")

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
          r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?")
_FULL_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
DATES = [
    re.compile(r"\b(?:19|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"),  # 2026-12-01
    # December 2026, Dec 6, 2026
    re.compile(rf"\b{_MONTH}\s+(?:\d{{1,2}}(?:st|nd|rd|th)?,?\s+)?(?:19|20)\d{{2}}\b"),
    re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\b"),  # 6 December
    re.compile(rf"\b{_FULL_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?\b"),  # December 6
]
HISTORY = re.compile(r"\b(?:this|last|earlier|previous|next)\s+rounds?\b", re.I)


def _nav_pages(nav) -> list[str]:
    """Every page a mkdocs nav names, at any depth."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _prose_files() -> list:
    pages = [p for p in sorted(DOCS.rglob("*.md"))
             if p.relative_to(DOCS).parts[0] != GENERATED_DIR and p.name not in DATED]
    return [README, *pages]


def _prose(path) -> str:
    text = path.read_text()
    return FIGURES.sub("", text) if path == README else text


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - in_nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - in_nav)}"
    assert not in_nav - pages, f"nav entries without a page: {sorted(in_nav - pages)}"


def test_the_readme_is_a_short_front_page():
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_readme_links_into_the_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", README.read_text())
    assert links, "README.md links to no docs page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("pattern", DATES + [HISTORY], ids=["iso-date", "month-year", "day-month",
                                                             "month-day", "work-history"])
def test_prose_has_no_dates_or_work_history(pattern):
    found = [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for path in _prose_files()
             for m in pattern.finditer(_prose(path))]
    assert not found, f"dates and project history belong in docs/decisions.md: {found}"


def test_the_readme_quotes_figures_only_from_its_generated_blocks():
    """Every measured figure on the front page comes from a result file (machine, date, commit),
    through benchmarks/figures.py: none typed into the prose, where it would go stale."""
    found = [m.group(0) for m in MEASURED.finditer(_prose(README))]
    assert not found, f"figures in README.md's prose (put them in a result file and its block): {found}"
