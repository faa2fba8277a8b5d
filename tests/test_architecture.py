"""The import graph stays a one-way pipeline: no circles, no import that runs back up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "genedml"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS: list[tuple[str, ...]] = [
    ("genedml", "genedml.errors", "genedml.log", "genedml.jsonio", "genedml.metrics", "genedml.progress", "genedml.threads", "genedml.devices", "genedml.typed",
     "genedml.atomic_dir"),
    ("genedml.data",),
    ("genedml.backbones",),
    ("genedml.cache",),
    ("genedml.extract",),
    ("genedml.heads",),
    ("genedml.targets", "genedml.model_dir", "genedml.spots", "genedml.retrieval", "genedml.output", "genedml.plots"),
    ("genedml.fit", "genedml.predict", "genedml.evaluate"),
    ("genedml.slide", "genedml.ablations", "genedml.cv", "genedml.demo", "genedml.bench"),
    ("genedml.cli", "genedml.__main__"),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module → genedml modules it imports anywhere (top level or inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name and not name.startswith(t + ".")}
    return graph


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or (prefix != "genedml" and module.startswith(prefix + "."))]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = sorted((m, t) for m, ts in import_graph().items() for t in ts if layer_of(t) > layer_of(m))
    assert upward == []


def test_import_graph_has_no_circle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert circles == []
