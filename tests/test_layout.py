"""The package's dependency rules, read from the source: no import cycles between modules, no module importing
another module's private name, `ops/` independent of LoRA, models and quantization, `models/` built on `ops/`
alone. Every import counts, also one inside a function."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minilora"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every `import` / `from ... import` in the module named `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (base, alias.name))
    return [(module, imported) for module, imported in found if module.split(".")[0] == "minilora"]


GRAPH = {name: {module for module, _ in imports(name) if module in MODULES and module != name} for name in MODULES}


def test_every_import_resolves_to_a_module():
    missing = sorted({(name, module) for name in MODULES for module, _ in imports(name) if module not in MODULES})
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_import_cycles():
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_from_other_modules():
    private = [(name, module, imported) for name in MODULES for module, imported in imports(name)
               if imported and imported.startswith("_") and not imported.startswith("__") and module != name]
    assert not private, f"modules importing another module's private name: {private}"


@pytest.mark.parametrize("package, allowed", [
    ("minilora.ops", ("minilora.ops",)),
    ("minilora.models", ("minilora.ops", "minilora.models")),
])
def test_layering(package, allowed):
    def inside(module, prefix):
        return module == prefix or module.startswith(prefix + ".")

    bad = [(name, module) for name in MODULES if inside(name, package)
           for module in GRAPH[name] if not any(inside(module, a) for a in allowed)]
    assert not bad, f"{package} may import only {allowed}: {bad}"


def test_the_rules_see_a_cycle(tmp_path):
    """The cycle finder is not vacuous: a graph with a known cycle is reported."""
    saved = dict(GRAPH)
    try:
        GRAPH["minilora.ops"] = GRAPH["minilora.ops"] | {"minilora"}
        GRAPH["minilora"] = GRAPH["minilora"] | {"minilora.ops"}
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
