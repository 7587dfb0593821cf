"""The tree's layering, read from the source with ``ast`` (no module is imported):

* the library (everything but the tool packages) never imports a tool module;
* no module edits ``sys.path``;
* the import graph of ``cp_megatron.*`` has no cycles (imports inside functions count:
  a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cp_megatron"
TOOL_PACKAGES = ("cp_megatron.cli", "cp_megatron.bench", "cp_megatron.serve",  # command line, suites, server
                 "cp_megatron.dryrun",  # the dry run traces the library; the library never imports it
                 "cp_megatron.job")  # a run job (pre-flight, ranks, turns) for cli.run and the suites


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The package module that ``import name`` loads last (None: outside the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Package modules imported anywhere in ``module`` (module level or inside functions)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else _target(base))
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOL_PACKAGES)


@pytest.mark.unit
def test_the_walk_sees_the_known_edges():
    # guards the test itself: a walker that finds nothing would pass everything below
    assert "cp_megatron.engine" in GRAPH["cp_megatron.factory"]
    assert "cp_megatron.factory" in GRAPH["cp_megatron.job"] and "cp_megatron.job" in GRAPH["cp_megatron.cli.run"]
    assert "cp_megatron.attention.heuristic" in GRAPH["cp_megatron.attention"]
    assert len(MODULES) > 40 and any(_is_tool(m) for m in MODULES)


@pytest.mark.unit
def test_no_library_module_imports_a_tool_module():
    bad = {m: sorted(t for t in targets if _is_tool(t)) for m, targets in GRAPH.items() if not _is_tool(m)}
    assert not {m: t for m, t in bad.items() if t}, "library modules import tools"


@pytest.mark.unit
def test_only_the_command_line_imports_the_command_line():
    # cli/ parses arguments and calls a job; a suite or the server calls the job itself
    # (cp_megatron.job), never the command line above it
    bad = {m: sorted(t for t in targets if t.startswith("cp_megatron.cli"))
           for m, targets in GRAPH.items() if not m.startswith("cp_megatron.cli")}
    assert not {m: t for m, t in bad.items() if t}


# Readers, writers and the converter sit below the model and the engine: they may use the
# pure key/layout tables and the TP rule, never the runtime.
RUNTIME = ("cp_megatron.engine", "cp_megatron.factory", "cp_megatron.session", "cp_megatron.launcher",
           "cp_megatron.preflight", "cp_megatron.model.llama", "cp_megatron.attention", "cp_megatron.parallel_state")


@pytest.mark.unit
def test_checkpoint_package_does_not_import_the_runtime():
    bad = {m: sorted(t for t in targets if t.startswith(RUNTIME))
           for m, targets in GRAPH.items() if m.startswith("cp_megatron.checkpoint")}
    assert not {m: t for m, t in bad.items() if t}


@pytest.mark.unit
def test_no_module_edits_sys_path():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py")) + \
            sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.unit
def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.unit
def test_import_graph_has_no_cycles():
    assert _cycles(GRAPH) == []
