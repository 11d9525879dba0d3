"""The product's layering: no import cycle; the contract (``turnfleet``) imports none of the
components nor the shell; the components (``turnfleet.producer``, ``.workers``, ``.telemetry``)
import the contract, never each other nor the shell; and nothing is installed outside the
``turnfleet`` namespace.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), so a cycle cannot hide behind ``import`` in a function body.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder in the checkout -> the package it installs as
PACKAGES = {
    "turnfleet": "turnfleet",
    "producer": "turnfleet.producer",
    "workers": "turnfleet.workers",
    "telemetry": "turnfleet.telemetry",
    "shell": "turnfleet.shell",
}
COMPONENTS = ("turnfleet.producer", "turnfleet.workers", "turnfleet.telemetry")
SHELL = "turnfleet.shell"


def _layer(module: str) -> str:
    """``turnfleet`` (the contract), ``turnfleet.shell`` or one component."""
    for package in (*COMPONENTS, SHELL):
        if module == package or module.startswith(package + "."):
            return package
    return "turnfleet"


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join((package, *parts)).removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the product modules it imports (``from x import y`` counts ``x.y`` when that
    is a module, else ``x``)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.update(known(f"{node.module}.{a.name}") or known(node.module) for a in node.names)
        graph[name] = {d for d in deps if d and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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


def test_the_product_has_no_import_cycle():
    graph = import_graph()
    assert "turnfleet.producer.http" in graph["turnfleet.shell.server"]  # the scan sees lazy imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up or sideways: the contract imports only itself; a component the
    contract and itself; only the shell imports the components."""
    allowed = {"turnfleet": {"turnfleet"}, SHELL: {"turnfleet", SHELL, *COMPONENTS}}
    return sorted(
        f"{module} imports {dep}"
        for module, deps in graph.items()
        for dep in deps
        if _layer(dep) not in allowed.get(_layer(module), {"turnfleet", _layer(module)})
    )


def test_each_layer_imports_only_those_below_it():
    assert crossings(import_graph()) == []


def test_the_layer_check_sees_each_kind_of_crossing():
    graph = {
        "turnfleet.keys": {"turnfleet.workers.job"},             # contract -> component
        "turnfleet.models": {"turnfleet.shell.render"},          # contract -> shell
        "turnfleet.telemetry.find": {"turnfleet.producer.api"},  # component -> component
        "turnfleet.workers.job": {"turnfleet.shell.cli", "turnfleet.keys"},  # component -> shell
        "turnfleet.shell.cli": {"turnfleet.workers.job", "turnfleet.keys"},  # fine
    }
    assert crossings(graph) == [
        "turnfleet.keys imports turnfleet.workers.job",
        "turnfleet.models imports turnfleet.shell.render",
        "turnfleet.telemetry.find imports turnfleet.producer.api",
        "turnfleet.workers.job imports turnfleet.shell.cli",
    ]


def test_only_the_turnfleet_namespace_is_installed(tmp_path):
    """Outside the checkout, ``import workers`` (``telemetry``, ``producer``, ``shell``) fails,
    and the installed packages are the ``turnfleet.*`` ones, from these folders."""
    code = (
        "import importlib, json\n"
        "out = {}\n"
        "for name in ('workers', 'telemetry', 'producer', 'shell'):\n"
        "    try:\n"
        "        importlib.import_module(name); out[name] = 'imported'\n"
        "    except ImportError:\n"
        "        out[name] = 'missing'\n"
        "import turnfleet.workers.job, turnfleet.telemetry.consumer, turnfleet.producer.api, turnfleet.shell.cli\n"
        "out['turnfleet.workers'] = turnfleet.workers.__file__\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json
    out = json.loads(proc.stdout)
    assert {k: out[k] for k in ("workers", "telemetry", "producer", "shell")} == dict.fromkeys(
        ("workers", "telemetry", "producer", "shell"), "missing")
    assert Path(out["turnfleet.workers"]).name == "__init__.py"


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_module_is_imported_by_its_folder_name(folder):
    """Inside the checkout a folder would import as a top-level package too (twice, as two
    module objects): no code says ``from workers ...``."""
    if folder == "turnfleet":
        return
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(ROOT.rglob("*.py")) if not any(part.startswith(".venv") for part in path.parts)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith((f"from {folder}.", f"from {folder} ", f"import {folder}"))
    ]
    assert offenders == []
