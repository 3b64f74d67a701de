"""The package's layers import downward only, with no cycles, function-level imports included.

The table below is the architecture: each layer (a folder of ``src/seq2seq``, or a top-level
module) and the layers it may import. ``seq2seq/__init__.py`` and each folder's ``__init__.py``
say the same in words.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "seq2seq"

_BASE = {"files", "config", "model_dir", "device"}
ALLOWED = {
    "files": set(),
    "model_dir": set(),
    "config": {"files"},
    "device": {"config"},
    "plot": {"files"},
    "models": _BASE,
    "kernels": _BASE | {"models"},
    "data": _BASE,
    "decoding": _BASE | {"plot", "models", "kernels", "data"},
    "training": _BASE | {"plot", "models", "kernels", "data", "decoding"},
    "serving": _BASE | {"plot", "models", "kernels", "data", "decoding"},
    "vectors": _BASE | {"models", "kernels", "data", "training", "decoding"},
    "demo": _BASE | {"plot", "models", "kernels", "data", "training", "decoding"},
    "cli": _BASE | {"plot", "models", "kernels", "data", "training", "decoding", "serving",
                    "vectors", "demo"},
    "__main__": {"cli"},
}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module (dotted, below the package) -> the package's modules it imports anywhere in its
    source. ``from seq2seq.x import y`` counts as ``x.y`` when that is a module, else ``x``."""
    modules = {module_name(p, package) for p in package.rglob("*.py")} - {""}
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        name = module_name(path, package)
        if not name:
            continue
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] == "seq2seq":
                    base = ".".join(parts[1:])
                    for alias in node.names:
                        child = f"{base}.{alias.name}" if base else alias.name
                        targets.append(child if child in modules else base)
            elif isinstance(node, ast.Import):
                targets += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("seq2seq.")]
            deps.update(t for t in targets if t in modules and t != name)
    return graph


def layer(module: str) -> str:
    return module.split(".", 1)[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first walk meets, each as [a, b, ..., a]."""
    found, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """The imports that leave a layer for one its row of ``ALLOWED`` does not list."""
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if layer(dep) != layer(module) and layer(dep) not in ALLOWED.get(layer(module), set()):
                bad.append(f"{module} -> {dep}")
    return bad


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_function_level_and_nested_imports(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "one.py").write_text("def f():\n    from seq2seq.sub.two import g\n")
    (tmp_path / "sub" / "two.py").write_text("from seq2seq import one\nimport seq2seq.three\n")
    (tmp_path / "three.py").write_text("from seq2seq.sub import two\n")
    assert import_graph(tmp_path) == {"one": {"sub.two"}, "sub": set(),
                                      "sub.two": {"one", "three"}, "three": {"sub.two"}}


def test_the_layer_check_flags_an_upward_import():
    assert upward_edges({"models.rnn.model": {"kernels.gru", "files"}}) == \
        ["models.rnn.model -> kernels.gru"]
    assert upward_edges({"decoding.translator": {"training.loop"}}) == \
        ["decoding.translator -> training.loop"]
    assert upward_edges({"training.loop": {"decoding.search", "data.batches"}}) == []


def test_every_layer_is_in_the_table():
    graph = import_graph(PACKAGE)
    assert {"training.loop", "decoding.translator", "vectors.model", "models.rnn.model"} <= set(graph)
    assert {layer(m) for m in graph} <= set(ALLOWED)


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_layers_import_downward_only():
    """In particular: models import no kernel, and decoding and serving nothing of training."""
    bad = upward_edges(import_graph(PACKAGE))
    assert not bad, "imports outside the table of layers:\n" + "\n".join(bad)
