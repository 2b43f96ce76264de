"""Layers that point one way: no import circle in appliance/, and the log's own paths load no Flask."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.db import Database

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "appliance"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that a file imports, at its top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], base]))
            # "from a import b" imports the module a.b where there is one, else a name of a.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules around it (the first one again at the end); None when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_appliance_has_no_import_circle():
    graph = import_graph()
    assert "appliance.db" in graph["appliance.cli"]  # imported inside a function: those count too
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def modules_loaded(*args: str, env: dict | None = None) -> set[str]:
    """Every module a fresh interpreter imports to run ``python *args`` (as ``-X importtime`` lists them)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    timings = [line for line in proc.stderr.splitlines() if line.startswith("import time:")][1:]  # after the header
    return {line.rsplit("|", 1)[1].strip() for line in timings}


def flask_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "flask" or m.startswith("flask."))


@pytest.mark.parametrize("module", ["appliance.errors", "appliance.db", "appliance.audit.verify"])
def test_the_log_and_its_errors_load_without_flask(module):
    loaded = modules_loaded("-c", f"import {module}")
    assert module in loaded and not flask_in(loaded)


def test_logs_verify_loads_without_flask(tmp_path):
    Database(tmp_path / "logs.db").close()
    loaded = modules_loaded("-m", "appliance", "logs", "verify", "--home", str(tmp_path),
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "appliance.audit.verify" in loaded and not flask_in(loaded)
