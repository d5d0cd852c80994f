"""The layout of recipes/: thin scripts over one installed library package, no import cycles, no name that shadows an
installed package in a recipe process (``python recipes/x.py`` puts ``recipes/`` first on ``sys.path``), and loading a
finished run (evaluation, inference) that imports nothing of training."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PACKAGE = RECIPES / "mosear_recipes"
SCRIPTS = sorted(RECIPES.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Absolute names imported by ``path``, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(RECIPES).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(RECIPES).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_recipe_name_shadows_an_installed_package():
    """What ``import evaluate`` (or any other top-level name of recipes/) finds in a recipe process is not ours."""
    names = sorted({p.stem for p in SCRIPTS} | {p.name for p in RECIPES.iterdir() if (p / "__init__.py").exists()})
    probe = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(RECIPES)!r})\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    found[name] = spec.origin if spec else None\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, "evaluate", "datasets", *names], capture_output=True, text=True,
                          check=True, cwd="/")  # fmt: skip
    found = json.loads(done.stdout)
    # an installed package is not ours even when the venv sits inside the checkout (datasets comes with .[dpo])
    def ours(origin: str | None) -> bool:
        return origin is not None and origin.startswith(str(ROOT)) and not origin.startswith(sys.prefix)

    assert not ours(found["evaluate"]), found["evaluate"]
    assert not ours(found["datasets"]), found["datasets"]
    # without recipes/ on the path, the scripts' names resolve to nothing (none is also an installed package's name);
    # the library resolves to the installed package, which is ours (editable here: recipes/mosear_recipes/)
    clean = subprocess.run([sys.executable, "-c", probe.replace(f"sys.path.insert(0, {str(RECIPES)!r})\n", ""), *names],
                           capture_output=True, text=True, check=True, cwd="/")  # fmt: skip
    origins = json.loads(clean.stdout)
    assert origins.pop("mosear_recipes") == str(PACKAGE / "__init__.py"), clean.stdout
    assert origins and all(origin is None for origin in origins.values()), clean.stdout


def test_scripts_are_thin_and_import_only_the_library():
    for script in SCRIPTS:
        if script.name == "ar_plots.py":  # a figure script over peft_mose, no recipe library
            continue
        imported = {name.split(".")[0] for name in _imports(script)}
        assert imported <= {"mosear_recipes", "sys"}, (script.name, imported)
        body = ast.parse(script.read_text()).body
        statements = body[1:] if body and isinstance(body[0], ast.Expr) else body  # after the docstring
        assert len(statements) <= 3, (script.name, [ast.unparse(s) for s in statements])  # imports, the main call
        main = statements[-1]
        assert isinstance(main, ast.If) and len(main.body) == 1, (script.name, ast.unparse(main))


def test_the_library_has_no_import_cycles_and_imports_no_script():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    scripts = {p.stem for p in SCRIPTS}
    graph = {}
    for name, path in modules.items():
        imported = _imports(path)
        assert not {i.split(".")[0] for i in imported} & scripts, (name, imported & scripts)
        graph[name] = {m for m in imported if m in modules and m != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, node, target])}")
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


TRAINING_MODULES = ("transformers.trainer", "mosear_recipes.trainer", "mosear_recipes.guards",
                    "mosear_recipes.integrity", "mosear_recipes.finetune", "mosear_recipes.modeling")  # fmt: skip


def test_evaluation_and_inference_import_nothing_of_training():
    """A fresh process that imports the entry modules of evaluation and inference (and the run loader) has neither
    HF ``Trainer`` nor the recipe's training guards, checkpoint integrity or model building loaded."""
    probe = (
        "import json, sys\n"
        "import mosear_recipes.evaluate_cli, mosear_recipes.inference, mosear_recipes.run\n"
        "import mosear_recipes.omni.evaluate, mosear_recipes.omni.infer\n"
        f"print(json.dumps({{name: name in sys.modules for name in {TRAINING_MODULES!r}}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    loaded = json.loads(done.stdout)
    assert set(loaded) == set(TRAINING_MODULES) and not any(loaded.values()), loaded
    # the probe can see them: training does load them
    trained = subprocess.run([sys.executable, "-c", probe.replace("mosear_recipes.run\n", "mosear_recipes.finetune\n")],
                             capture_output=True, text=True, check=True, cwd="/")  # fmt: skip
    assert all(json.loads(trained.stdout).values()), trained.stdout
