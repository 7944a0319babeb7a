"""report.html's source view and tables of differences, built from the real source and README.

The mirrored files must stay mirrored: every definition beside its twin, in the same order, except
the twins whose names differ by convention and the definitions without a twin that common/report/page.py
declares. The tables of differences come from README.md alone, and every row of them must lead to
a place on the page. (What a reader sees in a browser is tested in tests/test_compare.py, on the
pages that compare.py writes.)
"""

import ast
import itertools
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from common.report import page
from impls import registry
from impls.registry import IMPLEMENTATIONS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def views():
    pairs, alone = page.pair_views(page.read_sources(REPO))
    return pairs, [page.alone_view(source) for source in alone]


def out_of_step(pairs):
    return [f"{view.filename} ({view.short_title}): {(row.left.block or row.right.block).name}: {row.reason}"
            for view in pairs for row in view.rows if row.status == "unexpected"]


def copy_of_the_repository(tmp_path):
    """impls/, tests/ and README.md, for a change the real files must not see."""
    for folder in ("impls", "tests"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    return tmp_path


def test_every_registered_framework_is_shown_read_against_another():
    """The page's frameworks are the registry's, each implementation's among them, each read against
    the one before it (PyTorch beside NNX, NNX beside Linen)."""
    frameworks = list(registry.FRAMEWORKS)
    assert frameworks == list(dict.fromkeys(framework for framework, _ in IMPLEMENTATIONS.values()))
    shown = page.framework_order()
    assert list(shown) == frameworks
    assert [framework.title for framework in shown.values()] == [registry.FRAMEWORKS[name].title for name in frameworks]
    assert [framework.read_against for framework in shown.values()] == [None, *frameworks[:-1]]


def test_the_mirrored_files_stay_mirrored(views):
    """Every definition beside its twin, or declared to have none: a function renamed, moved or
    removed in one implementation only fails here (and the page shows it as out of step)."""
    pairs, _ = views
    assert out_of_step(pairs) == []
    shown = {(view.filename, view.left.framework, view.right.framework) for view in pairs}
    assert shown == {(name, left, right) for name in page.FILE_ORDER
                     for left, right in itertools.pairwise(registry.FRAMEWORKS)}


def test_every_declared_exception_is_still_true(views):
    """A declaration that no longer holds (the twin came back, the definition went) must go."""
    pairs, _ = views
    by_key = {((view.left.framework, view.right.framework), view.filename): view for view in pairs}
    for key, declared in page.WITHOUT_TWIN.items():
        view = by_key[key]
        for framework, names in declared.items():
            side = "left" if framework == view.left.framework else "right"
            alone = [getattr(row, side).block.name for row in view.rows
                     if row.status == "alone" and getattr(row, side).how == "own"]
            assert sorted(alone) == sorted(names), (key, framework, names, alone)
    declared_total = sum(len(names) for declared in page.WITHOUT_TWIN.values() for names in declared.values())
    assert sum(row.status == "alone" for view in pairs for row in view.rows) == declared_total
    for filename, names, _ in page.TWINS_BY_OTHER_NAME:
        for view in pairs:
            left, right = names.get(view.left.framework), names.get(view.right.framework)
            if view.filename == filename and left and right and left != right:
                [row] = [row for row in view.rows if row.left.block and row.left.block.name == left]
                assert row.status == "renamed" and row.right.block.name == right, (filename, left, right)


def test_every_definition_of_a_file_is_on_its_rows_once_in_order(views):
    """Read with ast here, apart from the page's own reading: each file's definitions (and its
    classes' methods) are the rows' definitions, or inside a class shown whole, in file order."""
    pairs, alone = views
    for view in pairs + alone:
        for side_name, source in (("left", view.left), ("right", view.right)):
            if view.left is view.right and side_name == "right":
                continue
            tree = ast.parse(source.path.read_text())
            expected = []
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    expected.append((node.name, node.lineno))
                    expected += [(f"{node.name}.{member.name}", member.lineno) for member in node.body
                                 if isinstance(member, ast.FunctionDef)]
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [element.id for target in targets
                             for element in (target.elts if isinstance(target, ast.Tuple) else [target])]
                    expected.append((", ".join(names), node.lineno))
            index = 1 if side_name == "left" else 2
            shown = [pair[index] for row in view.rows if getattr(row, side_name).how == "own"
                     for pair in row.line_pairs if pair[index]]
            assert shown == sorted(set(shown)), (view.filename, view.short_title, side_name)  # once each, in order
            assert [(name, line) for name, line in expected if line in shown] == expected, (
                view.filename, view.short_title, side_name)


def test_a_function_renamed_in_one_implementation_only_is_out_of_step(tmp_path):
    """The one-line change: `check_input` renamed in impls/pytorch/batch_norm.py alone."""
    root = copy_of_the_repository(tmp_path)
    path = root / "impls" / "pytorch" / "batch_norm.py"
    source = path.read_text()
    assert source.count("def check_input(") == 1
    path.write_text(source.replace("def check_input(", "def check_inputs(", 1))
    before = out_of_step(page.pair_views(page.read_sources(REPO))[0])
    pairs, _ = page.pair_views(page.read_sources(root))
    assert [problem for problem in out_of_step(pairs) if problem not in before] == [
        "batch_norm.py (PyTorch | Flax NNX): check_inputs: no twin in impls/flax/batch_norm.py: renamed or removed "
        "on one side only?",
        "batch_norm.py (PyTorch | Flax NNX): check_input: no twin in impls/pytorch/batch_norm.py: renamed or removed "
        "on one side only?"]
    html = page.render(root=root)
    banner = re.search(r'<div class="problems" id="problems">(.*?)</div>', html, re.S)
    assert banner and f"{len(before) + 2} definition(s) without their twin" in banner.group(1)
    assert html.count('class="def status-unexpected') == len(before) + 2
    assert 'id="batch_norm--pytorch--flax--check_inputs"' in html


def test_a_definition_moved_in_one_implementation_only_is_out_of_step(tmp_path):
    """Matched by name, in file order: a twin out of order stands alone, and the page says where its twin is."""
    root = copy_of_the_repository(tmp_path)
    path = root / "impls" / "flax" / "batch_norm.py"
    lines = path.read_text().splitlines(keepends=True)
    source = page.read_source("flax", path)
    moved = source.block("sum_over_workers")
    after = source.block("check_input")
    block = lines[moved.start - 1:moved.end] + ["\n\n"]
    rest = lines[:moved.start - 1] + lines[moved.end:]
    at = after.end - (moved.end - moved.start + 1)
    path.write_text("".join(rest[:at] + ["\n\n"] + block + rest[at:]))
    pairs, _ = page.pair_views(page.read_sources(root))
    problems = out_of_step(pairs)
    assert any(problem.startswith("batch_norm.py (PyTorch | Flax NNX): sum_over_workers: its twin stands elsewhere")
               for problem in problems), problems


def test_every_row_of_the_readme_tables_has_a_place_on_the_page(views):
    pairs, alone = views
    tables = page.readme_tables(REPO / "README.md")
    assert list(tables) == list(page.DIFFERENCE_TABLES)
    topics = [cells[0] for _, rows in tables.values() for cells in rows]
    assert len(topics) == len(set(topics)) == 43
    assert len({page.slug(topic) for topic in topics}) == len(topics)  # each row's anchor its own
    assert sorted(page.PLACES) == sorted(topics), "PLACES must name the README's rows, no more, no fewer"
    for topic in topics:
        for place in page.PLACES[topic]:
            assert page.place_anchors(place, pairs, alone), (topic, place)


def defined_tests():
    """{file: names of its test functions}, read with ast here, apart from the page's own reading."""
    functions = {}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        functions[f"tests/{path.name}"] = {node.name for node in ast.parse(path.read_text()).body
                                           if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return functions


def test_every_row_of_a_pinned_table_names_tests_that_exist(views):
    """The tables with a "pinned by" column: every row names at least one test, and each is a test
    function of the tests folder (a test renamed or removed fails here, and the page says so). The
    options table names every test of tests/test_options.py, each in its row, and, for folding and
    exporting, tests of tests/test_deploy.py."""
    pairs, alone = views
    tables = page.difference_tables(pairs, alone, REPO / "README.md")[0]
    functions = defined_tests()
    pinned = [table for table in tables if table["rows"][0]["tests"]]
    assert [table["title"] for table in pinned] == ["Over several workers", "Batch-norm options across frameworks"]
    for table in pinned:
        for row in table["rows"]:
            assert row["tests"], (table["title"], row["topic"])
            for test in row["tests"]:
                file, _, name = test["id"].partition("::")
                assert test["found"] and name in functions.get(file, ()), (row["topic"], test)
    options = [test for row in pinned[1]["rows"] for test in row["tests"]]
    assert {test["id"].partition("::")[0] for test in options} == {"tests/test_options.py", "tests/test_deploy.py"}
    assert sorted(test["name"] for test in options if test["id"].startswith("tests/test_options.py")) == sorted(
        functions["tests/test_options.py"])


def test_a_test_renamed_is_flagged_on_the_page(tmp_path):
    """The one-line change: a test of the options table renamed in tests/test_options.py alone."""
    root = copy_of_the_repository(tmp_path)
    path = root / "tests" / "test_options.py"
    source = path.read_text()
    assert source.count("def test_pytorch_eps_is_flax_epsilon(") == 1
    path.write_text(source.replace("def test_pytorch_eps_is_flax_epsilon(", "def test_eps_is_epsilon(", 1))
    html = page.render(root=root)
    missing = re.search(r'<div class="problems" id="missing-tests">(.*?)</div>', html, re.S)
    assert missing and "`eps`: test_pytorch_eps_is_flax_epsilon" in missing.group(1)
    assert html.count("its tests: <code>tests/test_options.py</code>") == 16  # the table's 16 other rows
    assert 'id="missing-tests"' not in page.render(root=REPO)


def test_the_readme_is_the_tables_single_source(tmp_path):
    """A cell changed in README.md is changed on the page; a row whose topic has no places is flagged."""
    root = copy_of_the_repository(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert text.count("| unbiased, n/(n-1) |") == 1
    text = text.replace("| unbiased, n/(n-1) |", "| unbiased, n/(n-1), as Bessel corrected it |")
    readme.write_text(text.replace("| train-mode batch of one |", "| a training batch of one |"))
    html = page.render(root=root)
    assert "unbiased, n/(n-1), as Bessel corrected it" in html
    missing = re.search(r'<div class="problems" id="missing-places">(.*?)</div>', html, re.S)
    assert missing and "a training batch of one" in missing.group(1)


def test_the_template_is_package_data():
    """pip install (not only -e) must carry the template: pyproject's package-data matches it."""
    configuration = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "common.report" in configuration["packages"]
    patterns = configuration["package-data"]["common.report"]
    template = page.TEMPLATES / "report.html.j2"
    assert template.exists()
    assert any(template in (REPO / "common" / "report").glob(pattern) for pattern in patterns), patterns


def test_the_page_is_written_whole(tmp_path):
    out = tmp_path / "out"
    path = page.write(out)
    text = Path(path).read_text()
    assert path == str(out / "report.html") and text.endswith("</html>\n")
    assert [entry.name for entry in out.iterdir()] == ["report.html"]  # no temporary file left
    # Self-contained: nothing in it names a resource to fetch.
    assert not re.search(r'\b(src|href)="(?!#)', text)
    assert "<script" not in text and "@import" not in text and "url(" not in text.replace("url(#", "")
