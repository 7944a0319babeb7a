"""What each command writes into --out, and so what an earlier run left there that it removes
before it starts: one table, one helper.

A run's record is written last and whole (results.json, bench.json; common.files), so that an
interrupted run leaves none; removing an earlier run's outputs first means that nothing in --out
passes for this run's unless this run wrote it. A command removes what it writes and every other
command's record beside it, but never what may be its input (evaluate reads checkpoints/). `page`
replaces the page alone: the source view, which names what it shows.
"""

import os
import shutil

from common.drivers.checkpoints import FOLDER as CHECKPOINTS
from common.report import bench as bench_report
from common.report import page, plots
from common.report import results as saved_results

PLOTS = tuple(stem + suffix for stem in plots.STEMS for suffix in plots.SUFFIXES)
RECORDS = (saved_results.RESULTS, bench_report.BENCH, page.PAGE, *PLOTS)
OUTPUTS = {
    "train": (*RECORDS, CHECKPOINTS),
    "evaluate": RECORDS,
    "bench": RECORDS,
    "page": (page.PAGE,),
}


def clear(out, command):
    """Remove from `out` what an earlier run left there that `command` would write or that would
    pass for its record; make `out` if it is not there."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS[command]:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
