"""The house keeps its shape: the static import graph of yarnkit/ has no cycle, yarnkit/train/ imports go one way
down README's list, the stages import one way (export/, runtime/ and eval/ import nothing from train/; the
package root imports no stage; nothing but bench/ imports bench/), no module starts a script by its path (a
command runs as `python -m yarnkit...`), README's layout section names exactly the files that exist, and scripts
import only `yarnkit` (no sys.path edits, no script importing another script). Reads source files with `ast`;
imports nothing of yarnkit.

Run: python -m pytest tests/test_layout.py -q   (< 1 s)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "yarnkit"
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the yarnkit modules it imports anywhere in its file (function bodies too), with their packages."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        edges = set()
        for target in (t for t in targets if t.split(".")[0] == "yarnkit"):
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)  # packages run first
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "yarnkit.train.trainer" in graph and "yarnkit.runs" in graph["yarnkit.export.source"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


STAGES = ("train", "export", "runtime", "eval", "bench")


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


@pytest.mark.parametrize("stage", ["export", "runtime", "eval"])
def test_later_stages_import_nothing_from_train(stage):
    """Training is a stage, not a library: what export, the runtime and evaluation share with it lives at the root
    (runs, corpus, patch, nll, sdpa, errors)."""
    graph = import_graph()
    reached = {f"{name} -> {dep}" for name, deps in graph.items() if stage_of(name) == stage
               for dep in deps if stage_of(dep) == "train"}
    assert not reached, f"yarnkit/{stage}/ imports yarnkit/train/: {sorted(reached)}"


def test_the_package_root_imports_no_stage_and_only_bench_imports_bench():
    """Root modules are the shared pieces every stage may use (cli.py reaches the commands by name, on demand);
    benchmarks sit on top of everything and nothing depends on them."""
    graph = import_graph()
    root = {f"{name} -> {dep}" for name, deps in graph.items() if stage_of(name) is None and name != "yarnkit.cli"
            for dep in deps if stage_of(dep)}
    assert not root, f"root modules import stages: {sorted(root)}"
    bench = {f"{name} -> {dep}" for name, deps in graph.items() if stage_of(name) != "bench"
             for dep in deps if stage_of(dep) == "bench"}
    assert not bench, f"modules outside yarnkit/bench/ import it: {sorted(bench)}"


def script_paths_named(path: Path) -> list[str]:
    """String constants of a module (docstrings aside) that name a script file: `scripts/x.py`, or the
    `"scripts"` part of a path joined piece by piece."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and (re.search(r"scripts/[\w.-]+\.py", node.value) or node.value.strip("/") == "scripts")]


def test_no_module_starts_a_script_by_its_path():
    """A script is not part of an installed package: what the package launches runs as `python -m yarnkit...`."""
    named = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in script_paths_named(path)]
    assert not named, "modules that name a script file (launch `python -m yarnkit...` instead):\n" + "\n".join(named)


def test_the_script_path_finder_finds_one(tmp_path):
    module = tmp_path / "launcher.py"
    module.write_text('"""Runs scripts/train.py."""\nCOMMAND = ["python", "scripts/train.py"]\n'
                      'OTHER = REPO / "scripts" / "bench.py"\n')
    assert [hit.split(": ", 1)[1] for hit in script_paths_named(module)] == ["'scripts/train.py'", "'scripts'"]


def test_train_modules_import_only_those_above_them_in_readme():
    """README lists yarnkit/train/ "imports going one way down this list": each module imports only earlier ones."""
    order = [name.removesuffix(".py") for name in readme_tree()["yarnkit/train/"]]
    graph = import_graph()
    for i, name in enumerate(order):
        used = {dep.rsplit(".", 1)[1] for dep in graph[f"yarnkit.train.{name}"] if dep.startswith("yarnkit.train.")}
        later = sorted(used - set(order[:i]))
        assert not later, f"yarnkit/train/{name}.py imports {later}, which README lists below it"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def readme_tree() -> dict[str, list[str]]:
    """folder (relative path, '' = root) -> the entries README's layout block lists in it, in order."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Layout.*?^```\n(.*?)^```", text, re.S | re.M).group(1)
    tree: dict[str, list[str]] = {"": []}
    parents = [""]
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)(?:\s{2,}|$)", line)
        if not match or len(match.group(1)) >= 20:  # a description's continuation line
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        del parents[depth + 1:]
        folder = parents[depth]
        tree.setdefault(folder, []).append(name)
        if name.endswith("/"):
            parents.append(f"{folder}{name}")
            tree.setdefault(f"{folder}{name}", [])
    return tree


def listed_in_folder(folder: Path) -> set[str]:
    """What a folder's listing must name: its Python files (not __init__.py) and its subfolders."""
    return ({p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
            | {f"{p.name}/" for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"})


def test_readme_layout_matches_the_tree():
    tree = readme_tree()
    assert {"scripts/", "recipes/", "yarnkit/", "yarnkit/train/", "yarnkit/bench/"} <= set(tree)
    for folder, names in tree.items():
        for name in names:
            assert (REPO / folder / name).exists(), f"README's layout names {folder}{name}, which does not exist"
        if folder and names:  # a folder whose contents are listed lists all of them
            assert set(names) == listed_in_folder(REPO / folder), f"README's layout of {folder} is out of date"


def test_readme_tree_parser_reads_nesting():
    assert readme_tree()["yarnkit/train/"][0] == "pose.py"
    assert "accelerate/" in readme_tree()["recipes/"]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_edits_sys_path(script):
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        assert not (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"), f"{script.name}:{node.lineno} touches sys.path"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_another_script(script):
    others = {s.stem for s in SCRIPTS} - {script.stem}
    assert not imports_of(script) & others, f"{script.name} imports {sorted(imports_of(script) & others)}"
