"""The commands compare.py runs, each from a Settings: train (the chapter's experiment), evaluate,
bench, page and export. Each clears what an earlier run left in --out that it would write (outputs.py),
and each stops cleanly on SIGINT or SIGTERM (stopping.py).
"""

from common.drivers import bench, deployment, evaluation, experiment, outputs
from common.drivers.stopping import stops_cleanly
from common.report import page


def write_page(settings):
    """compare.py page: report.html's source view alone (the mirrored implementations side by side,
    linked to the README's tables of differences); nothing trained, no data read."""
    outputs.clear(settings.out, "page")
    print(f"wrote {page.write(settings.out)}")
    return 0


COMMANDS = {"train": experiment.run, "evaluate": evaluation.run, "bench": bench.run, "page": write_page,
            "export": deployment.run}


def run(settings):
    """settings.command, run to its end: its exit status. SIGINT or SIGTERM raise Stopped, which
    unwinds it (no file half-written, no child process left) and goes on to the caller."""
    with stops_cleanly():
        return COMMANDS[settings.command](settings)
