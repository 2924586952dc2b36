"""The project's layout rules, read from the code itself (ast), so that they hold as the code grows:

- no script imports another script, and the library (medextract/, qwen1_8/, utils.py) imports no script;
- nothing in the library exits the process or reads argv: it raises typed errors, and scripts turn them into one line;
- nothing edits sys.path (pyproject.toml gives pytest the root; bench runs as `python -m bench.bench_predict`);
- each helper is defined once: no top-level function or class name is defined in two modules, but each script's own
  entry points (main, parse_args and its flag checks).

A script is a .py file of the repository outside tests/ with an `if __name__ == "__main__":` block.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = ("medextract", "qwen1_8")
ENTRY_POINTS = {"main", "parse_args", "check_flags", "validate"}  # each script's own: its argv and its flags
SKIP_DIRS = {".venv", ".git", "tests", "__pycache__", "demo_out", "node_modules"}


def python_files() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found)


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_script(module: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in module.body)


def imported_modules(module: ast.Module, name: str) -> set[str]:
    """Every module an import statement names, absolute (relative imports resolved against `name`)."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found |= {f"{prefix}.{alias.name}" for alias in node.names}
    return found


FILES = python_files()
TREES = {path: tree(path) for path in FILES}
SCRIPTS = {module_name(p): p for p, t in TREES.items() if is_script(t)}
# the library: utils.py and the packages' modules, but a script among them (python -m qwen1_8.make_tiny)
LIBRARY = [p for p in FILES if (p.relative_to(ROOT).parts[0] in LIBRARY_DIRS or p.name == "utils.py")
           and module_name(p) not in SCRIPTS]


def test_the_rules_see_the_project():
    """The walk finds what it should, so that the rules below cannot pass by finding nothing."""
    assert {"train", "predict", "merge_params", "serve", "test_openai", "test_qwen", "evaluate", "export_qwen2",
            "data_helper", "bench.bench_predict", "bench.bench_train"} <= set(SCRIPTS)
    assert {"medextract.engine", "medextract.inference", "medextract.api", "utils"} <= {module_name(p)
                                                                                      for p in LIBRARY}


def test_no_script_imports_a_script_and_the_library_imports_none():
    offences = []
    for path, module in TREES.items():
        name = module_name(path)
        if name not in SCRIPTS and path not in LIBRARY:
            continue
        for imported in imported_modules(module, name):
            if imported in SCRIPTS and imported != name:
                offences.append(f"{path.relative_to(ROOT)} imports the script {imported}")
    assert not offences, "\n".join(offences)


def exits_or_argv(module: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(module):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if ast.unparse(exc) == "SystemExit":
                found.append(f"line {node.lineno}: raise SystemExit")
        elif isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            if called in ("sys.exit", "exit", "quit", "os._exit") or called.endswith((".parse_args",
                                                                                      ".parse_known_args")):
                found.append(f"line {node.lineno}: {called}()")
        elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.argv":
            found.append(f"line {node.lineno}: sys.argv")
    return found


def test_the_library_never_exits_nor_reads_argv():
    offences = [f"{path.relative_to(ROOT)} {what}" for path in LIBRARY if path.name != "utils.py"
                for what in exits_or_argv(TREES[path])]  # utils.fail is the scripts' own way out
    assert not offences, "\n".join(offences)


def test_exits_are_found():
    """The detector itself, on a snippet of each kind."""
    snippet = ast.parse("import sys\nraise SystemExit('x')\nsys.exit(1)\nparser.parse_args()\nprint(sys.argv)\n")
    assert len(exits_or_argv(snippet)) == 4


def test_nothing_edits_sys_path():
    offences = []
    for path in [*FILES, *sorted((ROOT / "tests").glob("*.py"))]:
        module = TREES.get(path) or tree(path)
        for node in ast.walk(module):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = ast.unparse(node.func.value)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((ast.unparse(t) for t in targets if ast.unparse(t).startswith("sys.path")), None)
            if target is not None and target.startswith("sys.path") and not (
                    isinstance(node, ast.Call) and node.func.attr in ("index", "count", "copy")):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offences, "\n".join(offences)


def test_each_helper_is_defined_once():
    defined = defaultdict(list)
    for path, module in TREES.items():
        for node in module.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name].append(str(path.relative_to(ROOT)))
    twice = {name: places for name, places in defined.items() if len(places) > 1 and name not in ENTRY_POINTS}
    assert not twice, twice
