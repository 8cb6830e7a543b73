"""The layering of DESIGN.md, enforced: a module imports only from its own layer or below, and no
two modules import each other, directly or round a loop. Every import counts, including those
inside functions (they run too, only later)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cvrecipe"

# lowest first; a module's layer is that of its first name under cvrecipe (cvrecipe.train.loop → train)
LAYERS = [
    {"config", "device", "pages", "imagefile", "videofile"},
    {"data", "models"},
    {"tasks"},
    {"artifact"},
    {"train"},
    {"evaluate"},
    {"tune", "export"},
    {"monitor"},
    {"serve"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The cvrecipe modules `path` imports; `from cvrecipe.a import b` counts as cvrecipe.a.b when
    b is a module, else as cvrecipe.a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "cvrecipe"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cvrecipe":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package itself (cvrecipe/__init__.py)
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    unknown = sorted({m.split(".")[1] for m in graph() if "." in m} - set().union(*LAYERS))
    assert not unknown, f"modules outside the layering: {unknown}; add them to LAYERS (and to DESIGN.md's)"


def test_modules_import_only_their_own_layer_or_below():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if target == node:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The parser above finds a function-level import (so a lazy import cannot hide an upward one)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from cvrecipe.serve import app\n")
    assert imports_of(source) == {"cvrecipe.serve.app"}
