"""The layout's one rule: the substrate (common/, impls/) never imports the presentation
(common/report/), and the presentation's modules import each other without a cycle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = "common.report"


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """Every module `path` imports, at its top or inside a function, as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_files():
    return [path for folder in ("common", "impls") for path in (REPO / folder).rglob("*.py")]


def test_the_substrate_never_imports_the_presentation():
    offenders = {module_name(path): sorted(name for name in imported_modules(path) if name.startswith(REPORT))
                 for path in project_files() if not module_name(path).startswith(REPORT)}
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_presentation_imports_without_a_cycle():
    modules = {module_name(path): path for path in (REPO / "common" / "report").glob("*.py")}
    graph = {module: {name for name in imported_modules(path) if name in modules and name != REPORT}
             for module, path in modules.items()}
    assert len(graph) >= 5, graph  # console, plots, results, page, bench
    visiting, done = set(), set()

    def visit(module, chain):
        assert module not in visiting, f"import cycle: {' -> '.join(chain + [module])}"
        if module in done:
            return
        visiting.add(module)
        for name in sorted(graph[module]):
            visit(name, chain + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
