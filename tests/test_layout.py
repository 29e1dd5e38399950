"""The import graph (docs/LAYOUT.md): no circle, and no import from a lower floor to a higher one.

Every ``from dori... import`` and ``import dori...`` counts, at module level or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "dori"

# Floors from the bottom; a module may import from its own floor or below. The keys are the first
# name under ``dori``: a file, or a package, all of whose modules share its floor.
FLOORS = [
    {"errors", "fields", "configs", "run_files", "data"},
    {"runs", "report_images", "parallel"},
    {"models"},
    {"measure", "interventions", "toy"},
    {"prompts", "references"},
    {"attack", "mitigate", "unlearn"},
    {"evaluation", "plots", "locality", "report", "bundled"},
    {"stages"},
    {"options", "cli", "__main__"},
]
MAX_LINES = 450  # a module's length, the model interface aside
LONGER = {"models/base.py"}


def _floor(module: str) -> int | None:
    parts = module.split(".")[1:]
    for level, names in enumerate(FLOORS):
        if parts and parts[0] in names:
            return level
    return None


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for file in ROOT.rglob("*.py"):
        name = ".".join(("dori", *file.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = file
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dori":
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "dori"]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def test_every_module_has_a_floor():
    assert [name for name in import_graph() if name != "dori" and _floor(name) is None] == []


def test_no_import_runs_up_a_floor():
    up = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
          if a != "dori" and b != "dori" and _floor(b) > _floor(a)]  # fmt: skip
    assert up == []


def test_no_module_is_longer_than_the_bar():
    long = {str(f.relative_to(ROOT)): n for f in ROOT.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= LONGER, long


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    graph.pop("dori", None)
    for targets in graph.values():
        targets.discard("dori")
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in seen:
                visit(nxt, path + [node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])
    assert circles == []


def test_importing_the_cli_loads_no_model_library():
    # `dori --help` must answer at once: torch, diffusers and transformers load only when a command runs.
    code = "import sys, dori.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_s_help_line_is_the_readme_s_commands_table():
    # The README's table and `dori CMD --help` say the same thing, so they cannot drift apart.
    import re

    import typer.main

    from dori.cli import app

    readme = (ROOT.parents[1] / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and cells[0].startswith("`dori "):
            words = []
            for word in cells[0].strip("`").split()[1:]:
                if word.startswith("-"):
                    break
                words.append(word)
            rows[" ".join(words)] = cells[1].replace("\\|", "|")

    helps = {}

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, [*prefix, name])
            else:
                helps[" ".join([*prefix, name])] = " ".join((command.help or "").split("\n\n")[0].split())

    walk(typer.main.get_command(app), [])
    assert rows == helps
