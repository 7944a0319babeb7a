"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what kill, timeout, SLURM and Kubernetes
send) end every mode the same way, whatever it is doing.

Python's default leaves SIGTERM to kill the process on the spot: nothing unwinds, and the processes
it started (the DataLoader's workers and their fork server, PyTorch's data-parallel workers) live
on, orphaned. Here either signal becomes an exception, Stopped, raised where the run is, so that it
unwinds through every `finally` and `with` on its way out: a file being written is removed
(common.files.atomic_path), the workers are stopped, and whatever child process is still running
is ended last. compare.py then says so in one line and exits 128 + the signal's number (130, 143),
as a shell reports a process that a signal ended.
"""

import contextlib
import multiprocessing
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long a child process has to end once told to, before it is killed.
CHILD_GRACE_SECONDS = 10


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so that every library lets SIGTERM through
    as it lets Ctrl-C through, instead of taking it for an error of its own."""

    def __init__(self, signum=signal.SIGINT):
        self.signum = signal.Signals(signum)
        super().__init__(self.signum.name)

    @property
    def exit_status(self):
        return 128 + self.signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stops_cleanly():
    """Within the block, SIGINT and SIGTERM raise Stopped (a bare KeyboardInterrupt becomes one);
    when it ends, however it ends, no child process of this one is left running."""
    previous = {signum: signal.signal(signum, raise_stopped) for signum in SIGNALS}
    try:
        yield
    except Stopped:
        raise
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT) from None
    finally:
        with signals_ignored():
            end_child_processes()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_ignored():
    """Within the block, SIGINT and SIGTERM are ignored: a second Ctrl-C must not stop the clean-up
    that the first began. The handlers before it come back after it."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def handlers_restored():
    """After the block, SIGINT's and SIGTERM's handlers as they were before it, whatever a library
    set them to within it (torch.distributed's launcher sets its own, and leaves them set)."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def end_child_processes():
    """Every child process that multiprocessing started for this one (the DataLoader's workers,
    torch.distributed's launcher's workers) and that still runs: told to end (SIGTERM), then killed
    if it has not within CHILD_GRACE_SECONDS. The fork server and the resource tracker end by
    themselves once this process has."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(CHILD_GRACE_SECONDS)
        if child.is_alive():
            child.kill()
            child.join()
