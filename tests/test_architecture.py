"""The package's shape: imports go one way between layers (docs/architecture.md), no cycle between
modules (lazy imports included), and no private name used across modules. The same rules hold for
`bench/`, the benchmarks, a layer above the whole of `spiq`."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spiq"
# The packages these rules cover: the library, and the benchmarks (run as `python -m bench.<name>`).
PACKAGES = ["spiq", "bench"]
# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"spiq.config", "spiq.core"},
    {"spiq.models"},
    {"spiq.graph"},
    {"spiq.transforms"},
    {"spiq.ranges"},
    {"spiq.methods"},
    {"spiq.quantize"},
    {"spiq.export"},
    {"spiq.analysis"},
    {"spiq.ui"},
    {"spiq", "spiq.cli", "spiq.__main__"},
    {"bench"},
]
WHOLE = {"bench"}   # packages that are one layer, every module of them in it


def files_of(package: str) -> list[Path]:
    """The package's modules; the library's also count app.py, which lays out the app."""
    return sorted((ROOT / package).rglob("*.py")) + ([ROOT / "app.py"] if package == "spiq" else [])


def layer_of(module: str) -> int:
    parts = module.split(".")
    for i, names in enumerate(LAYERS):
        if ".".join(parts[:2]) in names or module in names or (parts[0] in WHOLE and parts[0] in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import of spiq or bench in the file, at any depth (lazy ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in PACKAGES:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; imports are by full name")
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return out


def package_imports(package: str = "spiq") -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(target: str, names: list[str], modules) -> list[str]:
    """The modules an import statement loads: `from spiq.x import y` loads spiq.x.y when y is a module."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return subs or [target]


def direction_errors(graph) -> list[str]:
    errors = []
    for module, imports in graph.items():
        for target, names, line in imports:
            for dep in resolve(target, names, graph):
                if layer_of(dep) > layer_of(module):
                    errors.append(f"{module}:{line} imports {dep}, a layer above it")
    return errors


def find_cycle(graph) -> list[str] | None:
    edges = {m: {d for t, names, _ in imps for d in resolve(t, names, graph) if d in graph and d != m}
             for m, imps in graph.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of code
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in edges.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d, stack + [d])):
                return c
        state[m] = 2
        return None
    for m in sorted(edges):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way_between_layers(package):
    assert direction_errors(package_imports(package)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_lazy_imports_included(package):
    assert find_cycle(package_imports(package)) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_crosses_a_module(package):
    crossing = [f"{m}:{line} imports {n} from {t}" for m, imps in package_imports(package).items()
                for t, names, line in imps for n in names if n.startswith("_")]
    assert crossing == []


def test_the_checks_catch_what_they_forbid():
    """The checks themselves, on a graph with an upward import and a cycle added."""
    graph = package_imports()
    graph["spiq.core.quant"] = graph["spiq.core.quant"] + [("spiq.ui.views", ["scene"], 1)]
    assert any("spiq.core.quant:1 imports spiq.ui.views" in e for e in direction_errors(graph))
    graph = package_imports()
    graph["spiq.core.tensors"] = graph["spiq.core.tensors"] + [("spiq.core.quant", ["InputQuant"], 1)]
    assert find_cycle(graph) is not None
    graph = package_imports()   # the library never reaches up into the benchmarks
    graph["spiq.core.quant"] = graph["spiq.core.quant"] + [("bench.common", ["save"], 1)]
    assert any("spiq.core.quant:1 imports bench.common" in e for e in direction_errors(graph))
    bench = package_imports("bench")
    assert direction_errors(bench) == [] and any(t.startswith("spiq") for imps in bench.values() for t, _, _ in imps)
    bench["bench.common"] = bench["bench.common"] + [("bench", ["accuracy"], 1)]
    assert find_cycle(bench) is not None


def test_the_benchmarks_import_by_package():
    """`python -m bench.<name>` from the root: helpers as `bench.common`, never by folder (`from common
    import`, `sys.path`), each script runnable as a module."""
    assert (ROOT / "bench" / "__init__.py").is_file()
    stems = {p.stem for p in files_of("bench")} - {"__init__"}
    for path in files_of("bench"):
        tree = ast.parse(path.read_text())
        tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not tops & stems, f"{path.name} imports {tops & stems} by folder: import bench.<name>"
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            assert 'if __name__ == "__main__":' in path.read_text(), f"{path.name} has a main() but does not run it"


@pytest.mark.parametrize("layer", sorted({n for names in LAYERS for n in names} - {"spiq", "spiq.cli",
                                                                                    "spiq.__main__", "spiq.config"}))
def test_every_layer_is_written_down(layer):
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert f"`{layer.split('.', 1)[-1]}/`" in doc, f"{layer} is not described in docs/architecture.md"


def test_the_app_wires_components_to_spiq_ui_only():
    """app.py lays out and wires; everything it calls comes from spiq.ui or the public API."""
    app = PACKAGE.parent / "app.py"
    modules = {m for m, _, _ in imports_of(app)}
    assert modules <= {"spiq"} | {m for m in modules if m.startswith("spiq.ui")}, modules


def test_only_the_ui_imports_gradio():
    users = [module_name(p) for p in PACKAGE.rglob("*.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "gradio" in ast.unparse(n)
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert users and all(u.startswith("spiq.ui") for u in users), users


def _long_functions(path: Path, limit: int = 60) -> list[str]:
    lines = path.read_text().split("\n")
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if not lines[first - 2].strip().startswith("# long:"):
                found.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_are_short_or_say_why(package):
    """No module over 500 lines; a function over 60 lines carries a `# long: <why>` line above it."""
    files = files_of(package)
    assert [f"{p} ({n} lines)" for p in files if (n := len(p.read_text().splitlines())) > 500] == []
    assert [f for p in files for f in _long_functions(p)] == []


def test_every_sub_package_is_installed():
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
