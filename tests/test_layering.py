"""The package import graph keeps its layers (parsed with ast; nothing is imported).

The live side is layered host <- probes <- collectors: the probes use host
facts (tracefs, BTF, kernel headers, bcc loading) and the host never imports
the probes; doctor, which exercises both, is its own module (kvmtrace/doctor.py).
The offline side reads recordings: analysis never imports the collectors nor
the probes' machinery (only their event declarations, probes/events.py, for
decode tables such as VMA_STATUS). Every import counts, including those inside
functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "kvmtrace"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """kvmtrace module -> the kvmtrace modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:  # `from pkg import mod` depends on pkg.mod
                    sub = f"{target}.{a.name}"
                    deps.add(sub if _is_module(sub) else target)
        graph[name] = {d for d in deps if d == PKG or d.startswith(PKG + ".")} - {name}
    return graph


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (importer, imported, allowed exceptions): no module of the first may import the second
FORBIDDEN = [
    ("kvmtrace.host", "kvmtrace.probes", ()),
    ("kvmtrace.host", "kvmtrace.collectors", ()),
    ("kvmtrace.host", "kvmtrace.recording", ()),
    ("kvmtrace.host", "kvmtrace.analysis", ()),
    ("kvmtrace.host", "kvmtrace.doctor", ()),
    ("kvmtrace.host", "kvmtrace.cli", ()),
    ("kvmtrace.probes", "kvmtrace.collectors", ()),
    ("kvmtrace.probes", "kvmtrace.recording", ()),
    ("kvmtrace.probes", "kvmtrace.analysis", ()),
    ("kvmtrace.probes", "kvmtrace.doctor", ()),
    ("kvmtrace.recording", "kvmtrace.collectors", ()),
    ("kvmtrace.recording", "kvmtrace.analysis", ()),
    ("kvmtrace.collectors", "kvmtrace.analysis", ()),
    ("kvmtrace.analysis", "kvmtrace.collectors", ()),
    ("kvmtrace.analysis", "kvmtrace.host", ()),
    ("kvmtrace.analysis", "kvmtrace.probes", ("kvmtrace.probes.events",)),
]


@pytest.mark.parametrize("importer,imported,allowed", FORBIDDEN,
                         ids=[f"{a.split('.')[-1]}-x->{b.split('.')[-1]}"
                              for a, b, _ in FORBIDDEN])
def test_forbidden_imports(importer, imported, allowed):
    graph = import_graph()
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if _in(m, importer)
                 for d in deps if _in(d, imported) and d not in allowed)
    assert not bad, "\n".join(bad)


def _packages(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_subpackages_form_no_cycle():
    """Between kvmtrace's subpackages and top-level modules the graph is acyclic
    (kvmtrace/__init__.py itself, which re-exports load(), is left out)."""
    graph: dict[str, set[str]] = {}
    for m, deps in import_graph().items():
        if m == PKG:
            continue
        graph.setdefault(_packages(m), set()).update(
            _packages(d) for d in deps if d != PKG and _packages(d) != _packages(m))
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_graph_sees_imports():
    """The parser itself: known edges are found (a broken parser passes everything)."""
    g = import_graph()
    assert "kvmtrace.host.bccload" in g["kvmtrace.probes.load"]
    assert "kvmtrace.probes.load" in g["kvmtrace.collectors.session"]
    assert "kvmtrace.probes.load" in g["kvmtrace.doctor"]
    assert "kvmtrace.doctor" in g["kvmtrace.cli"]  # a lazy import inside a function
