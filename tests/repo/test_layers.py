"""The package's layers hold: every module in a layer's folder, no import pointing up.

The order lives in ``braintumor.core.layers.LAYERS``; a module's layer is its folder. This
file only reads that order and the sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from braintumor.core.layers import LAYERS, layer_of

from conftest import PACKAGE, braintumor_imports, package_modules


def upward_imports(
    importer: str, source: str, layers: Sequence[str], known: set[str] | None = None
) -> list[str]:
    """One message per module that ``source`` (the module ``importer``, dotted under the
    package) imports from a layer above its own; empty when every import points to its
    own layer or below. ``known``: the package's modules (default: those on disk)."""
    known = set(package_modules()) if known is None else known
    level = {layer: index for index, layer in enumerate(layers)}
    own = level.get(layer_of(importer))
    if own is None:
        return []  # a module in no layer: test_every_module_is_in_a_layer says so
    imported = {name for name in braintumor_imports(source, importer) if name in known}
    # "serving" and "serving.bundle" from one statement: name the deepest module only.
    deepest = {name for name in imported if not any(o.startswith(name + ".") for o in imported)}
    return [
        f"{importer} (layer {layer_of(importer)}) imports {name} "
        f"(layer {layer_of(name)}): a module may import only from its own layer or below"
        for name in sorted(deepest)
        if level.get(layer_of(name), -1) > own
    ]


def test_every_module_is_in_a_layer() -> None:
    folders = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file())
    assert sorted(LAYERS) == folders, "LAYERS must name each subpackage folder once"
    assert len(set(LAYERS)) == len(LAYERS)
    loose = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert not loose, f"modules outside every layer's folder: {loose}"


def test_no_module_imports_from_a_higher_layer() -> None:
    found = [
        message
        for module, path in package_modules().items()
        for message in upward_imports(module, path.read_text(), LAYERS)
    ]
    assert not found, "upward imports:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "statement",
    [
        "from braintumor import serving",
        "from braintumor.serving import predictor",
        "from braintumor.serving.predictor import Predictor",
        "import braintumor.serving.predictor",
        "from .. import serving",
        "from ..serving.predictor import Predictor",
    ],
)
def test_the_check_reports_an_upward_import(statement: str) -> None:
    """The check can fail: config importing serving, even inside a function, is reported."""
    source = f"def load() -> None:\n    {statement}\n"
    messages = upward_imports("core.config", source, LAYERS)
    assert len(messages) == 1
    assert messages[0].startswith("core.config (layer core) imports serving")
    assert messages[0].endswith(
        "(layer serving): a module may import only from its own layer or below"
    )
    assert upward_imports("serving.app", source, LAYERS) == []  # its own layer: allowed


def test_no_import_cycle() -> None:
    """No module imports, directly or through others, one that imports it back: a cycle
    hides behind imports inside functions and makes the order of loading matter."""
    modules = package_modules()
    graph = {
        module: {
            name
            for name in braintumor_imports(path.read_text(), module)
            if name in modules
            and name != module
            and not (module + ".").startswith(name + ".")
            and path.name != "__init__.py"
        }
        for module, path in modules.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as a path that returns to its
    start, or None; depth-first with colours, iterative so that depth is no limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
