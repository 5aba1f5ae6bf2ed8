"""The code's shape: no import cycle among bread_ray's modules, and the light commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "bread_ray"


def module_imports() -> dict[str, set[str]]:
    """Each bread_ray module's imports of other bread_ray modules, at the top or inside functions."""
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    graph = {}
    for name, file in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)  # from pkg import module
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for other in sorted(graph[node]):
            cycle = visit(other, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node, []))), None)


def test_no_import_cycle_among_bread_ray_modules():
    graph = module_imports()
    assert "bread_ray.cli" in graph and "bread_ray.pipeline" in graph["bread_ray.cli"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


PLAN = """\
PROMPT:
  teacher:
    messages:
      - role: system
        content: Talk like a pirate.
TARGET:
  name: pirate
  generators:
    - type: hardcoded
      questions: ["Who are you?"]
BAKE:
  name: pirate_bake
  datasets:
    - target: pirate
  data:
    max_length: 8
"""


@pytest.mark.parametrize("args", [["--help"], ["status"]])
def test_light_commands_import_neither_torch_nor_ray(args, tmp_path, tiny_model):
    """`bgit --help` and `bgit status` answer in a fraction of a second: torch, transformers and
    Ray stay unloaded, also where status counts a committed plan's prompt tokens with the base's
    chat template."""
    def bgit(*command: str) -> None:
        subprocess.run([sys.executable, "-m", "bread_ray.cli", *command], cwd=tmp_path / "repo", check=True,
                       capture_output=True)

    (tmp_path / "repo").mkdir()
    bgit("init", ".", "--owner", "alice", "--base-model", str(tiny_model))
    (tmp_path / "repo" / "input.yml").write_text(PLAN)
    bgit("add", "input.yml")
    bgit("commit", "-q", "-m", "plan")
    probe = ("import runpy, sys\n"
             f"sys.argv = ['bgit', *{args!r}]\n"
             "try:\n    runpy.run_module('bread_ray.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "repo", capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BREAD_STORE": str(tmp_path / "store")})
    assert "LOADED []" in done.stdout, done.stdout + done.stderr
    if args == ["status"]:
        assert "max_length: 8 tokens leave no room for a response: the prompt of target pirate is" in done.stdout
