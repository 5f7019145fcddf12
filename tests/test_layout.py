"""The house keeps its shape: packages follow the data's road, imports only point back along
it (or to `core`), no two modules import each other even through a chain, and the entry
points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import clipdistill

ROOT = Path(clipdistill.__file__).parent
# The road, in order; a module may import from its own stage and the ones before it.
LAYERS = ["core", "data", "teacher", "distill", "deploy", "fit", "study"]
APP = {"clipdistill.cli", "clipdistill.__main__", "clipdistill", "clipdistill.train", "clipdistill.stl10"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never executed: annotations only)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    return skip


def _imports(name: str, path: Path, known: set[str], type_hints: bool = False) -> set[str]:
    """Every clipdistill module `name` imports, at module level or inside functions; those under
    `if TYPE_CHECKING:` (annotations only, never run) with `type_hints`."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_hints else _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("clipdistill") and t != name:
                found.add(t)
    return found


def _layer(module: str) -> int:
    if module in APP:
        return len(LAYERS)
    stage = module.split(".")[1]
    assert stage in LAYERS, f"{module} is in no stage of the road ({', '.join(LAYERS)}); add it to one"
    return LAYERS.index(stage)


def _graph(type_hints: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods), type_hints) for name, path in mods.items()}


def test_every_module_sits_in_a_stage_and_imports_only_back_along_the_road():
    upward = []
    for mod, deps in _graph().items():
        for dep in deps:
            if dep == "clipdistill":
                continue
            if _layer(dep) > _layer(mod):
                upward.append(f"{mod} -> {dep}")
    assert not upward, "imports against the flow:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    """Not even through imports for type hints only: two modules that need each other's names
    are one concept in two files."""
    graph = _graph(type_hints=True)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == "clipdistill":
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_planted_upward_import_and_a_cycle(tmp_path):
    """The walker itself: an upward import and a two-module cycle are found."""
    mods = {"clipdistill.core.a": "from ..study import b\n", "clipdistill.study.b": "from ..core import a\n"}
    paths = {}
    for name, src in mods.items():
        p = tmp_path / (name.replace(".", "/") + ".py")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
        paths[name] = p
    known = set(mods) | {"clipdistill.core", "clipdistill.study", "clipdistill"}
    deps = {n: _imports(n, p, known) for n, p in paths.items()}
    assert deps == {"clipdistill.core.a": {"clipdistill.study.b"}, "clipdistill.study.b": {"clipdistill.core.a"}}
    assert _layer("clipdistill.study.b") > _layer("clipdistill.core.a")
    # an import for type hints only is no import for the layering, and an import for the cycles
    hinted = tmp_path / "clipdistill" / "core" / "c.py"
    hinted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..study import b\n")
    known |= {"clipdistill.core.c"}
    assert _imports("clipdistill.core.c", hinted, known) == set()
    assert _imports("clipdistill.core.c", hinted, known, type_hints=True) == {"clipdistill.study.b"}


def test_import_and_help_do_not_load_torch():
    code = ("import sys, io, contextlib\nimport clipdistill\nfrom clipdistill.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "heavy = [m for m in ('torch', 'open_clip', 'timm', 'onnxruntime') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`import clipdistill` + `clipdistill --help` imported {out.stdout.strip()}"


def test_predict_needs_no_torch():
    """What runs on the device: ONNX Runtime, numpy and Pillow only."""
    code = "import sys\nimport clipdistill.deploy.predict\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
