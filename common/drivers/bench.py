"""compare.py bench: steady-state training throughput of every implementation x mode, against
the chapter's own way of training, measured in one run on one machine.

The baseline is this project's rendition of d2l's train_ch6: torchvision's FashionMNIST with
ToTensor, through a DataLoader with 4 worker processes, eager PyTorch, and the chapter's clock,
which runs only around each step (moving the batch to the device, forward, backward, update and
reading the loss back), not while the DataLoader produces the next batch.

Every figure is the median of --repeats timings of --batches full batches, after a
warm-up (compilation) that is timed and reported apart. The repeats go in rounds, each timing
every row once, so that the machine's drift falls on all of them alike.

With --dtype bf16-mixed, each implementation also trains in mixed precision, in both modes, beside
its float32 rows and in the same rounds, with its ratio to them.

With --data-parallel N, each implementation also trains the eager step over N workers, compared
with its own eager step on one: JAX's mesh in this process, in the rounds with the others;
PyTorch's N worker processes, started once for its rows, timed in rounds of their own, after.
"""

import contextlib
import gzip
import itertools
import os
import statistics
import sys
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from common import data
from common.drivers import outputs
from common.drivers.harness import data_or_exit, devices_or_exit, host_batch_step, select_devices, start_run
from common.drivers.settings import PRECISIONS, not_run_reason
from common.drivers.workers import launch_local_workers, start_workers, stop_workers
from common.files import atomic_path
from common.init import canonical_weights
from common.launch import DataParallelError
from common.report import bench as bench_report
from common.report import page
from impls import registry
from impls.registry import IMPLEMENTATIONS

WARMUP_BATCHES = 3
BASELINE_WORKERS = 4  # as d2l.load_data_fashion_mnist


def run(settings):
    """Measure every implementation of settings.impls in both modes against the chapter's loop;
    print the table, write bench.json and report.html. Returns the exit status."""
    started = {}
    if settings.data_parallel > 1:
        # torch.distributed's C++ side logs each failed connection at length; the error says it in a line.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        try:
            started = start_workers(settings, None)
        except DataParallelError as error:
            sys.exit(f"error: {error}")
    devices = devices_or_exit(settings.impls, settings, np.float32)
    dataset = data_or_exit(settings)
    reasons = {name: not_run_reason(name, settings, devices) for name in settings.impls}
    outputs.clear(settings.out, "bench")
    try:
        results = benchmark(settings, canonical_weights(settings.seed, np.float32), dataset, devices, started,
                            {name: reason for name, reason in reasons.items() if reason})
    except DataParallelError as error:
        sys.exit(f"error: {error}")
    stop_workers(started)
    bench_report.print_table(results)
    # The page first, bench.json last: the record's presence means the run completed.
    page_path = page.write(settings.out, bench=results)
    print(f"\nwrote {bench_report.write(results, settings.out)}, {page_path}")
    return 0


def torchvision_root(data_dir=None):
    """A folder torchvision's FashionMNIST reads: FashionMNIST/raw/ with the decompressed files.

    Made once in the user cache from the verified files common.data found, each written to a
    temporary name and renamed, so an interruption leaves nothing torchvision would take."""
    source = data.find_data_dir(data_dir)
    data.load_fashion_mnist(data_dir)  # verifies every file before torchvision reads them
    root = data.cache_dir().parent / "torchvision"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in data.EXPECTED:
        target = raw / name
        if target.exists():
            continue
        compressed = source / f"{name}.gz"
        content = gzip.decompress(compressed.read_bytes()) if compressed.exists() else (source / name).read_bytes()
        with atomic_path(target) as temporary, open(temporary, "wb") as file:
            file.write(content)
    return str(root)


@contextlib.contextmanager
def few_cores_warning_silenced():
    """d2l asks for 4 DataLoader workers whatever the machine; PyTorch warns where there are fewer cores."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        yield


def chapter_baseline(norm, weights, lr, batch_size, steps, data_dir, device):
    """d2l's train_ch6 loop, rebuilt, warmed up; returns a function that times one repeat of it
    (examples/sec as d2l counts them)."""
    import torch
    import torchvision
    from torchvision import transforms

    module = registry.training("pytorch")
    dataset = torchvision.datasets.FashionMNIST(torchvision_root(data_dir), train=True,
                                                transform=transforms.ToTensor(), download=False)
    model = module.build_lenet(weights, norm, device)
    optimizer = module.make_optimizer(model, lr)
    model.train()

    # Workers from a fork server rather than os.fork() (Python's default on Linux before 3.14, so
    # d2l's there): by now JAX may have started its thread pools in this process, and forking a
    # multithreaded process can deadlock. They start once and serve every repeat
    # (persistent_workers): d2l starts them anew at every epoch, but its clock never runs meanwhile,
    # and restarting four of them took about 8 s a repeat on a 2-core machine.
    with few_cores_warning_silenced():
        loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, num_workers=BASELINE_WORKERS,
                                             generator=torch.Generator().manual_seed(0),
                                             multiprocessing_context="forkserver", persistent_workers=True)

    def one_repeat(repeat):
        with few_cores_warning_silenced():
            iterator = iter(loader)  # a new shuffle of the training set, from the seeded generator
        timed_seconds, timed_examples = 0.0, 0
        for _, (X, y) in zip(range(steps), iterator):
            start = time.perf_counter()
            X, y = X.to(device), y.to(device)
            loss_sum, correct = module.train_step(model, optimizer, X, y)
            float(loss_sum), int(correct)  # d2l's Accumulator reads both back: a synchronisation
            timed_seconds += time.perf_counter() - start
            timed_examples += len(y)
        return timed_examples / timed_seconds

    one_repeat(0)  # the first pass warms up, as every other path does
    return one_repeat


def implementation_timer(name, mode, weights, train_images, train_labels, lr, batch_size, steps, device,
                         workers=None, bn_stats="global", precision="float32"):
    """One implementation in one mode, warmed up: (warm-up seconds, a function that times one
    repeat of `steps` batches and returns examples/sec). With `workers`: the eager step over them."""
    run = start_run(name, weights, lr, device, mode, train_images, train_labels, workers, bn_stats,
                    PRECISIONS[precision][1])
    module = run.module
    if mode == "eager":
        # As compare.py's eager loop: the step bound to the model, or every worker's step.
        train_step = run.data_parallel.step if workers is not None else host_batch_step(run)
    batches = data.train_batch_indices(len(train_labels), batch_size, seed=0, epoch=1)
    full = [indices for indices in batches if len(indices) == batch_size]

    def window(number, count):
        start = (number * count) % (len(full) - count)
        return np.stack(full[start:start + count])

    def train(indices):
        if mode == "compiled":
            run.trainer.train(indices)
            run.trainer.synchronize()
            return
        for batch in indices:
            train_step(data.to_layout(train_images[batch], module.LAYOUT), train_labels[batch])
        run.synchronize()

    synchronize = run.trainer.synchronize if mode == "compiled" else run.synchronize

    def one_repeat(repeat):
        indices = window(repeat, steps)
        synchronize()
        start = time.perf_counter()
        train(indices)
        return len(indices) * batch_size / (time.perf_counter() - start)

    # Warm-up: compiles the step (or the whole scan over `steps` batches) once.
    synchronize()
    start = time.perf_counter()
    train(window(0, steps if mode == "compiled" else WARMUP_BATCHES))
    return time.perf_counter() - start, one_repeat


def pytorch_data_parallel_worker(names, settings, weights):
    """One of the PyTorch workers that bench --data-parallel N starts: times the named
    implementations' eager step over the workers, in rounds. Worker 0 returns {name: (warm-up
    seconds, examples/sec of each repeat)}; the others None."""
    parallel = registry.data_parallel("pytorch")
    registry.training("pytorch").allow_tf32(settings.tf32)
    workers = parallel.start_workers(settings.device, settings.data_parallel, settings.worker_timeout)
    try:
        train_images, train_labels, _, _ = data.load_fashion_mnist(settings.data_dir)
        timers = {name: implementation_timer(name, "eager", weights, train_images, train_labels, settings.lr,
                                             settings.batch_size, settings.batches, workers.device, workers,
                                             settings.bn_stats) for name in names}
        repeats = {name: [] for name in names}
        for repeat in range(1, settings.repeats + 1):
            for name in names:
                repeats[name].append(timers[name][1](repeat))
    finally:
        parallel.stop_workers(workers)
    return {name: (timers[name][0], repeats[name]) for name in names} if workers.process_index == 0 else None


def benchmark(settings, weights, dataset, devices, workers=None, not_run=None, modes=("eager", "compiled")):
    """Measure everything; returns the bench.json content. workers: {framework: its workers} for the
    data-parallel rows that run in this process (JAX's); not_run: {name: why} for the
    implementations that cannot train data-parallel here.

    Every row is built and warmed up first (all at once: in compiled mode each holds the training
    set on its device); then the repeats go in rounds, each timing every row once. A slow minute on a
    shared machine then slows all of them alike, instead of whichever happened to be measured in
    it, and the ratios stay fair."""
    train_images, train_labels = dataset[0], dataset[1]
    workers, not_run = workers or {}, not_run or {}
    norms = sorted({IMPLEMENTATIONS[name][1] for name in settings.impls}, key=["scratch", "builtin"].index)
    parallel = [name for name in settings.impls if settings.data_parallel > 1 and name not in not_run]
    in_process = [name for name in parallel if IMPLEMENTATIONS[name][0] in workers]
    # float32 always; mixed precision beside it when asked (float64 is not benchmarked).
    precisions = ("float32", "bf16-mixed") if settings.dtype == "bf16-mixed" else ("float32",)
    rows_to_time = len(norms) + len(settings.impls) * len(modes) * len(precisions) + len(in_process)
    timings = rows_to_time * (1 + settings.repeats)
    with tqdm(total=timings, desc="benchmark", unit="timing", disable=not settings.progress) as progress:
        torch_module = registry.training("pytorch")
        # The chapter's loop runs in PyTorch, whatever is compared: its device, chosen as compare.py
        # chose the others' (the same one again where PyTorch is compared too).
        torch_device = select_devices(["torch-scratch"], settings.device, np.float32, settings.tf32)["pytorch"]
        rows, timers = [], []
        for norm in norms:
            timers.append(chapter_baseline(norm, weights, settings.lr, settings.batch_size, settings.batches,
                                           settings.data_dir, torch_device))
            rows.append({"implementation": f"chapter loop ({norm})", "mode": "d2l train_ch6", "norm": norm,
                         "dtype": "float32", "device": torch_module.device_description(torch_device),
                         "compile_seconds": None})
            progress.update()
        for name, mode, precision in itertools.product(settings.impls, modes, precisions):
            framework, norm = IMPLEMENTATIONS[name]
            warmup, timer = implementation_timer(name, mode, weights, train_images, train_labels, settings.lr,
                                                 settings.batch_size, settings.batches, devices[framework],
                                                 precision=precision)
            timers.append(timer)
            rows.append({"implementation": name, "mode": mode, "norm": norm, "dtype": precision,
                         "device": registry.training(framework).device_description(devices[framework]),
                         "compile_seconds": warmup})
            progress.update()
        for name in in_process:
            framework, norm = IMPLEMENTATIONS[name]
            its_workers = workers[framework]
            warmup, timer = implementation_timer(name, "eager", weights, train_images, train_labels, settings.lr,
                                                 settings.batch_size, settings.batches, its_workers.device, its_workers,
                                                 settings.bn_stats)
            timers.append(timer)
            device = f"{settings.data_parallel} x {registry.training(framework).device_description(its_workers.device)}"
            rows.append(data_parallel_row(name, settings, device, warmup))
            progress.update()
        for row in rows:
            row["repeats"] = []
        for repeat in range(1, settings.repeats + 1):
            # Each round in another order (seeded, so that a rerun repeats it): no row always runs
            # right after the same neighbour, whose threads or worker processes may still wind down.
            for index in np.random.default_rng(repeat).permutation(len(rows)):
                rows[index]["repeats"].append(timers[index](repeat))
                progress.update()
    # PyTorch's workers are processes of their own: started once, after the rounds above.
    in_workers = [name for name in parallel if name not in in_process]
    if in_workers:
        measured = launch_local_workers(pytorch_data_parallel_worker, (in_workers, settings, weights),
                                        settings.data_parallel)
        description = registry.training("pytorch").device_description(devices["pytorch"])
        for name in in_workers:
            warmup, repeats = measured[name]
            device = f"{settings.data_parallel} x {description}"
            rows.append(data_parallel_row(name, settings, device, warmup, repeats))
    for row in rows:
        row["examples_per_sec"] = statistics.median(row["repeats"])
    baseline = {row["norm"]: row["examples_per_sec"] for row in rows if row["mode"] == "d2l train_ch6"}
    one_worker = {row["implementation"]: row["examples_per_sec"] for row in rows
                  if row["mode"] == "eager" and row["dtype"] == "float32"}
    float32 = {(row["implementation"], row["mode"]): row["examples_per_sec"] for row in rows
               if row["dtype"] == "float32"}
    for row in rows:
        row["ratio_to_baseline"] = row["examples_per_sec"] / baseline[row.pop("norm")]
        if row.pop("workers", 1) > 1:
            row["ratio_to_one_worker"] = row["examples_per_sec"] / one_worker[row["implementation"]]
        if row["dtype"] != "float32":
            row["ratio_to_float32"] = row["examples_per_sec"] / float32[row["implementation"], row["mode"]]
    return {"config": {"batch_size": settings.batch_size, "lr": settings.lr, "dtype": "/".join(precisions),
                       "tf32": settings.tf32, "bench_batches": settings.batches, "repeats": settings.repeats,
                       "impls": settings.impls,
                       "baseline_workers": BASELINE_WORKERS, "data_parallel": settings.data_parallel,
                       "bn_stats": settings.bn_stats if settings.data_parallel > 1 else None, "not_run": not_run,
                       "order": "rounds, each timing every row once, in a seeded random order; PyTorch's "
                                "data-parallel rows in rounds of their own, after"},
            "rows": rows}


def data_parallel_row(name, settings, device, warmup, repeats=None):
    return {"implementation": name, "mode": f"eager, {settings.data_parallel} workers",
            "norm": IMPLEMENTATIONS[name].norm,
            "dtype": "float32", "workers": settings.data_parallel, "device": device, "compile_seconds": warmup,
            **({"repeats": repeats} if repeats is not None else {})}
