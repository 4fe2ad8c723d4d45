"""The broker's folders are its layers (broker/__init__.py), and its imports point down.

Read from the source with ast, every import counted (inside functions and
``if TYPE_CHECKING:`` too): a back-reference typed for a checker is a
dependency all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

BROKER = Path(__file__).resolve().parents[2] / "broker"

# What each layer may import of graft.broker, besides itself. "" is the top:
# main.py, server.py, admin.py, which may import anything.
MAY_IMPORT = {
    "io": set(),
    "confine": {"io"},
    "core": {"confine", "io"},
    "shim": {"core", "confine", "io"},
    "seccomp": {"core", "confine", "io"},
    "dns": {"core", "confine", "io"},
}
LAYERS = set(MAY_IMPORT) | {""}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module under graft.broker ("" for the top), None outside it."""
    parts = module.split(".")
    if parts[:2] != ["graft", "broker"]:
        return None
    if len(parts) > 2 and parts[2] in MAY_IMPORT:
        return parts[2]
    return ""


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file of module, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import x" names modules: each is a dependency of its own.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    """Every import under root (a graft.broker tree) that points up or sideways."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(["graft", "broker", *rel.parts])
        if module.endswith(".__init__"):
            module = module.removesuffix(".__init__")
        layer = layer_of(module)
        if layer == "":
            continue
        for line, target in imported_modules(path, module):
            if target.split(".")[:2] == ["graft", "cli"] or target.startswith(("graft.runtime", "graft.oci")):
                problems.append(f"{path.relative_to(root)}:{line}: {layer}/ imports the CLI ({target})")
            other = layer_of(target)
            if other is None or other == layer:
                continue
            if other not in MAY_IMPORT[layer]:
                problems.append(f"{path.relative_to(root)}:{line}: {layer}/ imports {other or 'the top'} ({target})")
    return problems


def test_the_broker_imports_point_down():
    assert violations(BROKER) == []


def test_every_broker_module_lives_in_a_layer():
    top = sorted(p.name for p in BROKER.glob("*.py"))
    assert top == ["__init__.py", "admin.py", "main.py", "server.py"], top
    assert {p.name for p in BROKER.iterdir() if (p / "__init__.py").exists()} == set(MAY_IMPORT)


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: io/ importing core/, a front-end importing the other or the server."""
    for pkg in ("io", "core", "shim", "seccomp"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "io" / "sock.py").write_text("from ..core import request\n")
    (tmp_path / "shim" / "front.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..server import Broker\n"
    )
    (tmp_path / "seccomp" / "agent.py").write_text("def f():\n    from graft.broker.shim import wire\n")
    (tmp_path / "core" / "ok.py").write_text("from ..io import sock\nfrom . import other\n")
    assert violations(tmp_path) == [
        "io/sock.py:1: io/ imports core (graft.broker.core.request)",
        "seccomp/agent.py:2: seccomp/ imports shim (graft.broker.shim.wire)",
        "shim/front.py:3: shim/ imports the top (graft.broker.server.Broker)",
    ]
