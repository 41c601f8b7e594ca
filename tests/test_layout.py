"""The package's shape: stages in subpackages whose imports run one way, and `__init__.py` files that import nothing.

Every `import poetgen...` / `from poetgen... import` in the package (at module level or inside a function: a lazy
import is still a dependency) is read from the source with ast, and each must go to the importer's own layer or a
lower one. The layers, low to high (the README's "Code map" says why this order):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "poetgen"
LAYERS = [
    {"errors", "paths"},  # what everything may use
    {"poetry"},  # domain knowledge: forms, tones, rhyme books
    {"data"},  # corpus -> normalised documents -> vocabulary -> dataset on disk -> batches
    {"model"},  # configs, the torch modules, the numpy runtime, devices
    {"checkpoint"},  # the file formats (torch-free) and the torch reader/writer; shipped models
    {"generation"},  # decoding (sampling), constraints, engines, thread tuning
    {"evaluation"},  # the one scorer, poem metrics, plots, eval reports
    {"training"},  # configuration, runs, the loop (scores with evaluation, samples with generation), distributed
    {"serving"},  # the HTTP server: continuous batching over generation's step, the ASGI app, the page
    {"cli", "__main__"},  # one module per command; nothing imports it
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _stage(module: str) -> str:
    """poetgen.data.vocab -> data; poetgen.errors -> errors; poetgen -> '' (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported poetgen module, line) for every import in the file, relative ones resolved."""
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "poetgen"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "poetgen":
                continue
            if base == "poetgen":  # from poetgen import __version__ / from poetgen import data
                found += [(f"poetgen.{a.name}" if a.name in RANK else "poetgen", node.lineno) for a in node.names]
            else:
                found.append((base, node.lineno))
    return found


def test_every_module_is_in_a_layer():
    stages = {_stage(m) for m in _modules()} - {""}
    assert stages <= set(RANK), f"modules outside every layer: {sorted(stages - set(RANK))}"


def test_imports_go_to_the_same_layer_or_a_lower_one():
    wrong = []
    for module, path in _modules().items():
        here = _stage(module)
        if here == "":
            continue
        for target, line in _imports(path, module):
            there = _stage(target)
            if there and RANK[there] > RANK[here]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_nothing_imports_the_cli():
    wrong = [f"{path.relative_to(REPO)}:{line}" for module, path in _modules().items()
             if _stage(module) not in ("cli", "__main__") for target, line in _imports(path, module)
             if _stage(target) == "cli"]
    assert not wrong, wrong


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above must be able to fail: a data module importing training is caught."""
    bad = tmp_path / "poetgen" / "data" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from poetgen.training.loop import train\n    from ..generation import sample\n")
    found = _imports(bad, "poetgen.data.bad")
    assert [t for t, _ in found] == ["poetgen.training.loop", "poetgen.generation"]
    assert all(RANK[_stage(t)] > RANK["data"] for t, _ in found)


@pytest.mark.parametrize("init", sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("__init__.py")))
def test_init_files_import_nothing_at_load(init):
    """Importing a subpackage must load nothing else: `poetgen --help` and CPU sampling stay torch-free and fast.
    (poetgen/cli/__init__.py defines main(), which imports the app only when it is called.)"""
    tree = ast.parse((REPO / init).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not top, f"{init} imports at load: {[ast.unparse(n) for n in top]}"
