"""How a run ends when it is told to, or when a worker dies: every command of compare.py, run for
real and sent SIGINT (Ctrl-C) or SIGTERM (kill, timeout, SLURM, Kubernetes) once it is under way.

Each must end with one line, the conventional exit status (128 + the signal: 130, 143), nothing
half-written in --out (and nothing an earlier run left there that this command would write), and
no process of the run alive: the DataLoader's workers and their fork server, PyTorch's data-parallel
workers and multiprocessing's resource tracker included. Each run has a session of its own
(start_new_session), so that its processes are found wherever they were reparented.
"""

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.drivers import checkpoints, outputs
from common.init import canonical_weights
from tests.processes import processes_in_session, processes_left, spawned_workers

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 300
# One thread per run: a second busy process on a 2-core machine slows PyTorch's spinning OpenMP
# threads many times over (see tests/test_compare.py).
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
SIGNALS = [signal.SIGINT, signal.SIGTERM]
# A progress bar past its first step, in stderr: the command is at work.
UNDER_WAY = r"{}: .*\| *[1-9]\d*/"


def trained_checkpoints(folder):
    """Two checkpoints to evaluate: canonical weights, written as a run writes them."""
    weights = canonical_weights(0, np.float32)
    for name in ("torch-scratch", "flax-builtin"):
        checkpoints.write(folder, name, weights, checkpoints.metadata_for(name, weights, 0, 256, 1.0, 0, 0.1))
    return folder


# command: (compare.py's arguments, given the test's folder; what the run starts besides itself)
COMMANDS = {
    # One full epoch: training is under way when the signal comes.
    "train": (lambda folder: ["train", "--impls", "torch-scratch", "--epochs", "1", "--device", "cpu"], "nothing"),
    # PyTorch's two worker processes, started by torch.distributed's launcher.
    "train --data-parallel 2": (lambda folder: ["train", "--data-parallel", "2", "--impls", "torch-scratch",
                                                "--epochs", "1", "--device", "cpu"], "workers"),
    "evaluate": (lambda folder: ["evaluate", str(trained_checkpoints(folder / "checkpoints")), "--batch-size", "64",
                                 "--device", "cpu"], "nothing"),
    # The chapter's loop first: its DataLoader's 4 workers and their fork server are running.
    "bench": (lambda folder: ["bench", "--impls", "torch-scratch", "--batches", "5", "--repeats", "200",
                              "--device", "cpu"], "dataloader"),
    "page": (lambda folder: ["page"], "nothing"),
    # Deploying: the export folder under way, which a stop must not leave half-written.
    "export": (lambda folder: ["export", str(trained_checkpoints(folder / "checkpoints"))],
               "nothing"),
}
BAR = {"train": "torch-scratch epoch 1", "train --data-parallel 2": "torch-scratch epoch 1",
       "evaluate": "evaluating", "bench": "benchmark", "export": "exporting"}


def earlier_outputs(out, command):
    """What an earlier run left in `out` that this command writes: each must be gone when it stops."""
    out.mkdir()
    for name in outputs.OUTPUTS[command.split()[0]]:
        if "." in name:
            (out / name).write_text("an earlier run's\n")
        else:
            (out / name).mkdir()
            (out / name / "torch-scratch.safetensors").write_text("an earlier run's\n")


def wait_until_under_way(process, stderr_path, command, out):
    """Returns once the run is at work: its progress bar past a first step, or, for page, writing
    report.html. A page takes a second to write: here it writes into a pipe (a FIFO in place of
    its temporary file) that the test reads the first bytes of and then leaves full, so that the
    signal finds it writing. Returns the pipe's read end for page, else None."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    if command == "page":
        return reading(out / "report.html.partial", b"<!DOCTYPE html>", process, stderr_path)
    while not re.search(UNDER_WAY.format(re.escape(BAR[command])), stderr_path.read_text()):
        assert process.poll() is None, f"compare.py ended early:\n{stderr_path.read_text()}"
        assert time.monotonic() < deadline, "the run never got under way"
        time.sleep(0.05)
    return None


def reading(fifo, start, process, stderr_path):
    """The read end of the FIFO the run writes a file into, once the run has written `start` there:
    the pipe then fills and the run waits, writing, for the signal. Returns the read end."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    while not select.select([reader], [], [], 0.2)[0]:
        assert process.poll() is None, f"compare.py ended early:\n{stderr_path.read_text()}"
        assert time.monotonic() < deadline, f"{fifo.name} was never written"
    assert os.read(reader, len(start)) == start
    return reader


@contextlib.contextmanager
def compare_py(arguments, stderr_path):
    """compare.py with `arguments`, in a session of its own, its stderr into stderr_path. Whatever
    the block ends with, a run still alive then is killed, with every process of its session: a
    failed assertion leaves nothing running. Yields (the process, an ExitStack for what the block
    opens, closed before the kill: a FIFO's read end)."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "compare.py", *map(str, arguments)], cwd=REPO, env=ENVIRONMENT,
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            with contextlib.ExitStack() as opened:
                yield process, opened
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.parametrize("signum", SIGNALS, ids=[signum.name for signum in SIGNALS])
@pytest.mark.parametrize("command", [pytest.param(command, marks=pytest.mark.deploy) if command == "export" else command
                                     for command in COMMANDS])
def test_a_signal_stops_every_command_cleanly(command, signum, tmp_path):
    arguments, started = COMMANDS[command]
    out, stderr_path = tmp_path / "out", tmp_path / "stderr"
    earlier_outputs(out, command)
    if command == "page":
        os.mkfifo(out / "report.html.partial")
    with compare_py([*arguments(tmp_path), "--out", out], stderr_path) as (process, opened):
        reader = wait_until_under_way(process, stderr_path, command, out)
        if reader is not None:
            opened.callback(os.close, reader)
        running = processes_in_session(process.pid)
        if started == "workers":
            assert len(spawned_workers(process.pid)) == 2, running
        elif started == "dataloader":
            assert len(running) >= 6, running  # itself, the fork server, 4 workers (and the resource tracker)
        os.kill(process.pid, signum)
        returncode = process.wait(timeout=120)
        left = processes_left(process.pid)
    stderr = stderr_path.read_text()
    assert returncode == 128 + signum, stderr
    assert stderr.rstrip().splitlines()[-1] == f"stopped by {signum.name}: nothing written", stderr
    assert stderr.count("stopped by") == 1 and "Traceback" not in stderr, stderr
    assert not left, f"processes of the run outlived it: {left}"
    # Nothing half-written, and nothing of an earlier run that would pass for this one's.
    assert sorted(path.name for path in out.iterdir()) == [], sorted(out.rglob("*"))


def test_a_run_stopped_as_it_writes_its_page_leaves_none_of_what_it_wrote(tmp_path):
    """SIGTERM to a training run as it writes report.html, after its checkpoints and plots and
    before results.json: what it had written goes with it (outputs.discard_unfinished), so that
    nothing in --out passes for a finished run's, and the message, nothing written, holds."""
    out, stderr_path = tmp_path / "out", tmp_path / "stderr"
    out.mkdir()
    os.mkfifo(out / "report.html.partial")  # the page's temporary file: a pipe, left full
    with compare_py(["train", "--impls", "torch-scratch", "--epochs", 1, "--max-batches", 2, "--batch-size", 64,
                     "--device", "cpu", "--no-progress", "--out", out], stderr_path) as (process, opened):
        opened.callback(os.close, reading(out / "report.html.partial", b"<!DOCTYPE html>", process, stderr_path))
        assert {"checkpoints", "curves.png", "divergence.svg"} <= {path.name for path in out.iterdir()}
        os.kill(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=120)
    assert returncode == 143, stderr_path.read_text()
    assert stderr_path.read_text().rstrip().splitlines()[-1] == "stopped by SIGTERM: nothing written"
    assert sorted(out.iterdir()) == []


def test_a_killed_worker_is_named_with_its_signal(tmp_path):
    """SIGKILL (what the kernel's out-of-memory killer sends) to worker 1 of a data-parallel run as
    it trains: non-zero exit, one line naming the worker and the signal, no warning from
    multiprocessing's resource tracker of a semaphore the worker leaked, no results.json, and no
    process of the run left."""
    out = tmp_path / "out"
    stderr_path = tmp_path / "stderr"
    # One full epoch (235 batches of 256), progress bars on: it cannot end before the kill lands.
    with compare_py(["--device", "cpu", "--data-parallel", 2, "--impls", "torch-scratch", "--epochs", 1,
                     "--out", out], stderr_path) as (process, _):
        # Worker 0's bar past its first step: both workers are in the training loop (a step
        # all-reduces with worker 1), past the point where each made its progress bar.
        wait_until_under_way(process, stderr_path, "train --data-parallel 2", out)
        workers = spawned_workers(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        returncode = process.wait(timeout=120)
        left = processes_left(process.pid)
    stderr = stderr_path.read_text()
    assert returncode == 1
    assert stderr.rstrip().splitlines()[-1] == (
        "error: worker 1 of 2 was killed by SIGKILL (out of memory?); no results written"), stderr
    for warning in ("Traceback", "resource_tracker", "leaked", "Warning"):
        assert warning not in stderr, stderr
    assert not left, f"processes of the run outlived compare.py: {left}"
    assert not list(out.glob("results.json*")) and not list(out.glob("report.html*"))


def test_each_command_clears_what_it_would_write_and_no_input(tmp_path):
    """outputs.clear: a command removes from --out what it writes and every other command's record,
    and nothing else; evaluate keeps checkpoints/, which may be what it reads, and page the records."""
    everything = ["bench.json", "checkpoints", "curves.png", "curves.svg", "deployment.png", "deployment.svg",
                  "divergence.png", "divergence.svg", "evaluation.png", "evaluation.svg", "export", "notes.txt",
                  "report.html", "results.json"]
    kept = {"train": ["notes.txt"], "evaluate": ["checkpoints", "export", "notes.txt"],
            "bench": ["checkpoints", "export", "notes.txt"],
            "page": [name for name in everything if name != "report.html"],
            "export": ["checkpoints", "notes.txt"]}
    for command, left in kept.items():
        out = tmp_path / command
        out.mkdir()
        for name in everything:
            if "." in name:
                (out / name).write_text(json.dumps(name))
            else:
                (out / name).mkdir()
        outputs.clear(out, command)
        assert sorted(path.name for path in out.iterdir()) == left, command
    outputs.clear(tmp_path / "new", "train")
    assert (tmp_path / "new").is_dir()
