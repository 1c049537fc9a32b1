"""The shape of the package: stage folders, no import cycles, Ray only at the edges,
files and functions a reader can hold in their head (issue 21's rules, kept by a test)."""

import ast
import statistics
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "src" / "distillery"
# The modules that talk to Ray; everything else imports and runs without it.
RAY_EDGE = {
    "distillery.run.cluster",
    "distillery.compat.worker",
    "distillery.compat.logs",
    "distillery.training.on_ray",
    "distillery.training.epoch_feed",
    "distillery.training.logits_cache",
    "distillery.serving.serve_apps",
    "distillery.serving.auto_router",
    "distillery.serving.metrics",
    "distillery.serving.grpc_app",
    "distillery.serving.launch",
    "distillery.loadtest.run",
    "distillery.search.on_tune",
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules this one imports when it is imported (not inside functions)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {i for i in _top_level_imports(t) if i in modules and i != m} for m, t in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2
    for m in sorted(modules):
        if m not in state:
            visit(m, [])


def test_ray_is_imported_only_at_the_edges():
    modules = _modules()
    importing_ray = {m for m, t in modules.items() if any(i == "ray" or i.startswith("ray.")
                                                          for i in _top_level_imports(t))}
    assert importing_ray <= RAY_EDGE, importing_ray - RAY_EDGE
    core = sorted(m for m in modules if not any(m == e or m.startswith(e + ".") for e in RAY_EDGE)
                  and not any(i in RAY_EDGE for i in _top_level_imports(modules[m])))
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {core!r}]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing the core loaded Ray: {out.stdout[:300]}"


def test_no_file_over_400_lines():
    """Source and test files alike: a test file that keeps growing hides what it covers."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in files}
    assert max(sizes.values()) <= 400, {str(p): n for p, n in sizes.items() if n > 400}


def test_median_function_is_at_most_10_lines():
    lengths = [n.end_lineno - n.lineno + 1 for t in _modules().values() for n in ast.walk(t)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert statistics.median(lengths) <= 10, statistics.median(lengths)


def test_every_stage_folder_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, \
            f"{init.relative_to(ROOT)}: needs a docstring saying what the folder owns"
