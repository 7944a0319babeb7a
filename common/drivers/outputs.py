"""What each command writes into --out, and so what an earlier run left there that it removes
before it starts: one table, one helper.

A run's record is written last and whole (results.json, bench.json; common.files), so that an
interrupted run leaves none; removing an earlier run's outputs first means that nothing in --out
passes for this run's unless this run wrote it. A command removes what it writes and every other
command's record beside it, but never what may be its input (evaluate and export read
checkpoints/). `page` replaces the page alone: the source view, which names what it shows.
"""

import os
import shutil
import sys

from common.report import bench as bench_report
from common.report import page, plots
from common.report import results as saved_results

CHECKPOINTS = "checkpoints"  # every trained implementation, each in every format (checkpoints.py)
EXPORT = "export"            # every checkpoint's deployed artefacts (deployment.py)
PLOTS = tuple(stem + suffix for stem in plots.STEMS for suffix in plots.SUFFIXES)
RECORDS = (saved_results.RESULTS, bench_report.BENCH, page.PAGE, *PLOTS)
OUTPUTS = {
    "train": (*RECORDS, CHECKPOINTS, EXPORT),  # new checkpoints: an earlier export of the old ones is stale
    "evaluate": RECORDS,
    "bench": RECORDS,
    "page": (page.PAGE,),
    "export": (*RECORDS, EXPORT),
}


# The output folders this process has cleared, and so begun to write into: {folder: command}.
STARTED = {}


def clear(out, command):
    """Remove from `out` what an earlier run left there that `command` would write or that would
    pass for its record; make `out` if it is not there. A folder that cannot be written ends the
    run in one line, before anything is."""
    try:
        os.makedirs(out, exist_ok=True)
        for name in OUTPUTS[command]:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    except OSError as error:
        sys.exit(unwritable(out, error))
    STARTED[os.path.abspath(out)] = command


def unwritable(out, error):
    """The one line that ends a run whose output folder `out` could not be written (an OSError)."""
    return f"error: --out {out}: cannot write there: {error.strerror}"


def discard_unfinished(out, command):
    """What a run of `command` stopped midway had written into `out`: removed, where this process
    had begun to write there (everything of those names is then this run's: clear removed the
    earlier run's); nothing, where it had not."""
    if STARTED.get(os.path.abspath(out)) == command:
        clear(out, command)
