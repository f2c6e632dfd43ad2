"""The shape of the package: imports point one way (no module imports one that imports it back,
lazy imports inside functions included), and commands that need no torch do not import it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import loratools

PACKAGE = Path(loratools.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package → the package modules it imports (at any depth of the file)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                # the most specific package module named (``from .ops import execute`` → loratools.ops.execute)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("loratools") and t != "loratools":
                    graph[name].add(t)
    return graph


def test_imports_have_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_point_down() -> None:
    """The math and the readers never reach up into the flow or the CLI."""
    graph = import_graph()
    upper = {"loratools.cli", "loratools.pipeline", "loratools.ops.merge", "loratools.ops.convert",
             "loratools.ops.stack", "loratools.ops.check"}
    lower = [m for m in graph if m.startswith(("loratools.formats", "loratools.checkpoint"))] + [
        "loratools.adapter", "loratools.deltas", "loratools.layout", "loratools.verify", "loratools.ops.edits",
        "loratools.ops.plan", "loratools.ops.execute", "loratools.errors", "loratools.jsonio", "loratools.options"]
    for m in lower:
        assert not graph[m] & upper, f"{m} imports {sorted(graph[m] & upper)}"
    assert [m for m, deps in graph.items() if "loratools.cli" in deps] == ["loratools.__main__"]


def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_help_and_version_do_not_import_torch() -> None:
    assert not _imports_torch("import loratools, loratools.cli, loratools.formats, loratools.options")
    assert not _imports_torch(
        "from click.testing import CliRunner; from loratools.cli import cli; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "r = CliRunner().invoke(cli, ['--version']); assert r.exit_code == 0; "
        "r = CliRunner().invoke(cli, ['merge', '--help']); assert r.exit_code == 0")
