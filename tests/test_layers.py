"""The house's layering, read from the source: no import circle, no upward edge, commands never import commands,
no private name used outside its file, and every script in benchmarks/ starts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastmae"

# Lower layers never import upper ones; a package may import its own modules (without a circle).
RANK = {
    "_version": 0, "tasks": 0, "models": 1, "metrics": 1, "config": 2, "data": 3, "weights": 4, "api": 5, "figures": 5,
    "train": 6, "bench": 7, "infer": 7, "commands": 8, "recipes": 9, "flags": 9, "cli": 10,
}
ALIASES = {"visualize", "hub", "pyramid", "__init__", "__main__"}  # the package's front door and old import paths


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("fastmae")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastmae"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if (PKG.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists()
                          or (PKG.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
            found += [(s, [], node.lineno) for s in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in submodules], node.lineno))
    return found


SOURCES = sorted(PKG.rglob("*.py"))


def layer(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else ""


def test_no_upward_import_and_commands_never_import_commands():
    bad = []
    for path in SOURCES:
        mod = module_name(path)
        top = layer(mod)
        if top in ALIASES or mod == "fastmae":
            continue
        for target, _, line in imports(path):
            other = layer(target)
            if not other or other == top and top != "commands":
                continue
            if other in ALIASES:
                bad.append(f"{mod}:{line} imports the alias {target}")
            elif top == "commands" and other == "commands" and target != "fastmae.commands":
                bad.append(f"{mod}:{line} (a command) imports the command {target}")
            elif RANK[other] >= RANK[top] and other != top:
                bad.append(f"{mod}:{line} ({top}, layer {RANK[top]}) imports {target} ({other}, layer {RANK[other]})")
    assert not bad, "\n".join(bad)


def test_every_package_has_a_layer():
    tops = {layer(module_name(p)) for p in SOURCES} - {""}
    assert tops <= set(RANK) | ALIASES, tops - set(RANK) - ALIASES


def test_no_import_circle():
    graph = {module_name(p): {t for t, _, _ in imports(p)} for p in SOURCES}
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(trail[trail.index(t):] + [t]) if t in trail else f"{m} -> {t}")
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own modules is not a circle
    circles = [c for c in circles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert not circles, "\n".join(circles)


def test_no_private_name_used_outside_its_file():
    bad = [f"{module_name(p)}:{line} imports {n} from {target}"
           for p in SOURCES + sorted((ROOT / "benchmarks").glob("*.py"))
           for target, names, line in imports(p) for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


STARTER = """
import runpy, sys
failed = []
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    try:
        runpy.run_module("benchmarks." + name, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{name}: exit {e.code}")
    except BaseException as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("FAILED " + "; ".join(failed) if failed else "ALL STARTED")
"""


@pytest.mark.slow
def test_every_benchmark_starts():
    """`python -m benchmarks.NAME --help` exits 0 for every script (one interpreter, torch imported once): a removed
    import fails here, not in a user's hands."""
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    r = subprocess.run([sys.executable, "-c", STARTER, *scripts], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().endswith("ALL STARTED"), (r.stdout[-2000:], r.stderr[-2000:])
