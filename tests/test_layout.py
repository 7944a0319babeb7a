"""The layout's rules, which a reader learns the architecture from:

- imports run one way, down: compare.py (the command line) -> common/drivers/ (what drives the
  implementations) -> common/report/ (how results are shown) -> impls/ (the frameworks, their
  registry and their interface) -> common/ (the substrate: data, init, files, checkpoint, launch);
  a framework's package never imports the registry that hands it out, and nothing imports in a cycle;
- impls/registry.py is the one module that imports by name (importlib); every other import is
  static, so that these rules see it;
- every framework package provides the interface of impls/interface.py, member by member.

Each checker runs on the repository, and on a copy of it changed by one line, which it must catch.
"""

import ast
import dataclasses
import inspect
import shutil
import typing
from pathlib import Path

import pytest

from impls import registry

REPO = Path(__file__).resolve().parent.parent
# Top to bottom: (what the layer is, the modules in it). A module imports from its own layer or below.
LAYERS = (
    ("the command line", "compare"),
    ("the driving code", "common.drivers"),
    ("the presentation", "common.report"),
    ("the frameworks", "impls"),
    ("the substrate", "common"),
)
PROJECT = ("compare", "common", "impls")
REGISTRY = "impls.registry"
# Where a dynamic import could hide from the rules above: importlib's importing functions, __import__.
DYNAMIC_IMPORTS = {"importlib", "importlib.import_module", "importlib.util", "importlib.reload",
                   "importlib.__import__"}


def module_name(path, root):
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root, folders=("common", "impls")):
    return [root / "compare.py", *(path for folder in folders for path in sorted((root / folder).rglob("*.py")))]


def imported_modules(path):
    """Every module `path` imports, at its top or inside a function, as dotted names (`from a import
    b` gives a and a.b: b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer(module):
    """The index in LAYERS of the layer `module` belongs to: the first whose prefix names it."""
    return next(index for index, (_, prefix) in enumerate(LAYERS)
                if module == prefix or module.startswith(prefix + "."))


def project_modules(root):
    return {module_name(path, root) for path in source_files(root)}


def upward_imports(root):
    """['importer -> imported (its layer)'] for every import of a layer above the importer's, and
    every import of the registry from a framework's package."""
    modules = project_modules(root)
    found = []
    for path in source_files(root):
        importer = module_name(path, root)
        for name in sorted(imported_modules(path)):
            if name not in modules:
                continue
            if layer(name) < layer(importer):
                found.append(f"{importer} -> {name} ({LAYERS[layer(name)][0]})")
            elif name == REGISTRY and importer.startswith("impls.") and importer.count(".") == 2:
                # impls.<framework>.<part>: the registry imports it
                found.append(f"{importer} -> {name} (the registry, which imports the frameworks)")
    return found


def import_cycles(root):
    """The cycles among the project's modules' imports, each as 'a -> b -> a'."""
    modules = project_modules(root)
    graph = {module_name(path, root): sorted(name for name in imported_modules(path) if name in modules
                                             and name != module_name(path, root))
             for path in source_files(root)}
    cycles, done = [], set()

    def visit(module, chain):
        if module in chain:
            cycles.append(" -> ".join(chain[chain.index(module):] + [module]))
            return
        if module in done:
            return
        for name in graph.get(module, ()):
            visit(name, chain + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def dynamic_imports(root):
    """['file:line name'] for each use of importlib's importing functions or __import__ outside the
    registry, in the project's code, its tests and .ci's scripts."""
    files = source_files(root, folders=("common", "impls", "tests")) + sorted((root / ".ci").glob("*.py"))
    found = []
    for path in files:
        if module_name(path, root) == REGISTRY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("importlib"):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Name) and node.id == "__import__":
                names = ["__import__"]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "importlib":
                # importlib.import_module(...) after an import of importlib.metadata, which binds the name.
                names = [f"importlib.{node.attr}"]
            found += [f"{path.relative_to(root)}:{node.lineno} {name}" for name in names
                      if name in DYNAMIC_IMPORTS or name == "__import__"]
    return found


@pytest.fixture
def repository_copy(tmp_path):
    """compare.py, common/, impls/, tests/ and .ci/, for a change the real files must not see."""
    shutil.copy(REPO / "compare.py", tmp_path / "compare.py")
    for folder in ("common", "impls", "tests", ".ci"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def append_line(path, line):
    path.write_text(path.read_text() + line + "\n")


def test_imports_run_one_way_down():
    assert upward_imports(REPO) == []
    # Each layer is there, with its modules: a renamed folder would leave a rule with nothing to check.
    assert {LAYERS[layer(module)][1] for module in project_modules(REPO)} == {prefix for _, prefix in LAYERS}


@pytest.mark.parametrize(("importer", "line", "expected"), [
    ("common/data.py", "from impls import registry", "common.data -> impls.registry (the frameworks)"),
    ("impls/pytorch/lenet.py", "from common.drivers import harness", "impls.pytorch.lenet -> common.drivers.harness"),
    ("common/report/console.py", "from common.drivers.settings import Settings",
     "common.report.console -> common.drivers.settings"),
    ("impls/flax/train.py", "from impls import registry", "impls.flax.train -> impls.registry (the registry"),
    ("common/drivers/harness.py", "import compare", "common.drivers.harness -> compare (the command line)"),
])
def test_an_upward_import_is_caught(repository_copy, importer, line, expected):
    append_line(repository_copy / importer, line)
    found = upward_imports(repository_copy)
    assert any(entry.startswith(expected) for entry in found), found


def test_nothing_imports_in_a_cycle(repository_copy):
    assert import_cycles(REPO) == []
    # Within one layer, where the rule above allows it: the cycle itself is caught.
    append_line(repository_copy / "common/drivers/settings.py", "from common.drivers import commands")
    assert import_cycles(repository_copy) != []


def test_only_the_registry_imports_by_name(repository_copy):
    assert dynamic_imports(REPO) == []
    (repository_copy / "impls" / "registry.py").rename(repository_copy / "impls" / "elsewhere.py")
    assert [entry.split(" ")[1] for entry in dynamic_imports(repository_copy)] == [
        "importlib", "importlib.import_module"]
    for path, line, name in (
            ("common/drivers/bench.py", "from importlib import import_module", "importlib.import_module"),
            ("tests/support.py", "train = __import__('impls.flax.train')", "__import__"),
            ("common/report/page.py", "import importlib.util", "importlib.util")):
        append_line(repository_copy / path, line)
        assert any(entry.startswith(path) and entry.endswith(name) for entry in dynamic_imports(repository_copy)), path
    # importlib.metadata reads installed packages' versions: no import by name; but the name it binds
    # can reach importlib's importing functions.
    append_line(repository_copy / "common/files.py", "from importlib.metadata import version")
    append_line(repository_copy / "common/init.py", "import importlib.metadata")
    assert not any(entry.startswith(("common/files.py", "common/init.py"))
                   for entry in dynamic_imports(repository_copy))
    append_line(repository_copy / "common/init.py", "torch = importlib.import_module('torch')")
    assert any(entry.startswith("common/init.py") and entry.endswith("importlib.import_module")
               for entry in dynamic_imports(repository_copy))


# ---------------------------------------------------------------------------
# The framework interface
# ---------------------------------------------------------------------------


def declared_members(protocol):
    """{name: annotation} of a protocol's attributes and {name: function} of its methods, its bases' too."""
    attributes, methods = {}, {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, typing.Protocol, typing.Generic):
            continue
        attributes.update(getattr(cls, "__annotations__", {}))
        methods.update({name: value for name, value in vars(cls).items()
                        if inspect.isfunction(value) and not name.startswith("_")})
    return attributes, methods


def call_problem(function, declared, bound):
    """Why `function` does not take the calls `declared` allows (its parameters, by position and
    name; a default where the declaration has one; nothing more required), or None."""
    try:
        given = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return "has no signature to read"
    wanted = list(inspect.signature(declared).parameters.values())[0 if bound else 1:]
    for index, parameter in enumerate(wanted):
        if index >= len(given) or given[index].name != parameter.name:
            found = given[index].name if index < len(given) else "nothing"
            return f"parameter {index + 1} is {found}, declared {parameter.name}"
        if parameter.default is not parameter.empty and given[index].default is given[index].empty:
            return f"parameter {parameter.name} has no default, declared with one"
    required = [parameter.name for parameter in given[len(wanted):] if parameter.default is parameter.empty
                and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
    return f"requires {', '.join(required)}, not declared" if required else None


def interface_problems(module, protocol):
    """What `module` lacks of `protocol`, one line each."""
    problems = []
    attributes, methods = declared_members(protocol)
    for name, annotation in attributes.items():
        if not hasattr(module, name):
            problems.append(f"{name}: missing")
            continue
        value = getattr(module, name)
        if typing.get_origin(annotation) is type:
            problems += [f"{name}.{problem}" for problem in class_problems(value, typing.get_args(annotation)[0])]
    for name, declared in methods.items():
        if not callable(getattr(module, name, None)):
            problems.append(f"{name}: missing")
        elif problem := call_problem(getattr(module, name), declared, bound=False):
            problems.append(f"{name}: {problem}")
    return problems


def class_problems(cls, protocol):
    if not inspect.isclass(cls):
        return [f"is {type(cls).__name__}, declared a class"]
    attributes, methods = declared_members(protocol)
    fields = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    problems = [f"{name}: missing" for name in attributes if name not in fields and not hasattr(cls, name)]
    for name, declared in methods.items():
        if not inspect.isfunction(getattr(cls, name, None)):
            problems.append(f"{name}: missing")
        elif problem := call_problem(getattr(cls, name), declared, bound=True):
            problems.append(f"{name}: {problem}")
    return problems


FRAMEWORK_PARTS = [(framework, part) for framework in registry.FRAMEWORKS for part in registry.PARTS]


@pytest.mark.parametrize(("framework", "part"), FRAMEWORK_PARTS, ids=[f"{f}.{p}" for f, p in FRAMEWORK_PARTS])
def test_every_framework_provides_the_interface(framework, part):
    module = registry.part(framework, part)
    assert interface_problems(module, registry.protocol(framework, part)) == []


def test_the_registry_covers_every_framework_package_and_part():
    packages = {path.parent.name for path in (REPO / "impls").glob("*/__init__.py")}
    assert set(registry.FRAMEWORKS) == packages
    assert {framework for framework, _ in registry.IMPLEMENTATIONS.values()} == packages
    for framework in packages:
        assert {part for part in registry.PARTS if (REPO / "impls" / framework / f"{part}.py").exists()} == set(
            registry.PARTS), framework
        assert registry.training(framework).FRAMEWORK == framework


class Mutated:
    """A module with one member changed, the others as they are."""

    def __init__(self, module, **changes):
        self.module, self.changes = module, changes

    def __getattr__(self, name):
        if name in self.changes:
            if self.changes[name] is None:
                raise AttributeError(name)
            return self.changes[name]
        return getattr(self.module, name)


def test_a_member_missing_or_with_other_parameters_is_caught():
    train = registry.training("pytorch")
    protocol = registry.protocol("pytorch", "train")
    assert interface_problems(Mutated(train, predict=None), protocol) == ["predict: missing"]
    assert interface_problems(Mutated(train, LAYOUT=None), protocol) == ["LAYOUT: missing"]
    assert interface_problems(Mutated(train, predict=lambda model, X: None), protocol) == [
        "predict: parameter 2 is X, declared images"]
    assert interface_problems(Mutated(train, select_device=lambda request, dtype: None), protocol) == [
        "select_device: parameter request has no default, declared with one"]

    class Trainer:
        def train(self, batch_indices, steps): ...
        def synchronize(self): ...
    assert interface_problems(Mutated(train, FastTrainer=Trainer), protocol) == [
        "FastTrainer.train: requires steps, not declared", "FastTrainer.finish: missing"]
    jax_parallel = registry.data_parallel("flax")
    assert interface_problems(Mutated(jax_parallel, use_host_devices=None),
                              registry.protocol("flax", "data_parallel")) == ["use_host_devices: missing"]
