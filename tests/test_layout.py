"""The layout keeps its design: which wing may import which (docs/DESIGN.md), no private names
taken from another module, no import cycles. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt2kit"

# A module's wing: its first component below gpt2kit, or a named group of top-level modules.
GROUPS = {"config": "core", "errors": "core", "model": "core", "tokenizer": "core", "runtime": "core",
          "atomic": "core", "chat": "core", "lora": "checkpoints", "convert": "checkpoints", "api": "api", "quantize": "api",
          "__init__": "package", "__main__": "cli"}
# Who may import whom. Dependencies point inward: cli/server -> api/training -> kernels ->
# inference -> core. Fast paths (kernels) are applied only by the API and the training setup.
ALLOWED = {
    "core": {"core"},
    "checkpoints": {"core", "checkpoints"},
    "data": {"core", "data"},
    "inference": {"core", "inference"},
    "kernels": {"core", "inference", "kernels"},
    "training": {"core", "checkpoints", "data", "inference", "kernels", "training"},
    "api": {"core", "checkpoints", "data", "inference", "kernels", "api"},
    "server": {"core", "api", "inference", "server"},
    "cli": {"core", "checkpoints", "data", "api", "training", "server", "cli", "package"},
    "package": {"core", "checkpoints", "api", "inference", "training", "package"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return GROUPS.get(parts[1], parts[1])


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, at module level) for every gpt2kit import of a file, without
    those under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if target and target.split(".")[0] == "gpt2kit":
                names = [a.name for a in node.names]
                subs = [f"{target}.{n}" for n in names if (SRC.parent / f"{target}.{n}".replace(".", "/")).exists()
                        or (SRC.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
                found += [(s, [], id(node) in top) for s in subs]
                found.append((target, [n for n in names if f"{target}.{n}" not in subs], id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names if a.name.split(".")[0] == "gpt2kit"]
    return found


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_wings_import_only_what_they_may(path):
    mine = wing(module_name(path))
    bad = [target for target, _, _ in imports(path) if wing(target) not in ALLOWED[mine]]
    assert not bad, f"{mine} may not import {bad} (docs/DESIGN.md: which wing may import which)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_names_from_other_modules(path):
    bad = [f"{target}.{n}" for target, names, _ in imports(path) for n in names
           if n.startswith("_") and n != "__version__"]
    assert not bad, f"private names imported from another module: {bad}; give that module a public surface"


def test_no_import_cycles_at_module_level():
    graph = {module_name(p): {t for t, _, top in imports(p) if top} for p in FILES}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in graph[node]:
            if nxt != node and not node.startswith(nxt + "."):  # a package's own __init__ is not a cycle
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        visit(name, [])
