"""The package's imports run one way (core <- layers <- attention), with no cycle and no private name imported across
modules; dependencies' private names are touched only in ``peft_mose/_compat/`` (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_mose"

# The layers of docs/architecture.md: a module imports only from its own layer or lower ones.
CORE, LAYERS, ATTENTION = 0, 1, 2
RANKS = {
    "peft_mose._compat": CORE,
    "peft_mose._versions": CORE,
    "peft_mose.checksum": CORE,
    "peft_mose.modality": CORE,
    "peft_mose.modality_tokens": CORE,
    "peft_mose.config": CORE,
    "peft_mose.router": CORE,
    "peft_mose.layout": CORE,
    "peft_mose.memos": CORE,
    "peft_mose.positions": CORE,
    "peft_mose.context": CORE,
    "peft_mose.targets": LAYERS,
    "peft_mose.experts": LAYERS,
    "peft_mose.layer": LAYERS,
    "peft_mose.model": LAYERS,
    "peft_mose._registration": LAYERS,
    "peft_mose.metrics": CORE,  # scoring only: imports nothing of the tuner or AR
    "peft_mose.attention": ATTENTION,
}
THIRD_PARTY = ("torch", "peft", "transformers", "accelerate", "safetensors", "deepspeed")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported from, names imported, line)`` of every import statement of module ``name`` (inside
    functions and ``TYPE_CHECKING`` blocks too), relative imports resolved."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.append((source, [alias.name for alias in node.names], node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import module`` counts as importing the module)."""
    edges = {name: set() for name in MODULES}
    for name in MODULES:
        for source, names, _ in _imports(name):
            if not source.startswith("peft_mose"):
                continue
            targets = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES] or [source]
            edges[name].update(t for t in targets if t != name)
    return edges


def _rank(name: str) -> int | None:
    for prefix, rank in sorted(RANKS.items(), key=lambda item: -len(item[0])):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return None


def test_every_module_has_a_layer():
    unranked = sorted(name for name in MODULES if name != "peft_mose" and _rank(name) is None)
    assert not unranked, f"modules missing from RANKS (and from docs/architecture.md): {unranked}"


def test_no_import_cycle():
    edges = _edges()
    edges["peft_mose"] = set()  # the package's __init__ imports everything by design; nothing imports it back
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()

    for name in sorted(MODULES):
        visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_run_one_way():
    upward = [
        f"{name} ({_rank(name)}) imports {target} ({_rank(target)})"
        for name, targets in _edges().items() if name != "peft_mose"
        for target in targets if target != "peft_mose" and _rank(target) > _rank(name)
    ]
    assert not upward, "imports against the layers: " + "; ".join(sorted(upward))
    assert not any(t.startswith("peft_mose.attention") for t in _edges()["peft_mose.context"])
    assert "peft_mose" not in set().union(*(_edges()[n] for n in MODULES if n != "peft_mose"))


def test_no_private_name_imported_across_modules():
    """A helper another module needs is public in its module; dependencies' private names only in _compat/."""
    found = []
    for name in MODULES:
        in_compat = name.startswith("peft_mose._compat")
        for source, names, line in _imports(name):
            ours = source.startswith("peft_mose")
            if not ours and not source.startswith(THIRD_PARTY):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if not ours and not in_compat:
                private += [source] if any(part.startswith("_") for part in source.split(".")) else []
            if private and (ours or not in_compat):
                found.append(f"{name}:{line} imports {private} from {source}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet, finding", [
    ("from .functional import _plan\n", "planted:1 imports \\['_plan'\\] from peft_mose.attention.functional"),
    ("from peft.tuners.tuners_utils import _get_tuner_state_dict_key_prefixes\n", "_get_tuner_state_dict_key_prefixes"),
])
def test_the_private_import_check_catches_a_planted_import(monkeypatch, tmp_path, snippet, finding):
    planted = tmp_path / "planted.py"
    planted.write_text(snippet)
    monkeypatch.setitem(MODULES, "peft_mose.attention.planted", planted)
    with pytest.raises(AssertionError, match=finding):
        test_no_private_name_imported_across_modules()


def test_the_cycle_check_catches_a_planted_cycle(monkeypatch, tmp_path):
    planted = tmp_path / "positions.py"
    planted.write_text(MODULES["peft_mose.positions"].read_text() + "\nfrom .attention.gate import GateDecisions\n")
    monkeypatch.setitem(MODULES, "peft_mose.positions", planted)
    with pytest.raises(AssertionError, match="peft_mose.positions -> peft_mose.attention.gate -> peft_mose.positions"):
        test_no_import_cycle()


def test_the_architecture_doc_names_every_module():
    """docs/architecture.md's module table stays the map of the package."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = {name for name in MODULES if name.count(".") == 1 or name.startswith("peft_mose.attention.")}
    missing = sorted(
        name for name in named
        if f"`{name.removeprefix('peft_mose.').replace('.', '/')}.py`" not in doc
        and f"`{name.removeprefix('peft_mose.').replace('.', '/')}/`" not in doc
    )
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
