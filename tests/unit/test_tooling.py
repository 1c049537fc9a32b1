"""The checks a maintained project runs on every change, run by the test suite so CI keeps
them: the layers contract (import-linter), the lint rules (ruff) and the type check of
src/distillery (mypy), all configured in pyproject.toml, installed with the test extra beside
this Python."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent
CHECKED = ["src", "tests", "benchmarks", "jobs", "serve"]


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_layers_contracts_are_kept():
    """No import runs from a lower layer up to a higher one, nor between independent siblings
    (imports inside functions count too): every contract in pyproject.toml is checked and kept."""
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    out = _run(str(BIN / "lint-imports"), "--no-cache")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"Contracts: {contracts} kept, 0 broken." in out.stdout, out.stdout[-2000:]


def test_ruff_finds_nothing():
    """pyproject.toml's rules, line length (110) included: reflow by hand, since `ruff format`
    grows src/ by a fifth and breaks the 400-line limit."""
    out = _run(str(BIN / "ruff"), "check", "--no-cache", *CHECKED)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-1000:]


def test_no_line_is_over_110_characters():
    """ruff's E501 lets a line through whose overflow is a `# noqa` or `# type:` comment, or a
    single long word: the limit holds for every character of every line all the same."""
    lines = {f"{path.relative_to(ROOT)}:{n}": len(line) for folder in CHECKED
             for path in (ROOT / folder).rglob("*.py")
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 110}
    assert not lines, lines


def test_mypy_finds_nothing():
    """src/distillery type-checks (pyproject.toml's [tool.mypy]: its files, the pydantic plugin)."""
    out = _run(str(BIN / "mypy"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-1000:]


def test_no_room_of_the_library_imports_most_of_the_others():
    """A room (a folder of src/distillery) imports at most 8 of the 14 others, imports inside
    functions included. 8 is the pipeline's floor: it orders the five stage rooms (data,
    training, search, compression, loadtest) and keeps their books with run, config and core.
    Search and training use 8 too; a ninth arrow is a room starting to know everything."""
    import grimp

    graph = grimp.build_graph("distillery", cache_dir=None)
    rooms: dict[str, set[str]] = {}
    for module in graph.modules:
        if module.count(".") >= 1:
            room = module.split(".")[1]
            imported = {m.split(".")[1] for m in graph.find_modules_directly_imported_by(module)
                        if m.count(".") >= 1}
            rooms.setdefault(room, set()).update(imported - {room})
    assert len(rooms) >= 15, sorted(rooms)  # the graph is the whole library
    over = {room: sorted(used) for room, used in rooms.items() if len(used) > 8}
    assert not over, over
