"""The float32 bounds that the suite holds each cell of a matrix to -- a checkpoint moved into
another implementation (evaluate), or deployed (export) -- read from tests/tolerances.py, where
every tolerance of the project is set with its reason.

The report colours each cell against its bound, so that a reader sees at a glance whether every
difference is float32's rounding: the same numbers the suite asserts, set in one place. Read as data
(ast), as the page reads README.md's tables and the tests' names: the report imports nothing from the
tests.
"""

import ast
from pathlib import Path

TOLERANCES = Path(__file__).resolve().parents[2] / "tests" / "tolerances.py"
# The bounds, relative to the logits' largest magnitude (at least 1), by name in tests/tolerances.py.
PORTED = "FLOAT32_PORTED_LOGITS"      # a number
DEPLOYED = "FLOAT32_DEPLOYED_LOGITS"  # {artefact kind: a number}


def float32_bounds(path=TOLERANCES):
    """{name: value} of the bounds that tests/tolerances.py sets as literals; a bound it does not (no
    tests/ beside the package, or a bound computed there) is missing, and its cells go uncoloured."""
    try:
        tree = ast.parse(Path(path).read_text())
    except OSError:
        return {}
    bounds = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in (PORTED, DEPLOYED):
                try:
                    bounds[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return bounds


def fraction_of_bound(difference, bound, magnitude):
    """difference / (bound x the logits' magnitude, at least 1): at most 1 is float32's rounding.
    No difference at all is 0, bound or none (a matrix's reference cells)."""
    if difference == 0:
        return 0.0
    return None if bound is None else difference / (bound * max(1.0, magnitude))
