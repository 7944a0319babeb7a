"""Where the workers of a data-parallel run come from.

On one machine, `compare.py --data-parallel N` starts N local PyTorch workers itself, with the
launcher torchrun is made of (torch.distributed's elastic_launch: an env:// rendezvous), and runs
JAX on a mesh of N local devices in its own process. Under torchrun, on one machine or several,
every process compare.py runs in is one worker of both frameworks: torch.distributed joins the
PyTorch workers, and jax.distributed joins the JAX processes into one mesh.
"""

import contextlib
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass

# Only where torchrun sets no JAX_COORDINATOR_ADDRESS: JAX's coordinator listens beside torch's store.
JAX_COORDINATOR_PORT_OFFSET = 1
# What a worker killed by a signal most likely met; the signal's name alone for the others.
SIGNAL_HINTS = {signal.SIGKILL: "out of memory?"}


class DataParallelError(RuntimeError):
    """A data-parallel run that cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class LaunchEnvironment:
    """What torchrun tells each worker it starts (env:// rendezvous)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def jax_coordinator(self):
        """host:port of jax.distributed's coordinator, which worker 0 runs."""
        return os.environ.get("JAX_COORDINATOR_ADDRESS") or (
            f"{self.master_addr}:{self.master_port + JAX_COORDINATOR_PORT_OFFSET}")


def launch_environment():
    """The launcher's variables for this process, or None where no launcher started it."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DataParallelError(f"{name} is not set, but RANK or WORLD_SIZE is: start the workers with torchrun, "
                                    "or set all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        values[name] = os.environ[name]
    try:
        rank, world_size, master_port = int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["MASTER_PORT"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        raise DataParallelError("RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_PORT must be integers, "
                                f"got {values}") from None
    if not 0 <= rank < world_size:
        raise DataParallelError(f"RANK {rank} is not in [0, WORLD_SIZE={world_size})")
    return LaunchEnvironment(rank, world_size, local_rank, local_world_size, values["MASTER_ADDR"], master_port)


def launch_local_workers(function, args, count):
    """function(*args) in `count` new processes on this machine, started as torchrun starts its
    workers (each finds RANK, WORLD_SIZE, MASTER_ADDR, ... in its environment). Returns worker 0's
    result. If one fails or is killed, the launcher stops the others; the error says which and why."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher keeps the workers' error files in a folder: ours, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="compare-workers-") as log_dir, quiet_launcher():
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=f"compare-{os.getpid()}",
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir))
        try:
            return elastic_launch(config, local_worker)(function, *args)[0]
        except ChildFailedError as error:
            rank, failure = error.get_first_failure()
            raise DataParallelError(f"worker {rank} of {count} {failure_message(failure)}") from None
        except SignalException as error:
            # The launcher turns a signal into this exception once it has stopped the workers:
            # Ctrl-C is then what it is everywhere else.
            if error.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise


@contextlib.contextmanager
def quiet_launcher():
    """The launcher logs every failure and signal at length; the errors raised instead say it in a line."""
    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    loggers = [logging.getLogger(name) for name in [*prefixes, *logging.root.manager.loggerDict]
               if name.startswith(prefixes)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def local_worker(function, *args):
    """function(*args) in one of the processes launch_local_workers starts."""
    from tqdm import tqdm

    # tqdm's default lock holds a multiprocessing RLock: a named semaphore, registered with the
    # resource tracker these processes share with the one that started them. A worker killed by a
    # signal never unregisters it, and the tracker warns of a leaked semaphore as that process
    # exits. Spawned workers share no lock anyway (each would make its own): a thread lock will do.
    tqdm.set_lock(threading.RLock())
    return function(*args)


def failure_message(failure):
    """What became of a worker, as the launcher recorded it: the signal that killed it, or the
    exception it died of with its traceback, unless it was a DataParallelError, which says all
    there is to say."""
    if failure.exitcode < 0:  # a signal's number, negated: killed, so no error file
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        hint = SIGNAL_HINTS.get(-failure.exitcode)
        return f"was killed by {name}{f' ({hint})' if hint else ''}; no results written"
    data = failure.error_file_data or {}
    message = data.get("message", {})
    if isinstance(message, dict):
        text = message.get("message", "")
        traceback = message.get("extraInfo", {}).get("py_callstack", "")
    else:
        text, traceback = str(message), ""
    if text in ("", "<NONE>"):  # "<NONE>": the launcher's word for a worker that wrote no error file
        return f"failed: exit code {failure.exitcode} (see its output above)"
    if text.startswith(f"{DataParallelError.__name__}: "):
        return f"failed: {text[len(DataParallelError.__name__) + 2:]}"
    return f"failed: {text}\n{traceback}".rstrip()


def pytorch_worker(names, settings, weights):
    """One of the PyTorch workers that compare.py --data-parallel N starts on this machine (through
    launch_local_workers): trains each named implementation on its shards, from weights[name].
    Returns worker 0's {name: (entry of results.json, snapshots)}; the others return None."""
    from common import harness
    from common.data import load_fashion_mnist

    harness.framework_module("pytorch").allow_tf32(settings.tf32)
    parallel = harness.data_parallel_module("pytorch")
    workers = parallel.start_workers(settings.device, settings.data_parallel, settings.worker_timeout)
    try:
        data = load_fashion_mnist(settings.data_dir)
        results = {name: harness.run_implementation(name, weights[name], data, settings, workers.device, workers)
                   for name in names}
    finally:
        parallel.stop_workers(workers)
    return results if workers.process_index == 0 else None
