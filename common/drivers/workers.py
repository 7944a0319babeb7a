"""Where the workers of a data-parallel run come from, and how they start and stop.

On one machine, `compare.py --data-parallel N` starts N local PyTorch workers itself, with the
launcher torchrun is made of (torch.distributed's elastic_launch: an env:// rendezvous), and runs
JAX on a mesh of N local devices in its own process. Under torchrun, on one machine or several,
every process compare.py runs in is one worker of every framework: torch.distributed joins the
PyTorch workers, and jax.distributed joins the JAX processes into one mesh.
"""

import contextlib
import logging
import os
import signal
import tempfile
import threading

from common.drivers import harness
from common.drivers.stopping import Stopped, handlers_restored
from common.launch import DataParallelError
from impls import registry
from impls.registry import IMPLEMENTATIONS

# What a worker killed by a signal most likely met; the signal's name alone for the others.
SIGNAL_HINTS = {signal.SIGKILL: "out of memory?"}


def launch_local_workers(function, args, count):
    """function(*args) in `count` new processes on this machine, started as torchrun starts its
    workers (each finds RANK, WORLD_SIZE, MASTER_ADDR, ... in its environment). Returns worker 0's
    result. If one fails or is killed, the launcher stops the others; the error says which and why."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher keeps the workers' error files in a folder: ours, removed afterwards. It sets
    # its own handlers for SIGINT and SIGTERM, and leaves them set: ours come back after it.
    with tempfile.TemporaryDirectory(prefix="compare-workers-") as log_dir, quiet_launcher(), handlers_restored():
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=f"compare-{os.getpid()}",
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir))
        try:
            return elastic_launch(config, local_worker)(function, *args)[0]
        except ChildFailedError as error:
            rank, failure = error.get_first_failure()
            raise DataParallelError(f"worker {rank} of {count} {failure_message(failure)}") from None
        except SignalException as error:
            # The launcher turns SIGINT or SIGTERM into this exception once it has stopped the
            # workers: the signal is then what it is everywhere else.
            raise Stopped(error.sigval) from None


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
    from common.data import load_fashion_mnist

    registry.training("pytorch").allow_tf32(settings.tf32)
    parallel = registry.data_parallel("pytorch")
    workers = parallel.start_workers(settings.device, settings.data_parallel, settings.worker_timeout)
    try:
        data = load_fashion_mnist(settings.data_dir)
        results = {name: harness.run_implementation(name, weights[name], data, settings, workers.device, workers)
                   for name in names}
    finally:
        parallel.stop_workers(workers)
    return results if workers.process_index == 0 else None


def start_workers(settings, launch):
    """{framework: its workers} for each framework whose workers run in this process: JAX's always
    (a mesh of local devices, or, under torchrun, jax.distributed's), one mesh for both Flax APIs;
    PyTorch's under torchrun only (otherwise launch_local_workers starts them)."""
    frameworks = {IMPLEMENTATIONS[name].framework for name in settings.impls}
    workers = {}
    if launch is not None:
        # Under torchrun the workers meet at torch.distributed's rendezvous first, whatever runs:
        # it reports one that cannot be reached as an error, where JAX's client would abort the
        # process (a fatal error in C++) if its coordinator did not answer in time.
        torch_parallel = registry.data_parallel("pytorch")
        rendezvous = torch_parallel.start_workers(settings.device if "pytorch" in frameworks else "cpu",
                                                  settings.data_parallel, settings.worker_timeout)
        if "pytorch" in frameworks:
            workers["pytorch"] = rendezvous
    jax_frameworks = sorted(framework for framework in frameworks if registry.runs_on(framework, "jax"))
    if jax_frameworks:
        # One JAX, one mesh: Flax's two APIs share the same workers (impls/linen/data_parallel.py).
        jax_parallel = registry.data_parallel(jax_frameworks[0])
        if launch is None:
            jax_parallel.use_host_devices(settings.data_parallel)
        mesh = jax_parallel.start_workers(settings.device, settings.data_parallel, settings.worker_timeout)
        workers.update(dict.fromkeys(jax_frameworks, mesh))
    if launch is not None and "pytorch" not in frameworks:
        torch_parallel.stop_workers(rendezvous)
    return workers


def stop_workers(workers):
    """Each framework's workers, once: both Flax APIs share one mesh."""
    for framework, its_workers in {id(its_workers): (framework, its_workers)
                                   for framework, its_workers in workers.items()}.values():
        registry.data_parallel(framework).stop_workers(its_workers)
