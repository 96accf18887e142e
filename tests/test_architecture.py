"""The house rules of the code, checked on every CI run (docs/ARCHITECTURE.md).

- The dependency rule: import-linter's contracts in pyproject.toml ([tool.importlinter]):
  cli > demo > api > agent | client > net > security > mux, the shared leaves import no
  side, the mux core is sans-IO, click only in the CLI, QEMU only in the agent.
- No import cycles between vproxy's modules, counting imports inside functions too.
- An import inside a function is there for start-up time ("# lazy: ...") or because
  the module may be missing ("# optional: ..."), and says so in a comment on it or on
  the comment lines just above it; any other import belongs at the top.
- ruff and mypy pass with the settings in pyproject.toml (mypy strict for vproxy.mux and
  vproxy.net).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vproxy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail("%s is not installed next to %s: pip install -e '.[test]'" % (name, sys.executable))
    return str(path)


def _run(args: List[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, NO_COLOR="1", PYTHONPATH=str(ROOT)))


def test_the_layers_hold():
    out = _run([_tool("lint-imports"), "--no-cache"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.lower().replace("0 broken", "")


def test_ruff_is_clean():
    out = _run([_tool("ruff"), "check", "--no-cache", "vproxy", "tests", "bench", "fuzz", "build.py"])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_is_clean():
    out = _run([_tool("mypy")], timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- import graph

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> Set[str]:
    """vproxy modules that `name` imports anywhere, but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update("%s.%s" % (target, a.name) for a in node.names)
    return {m for m in out if m == "vproxy" or m.startswith("vproxy.")}


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), as sorted lists."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_edge(importer: str, imported: str) -> bool:
    """A package's __init__ importing its own submodules (re-exports), or a submodule
    importing its package's __init__ for them: not a cycle between concerns."""
    return imported.startswith(importer + ".") or importer.startswith(imported + ".")


def test_no_import_cycles():
    graph = _graph()
    graph = {m: {i for i in imported if not _package_edge(m, i)} for m, imported in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --------------------------------------------------------------------------- lazy imports

def _unexplained_lazy_imports(path: Path) -> List[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    out = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if not _explained(lines, node.lineno - 1):
                out.append("%s:%d: %s" % (path.relative_to(ROOT), node.lineno, lines[node.lineno - 1].strip()))
    return out


def _explained(lines: List[str], i: int) -> bool:
    """"lazy" or "optional" in a comment on the import, or in the comment lines,
    imports or `try:` just above it."""
    if _says_why(lines[i]):
        return True
    j = i - 1
    while j >= 0:
        text = lines[j].strip()
        if text.startswith("#"):
            if _says_why(text):
                return True
        elif text == "try:":
            pass  # the comment may stand above the try of an optional import
        elif not (text.startswith("import ") or text.startswith("from ")):
            return False
        elif _says_why(text):
            return True
        j -= 1
    return False


def _says_why(line: str) -> bool:
    comment = line.partition("#")[2]
    return "lazy" in comment or "optional" in comment


def test_imports_inside_functions_are_for_start_up_time_and_say_so():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _unexplained_lazy_imports(path)
    assert found == [], ("imports inside functions without a '# lazy: why' or '# optional: why' "
                         "comment:\n" + "\n".join(found))


def test_the_lazy_import_check_sees_an_unexplained_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    import json\n\n\ndef g():\n    # lazy: json is slow\n    import json\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _unexplained_lazy_imports(bad) == ["x.py:2: import json"]
    finally:
        ROOT = saved
