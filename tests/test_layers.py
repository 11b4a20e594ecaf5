"""The package's layers hold: every module in one layer, no import pointing up.

The order lives in ``braintumor.layers.LAYERS``; this file only reads it and the sources.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from braintumor.layers import LAYERS

from conftest import PACKAGE, braintumor_imports


def _modules() -> list[str]:
    """The package's modules by name (``__init__`` is the package itself, not a module)."""
    return sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def upward_imports(importer: str, source: str, layers: Mapping[str, tuple[str, ...]]) -> list[str]:
    """One message per module that ``source`` (the module ``importer``) imports from a layer
    above its own; empty when every import points to its own layer or below."""
    level = {module: index for index, modules in enumerate(layers.values()) for module in modules}
    if importer not in level:
        return []  # a module in no layer: test_every_module_is_in_exactly_one_layer says so
    names = list(layers)
    return [
        f"{importer} (layer {names[level[importer]]}) imports {imported} "
        f"(layer {names[level[imported]]}): a module may import only from its own layer or below"
        for imported in sorted(braintumor_imports(source))
        if imported in level and level[imported] > level[importer]
    ]


def test_every_module_is_in_exactly_one_layer() -> None:
    listed = [module for modules in LAYERS.values() for module in modules]
    duplicated = sorted({module for module in listed if listed.count(module) > 1})
    assert not duplicated, f"in more than one layer: {duplicated}"
    unlisted = sorted(set(_modules()) - set(listed))
    assert not unlisted, f"in no layer of braintumor/layers.py: {unlisted}"
    gone = sorted(set(listed) - set(_modules()))
    assert not gone, f"braintumor/layers.py lists modules that do not exist: {gone}"


def test_no_module_imports_from_a_higher_layer() -> None:
    found = [
        message
        for module in _modules()
        for message in upward_imports(module, (PACKAGE / f"{module}.py").read_text(), LAYERS)
    ]
    assert not found, "upward imports:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "statement",
    [
        "from braintumor import serving",
        "from braintumor.serving import Predictor",
        "import braintumor.serving",
        "from . import serving",
        "from .serving import Predictor",
    ],
)
def test_the_check_reports_an_upward_import(statement: str) -> None:
    """The check can fail: config importing serving, even inside a function, is reported."""
    source = f"def load() -> None:\n    {statement}\n"
    assert upward_imports("config", source, LAYERS) == [
        "config (layer foundation) imports serving (layer serving): "
        "a module may import only from its own layer or below"
    ]
    assert upward_imports("app", source, LAYERS) == []  # its own layer: allowed
