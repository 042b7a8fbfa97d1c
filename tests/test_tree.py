"""The package's shape, read from its source: the stages import one way (no cycle, no lower stage reaching up), and no
file edits ``sys.path`` but the one helper that finds a ComfyUI tree."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "wan_capture")
# stage of each top-level part of wan_capture, lowest first: a module imports only its own stage or lower ones
STAGES = {"grid": 0, "plan": 0, "keys": 0, "stats": 1, "capture": 2, "model_info": 2, "prompts": 2, "recording": 3,
          "views": 4, "adapters": 4, "batch": 5, "__init__": 6, "__main__": 6}


def module_imports(package: str) -> dict:
    """``{module: {modules of wan_capture it imports}}`` (``from x import name`` counts ``x.name`` where that is a
    module, else ``x``)."""
    modules = {}
    for folder, _, files in os.walk(package):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(package))[:-3].replace(os.sep, ".")
                modules[rel[:-len(".__init__")] if f == "__init__.py" else rel] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES["__init__" if len(parts) == 1 else parts[1]]


def upward(graph: dict) -> list:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if stage(d) > stage(m))


def cycles(graph: dict) -> list:
    """Import cycles, by a depth-first search with the path on a stack (imports inside functions count too)."""
    state, found = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_tree_imports_have_no_cycle_and_run_one_way():
    graph = module_imports(PACKAGE)
    assert len(graph) > 40 and "wan_capture.recording.reader" in graph
    assert set(STAGES) >= {m.split(".")[1] for m in graph if "." in m}, "a new part of wan_capture needs a stage"
    assert not upward(graph)
    assert not cycles(graph)


def test_tree_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: on a copy with a planted cycle and an upward import they do."""
    import shutil
    copy = tmp_path / "wan_capture"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    plants = {"keys.py": "from .views import render", "stats/causal.py": "from ..stats import sink_dynamics",
              "stats/sink_dynamics.py": "from . import causal"}
    for path, line in plants.items():
        with open(copy / path, "a") as f:
            f.write(f"\n{line}  # planted\n")
    graph = module_imports(str(copy))
    assert upward(graph) == ["wan_capture.keys -> wan_capture.views.render"]
    assert cycles(graph) == [["wan_capture.stats.causal", "wan_capture.stats.sink_dynamics", "wan_capture.stats.causal"]]


def test_tree_no_file_edits_sys_path():
    needle = "sys.path." + "insert"  # spelled apart, so this file is not a hit itself
    found = subprocess.run(["git", "grep", "-l", needle], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr
    assert found.stdout.split() == [], found.stdout
