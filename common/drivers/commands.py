"""The commands compare.py runs, each from a Settings: train (the chapter's experiment), evaluate,
bench, page and export. Each clears what an earlier run left in --out that it would write
(outputs.py); one that SIGINT or SIGTERM stops removes what it had begun to write (stopping.py).
"""

from common.drivers import bench, deployment, evaluation, experiment, outputs
from common.drivers.stopping import Stopped, signals_ignored
from common.report import page


def write_page(settings):
    """compare.py page: report.html's source view alone (the mirrored implementations side by side,
    linked to the README's tables of differences); nothing trained, no data read."""
    outputs.clear(settings.out, "page")
    print(f"wrote {page.write(settings.out)}")
    return 0


RUNS = {"train": experiment.run, "evaluate": evaluation.run, "bench": bench.run, "page": write_page,
        "export": deployment.run}


def run(settings):
    """settings.command, run to its end: its exit status. Stopped by SIGINT or SIGTERM (Stopped,
    raised on): what it had written into --out so far is removed, so that nothing there passes for
    a finished run's (a folder or file it was writing removes itself: common.files)."""
    try:
        return RUNS[settings.command](settings)
    except Stopped:
        with signals_ignored():
            outputs.discard_unfinished(settings.out, settings.command)
        raise
