"""The code's layers point down only, and no module imports another's private names (docs/architecture.md).

Every import in pipeline/ and tasks/ (at module level or inside a function: a lazy import is still a
dependency) is resolved to the module it names and checked against LAYERS, top to bottom. A module may import
its own layer or any layer below it, never one above. The one exception is the product's contract:
`pipeline/__init__.py` re-exports the Luigi tasks so that `luigi --module pipeline RunManifest` finds them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (layer name, module prefixes): the first layer is the top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("tasks", "pipeline.commands", "pipeline.cli", "pipeline.service", "pipeline.api")),
    ("orchestration", ("pipeline.batch", "pipeline.plan", "pipeline.spec", "pipeline.execute", "pipeline.parallel",
                       "pipeline.inspect", "pipeline.rerun", "pipeline.report", "pipeline.diagnose",
                       "pipeline.progress", "pipeline.workers", "pipeline.check_config", "pipeline.demo",
                       "pipeline.hub", "pipeline.testing")),
    ("stages", ("pipeline.stages",)),
    ("runtime", ("pipeline.runtime",)),
    ("models", ("pipeline.models",)),
    ("fast paths", ("pipeline.fast",)),
    ("base", ("pipeline.config", "pipeline.manifest", "pipeline.store", "pipeline.writer", "pipeline.errors", "pipeline.faults",
              "pipeline.tiny", "pipeline.luigi_setup", "pipeline.threads", "pipeline.version", "pipeline.config_keys",
              "pipeline.parallel.layout")),  # the `parallel` config value, read by config.py
]
EXEMPT = {("pipeline", "tasks.run_manifest"), ("pipeline", "tasks.run_stage"), ("pipeline", "tasks.stages")}


def layer_of(module: str) -> int | None:
    if module == "pipeline":  # the package itself: it re-exports the Luigi tasks (see EXEMPT)
        return 0
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    return best[0] if best else None


def modules() -> dict[str, Path]:
    out = {}
    for root in ("pipeline", "tasks"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement of the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


MODULES = modules()


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = layer_of(module)
    bad = []
    for target, names, line in imports(module, MODULES[module]):
        for name in [target, *(f"{target}.{n}" for n in names)]:
            if name in MODULES or name.split(".")[0] in ("pipeline", "tasks"):
                break
        if not (target.startswith("pipeline") or target.startswith("tasks")):
            continue
        # `from pipeline import x` may name a submodule x: judge by the most specific module named
        candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES] or [target]
        for name in candidates:
            layer = layer_of(name)
            if layer is not None and layer < own and (module, name) not in EXEMPT:
                bad.append(f"line {line}: {module} ({LAYERS[own][0]}) imports {name} ({LAYERS[layer][0]})")
    assert bad == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    bad = []
    for target, names, line in imports(module, MODULES[module]):
        if target.split(".")[0] not in ("pipeline", "tasks") or target == module:
            continue
        bad += [f"line {line}: from {target} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: a stage module importing a Luigi task is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from tasks.stages import task_for\nfrom ..models.loader import _private\n")
    found = imports("pipeline.stages.bad", bad)
    assert ("tasks.stages", ["task_for"], 1) in found
    assert layer_of("tasks.stages") < layer_of("pipeline.stages.bad")
    assert ("pipeline.models.loader", ["_private"], 2) in found
