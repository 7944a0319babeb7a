"""Files that are whole or absent: each is written under a temporary name beside its own and renamed
into place (os.replace, atomic on one file system) only once it is complete.

An interrupted run, or a write that fails, leaves no half-written file that a later reader could take
for a finished one: results.json, bench.json, report.html, the plots, the checkpoints.
"""

import contextlib
import json
import math
import os
import shutil

PARTIAL = ".partial"  # the suffix of a file still being written


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to: renamed to `path` when the block ends, removed
    if it ends with an error (an interrupt included)."""
    path = os.fspath(path)
    temporary = path + PARTIAL
    if os.path.isdir(temporary):
        # A folder a killed run began (SIGKILL unwinds nothing): what it holds is not this run's.
        shutil.rmtree(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary)
        elif os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text(path, text):
    """`text` into `path`, whole or not at all; returns the path."""
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        file.write(text)
    return os.fspath(path)


def finite_or_none(value):
    """JSON has no NaN or infinity: a diverged run's numbers are written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path, value):
    """`value` as indented JSON into `path`, whole or not at all, NaN and infinity as null; returns
    the path."""
    return write_text(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")
