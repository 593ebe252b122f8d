"""The house's floors: each package imports only those below it (README, "Layout"), including the imports
made inside functions. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own package and those before it, never one after it.
LAYERS = ("koala_core", "exporter", "calibration", "engines", "runtime", "sampler", "validation", "shipping", "koala_trt")


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def upward_imports(layers: tuple[str, ...] = LAYERS) -> list[str]:
    bad = []
    for rank, package in enumerate(layers):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, line in sorted(imported_packages(path)):
                if name in layers and layers.index(name) > rank:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({package} is below it)")
    return bad


def test_every_layer_is_a_package_here() -> None:
    for package in LAYERS:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_no_module_imports_upward() -> None:
    bad = upward_imports()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("order", [("runtime", "engines"), ("sampler", "validation")])
def test_the_walk_finds_an_upward_import(order: tuple[str, str]) -> None:
    """The check can fail: with two floors swapped, the real imports between them read as upward."""
    layers = list(LAYERS)
    i, j = layers.index(order[0]), layers.index(order[1])
    layers[i], layers[j] = layers[j], layers[i]
    assert upward_imports(tuple(layers))
