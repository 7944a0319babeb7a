"""compare.py train: the chapter's experiment, every implementation from one initialisation on one
batch order, on one device or data-parallel, then how far they drifted apart.

Every implementation starts from the same canonical weights (common/init.py) or --init's checkpoint,
and sees the same batches in the same order (common/data.py). Under --dtype bf16-mixed each also
trains again in float32, to measure the mixed precision against. What a run writes: results.json
(last: its presence means the run completed), the plots, report.html and checkpoints/.
"""

import itertools
import os
import sys

import numpy as np

from common.checkpoint import CheckpointError, cast, convert_running_variance
from common.data import num_batches
from common.drivers import checkpoints, outputs, workers
from common.drivers.harness import data_or_exit, devices_or_exit, run_implementation
from common.drivers.settings import PRECISIONS, TRAIN_EXAMPLES, not_run_reason
from common.files import atomic_path
from common.init import PARAMETER_NAMES, SHAPING_PARAMETER_NAMES, canonical_weights
from common.launch import DataParallelError, launch_environment
from common.report import console
from common.report import results as saved_results
from impls.registry import IMPLEMENTATIONS


def run(settings):
    """Train every implementation of settings.impls as the settings say; report and write the
    results (in a data-parallel run, worker 0 does). Returns the exit status."""
    launch = launch_environment()
    reports = launch is None or launch.rank == 0  # under torchrun, worker 0 reports
    started = {}
    if settings.data_parallel > 1:
        # torch.distributed's C++ side logs each failed connection at length; the error says it in a line.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        try:
            started = workers.start_workers(settings, launch)
        except DataParallelError as error:
            sys.exit(f"error: {error}")
    # --init read, checked and converted before anything trains or is written; after the workers
    # start, since reading an Orbax folder starts JAX's backend, which a mesh of host devices precedes.
    init, weights = initial_weights(settings, reports)
    devices = devices_or_exit(settings.impls, settings, settings.parameter_dtype)
    data = data_or_exit(settings)
    reasons = {name: not_run_reason(name, settings, devices) for name in settings.impls}
    reasons = {name: reason for name, reason in reasons.items() if reason}
    if reports:
        outputs.clear(settings.out, "train")
        for name, reason in reasons.items():
            print(f"{name}: not run: {reason}", file=sys.stderr)
    runs, snapshots = train_all(settings, launch, weights, data, devices, started, reasons)
    reference = None
    if settings.compute_dtype is not None:
        # Mixed precision is measured against the same runs in float32: same weights, same batches.
        if reports:
            print(f"\nThe same runs in float32, to measure {settings.dtype} against:")
        reference = train_all(settings.replace(dtype="float32"), launch, weights, data, devices, started, reasons)
    # Worker 0 writes the checkpoints while the workers are still joined: under torchrun, Orbax
    # looks for jax.distributed's client even to save from one process.
    written = write_checkpoints(settings, runs, snapshots, init) if reports else None
    workers.stop_workers(started)
    if not reports:
        return 0
    ran = [name for name in settings.impls if "not_run" not in runs[name]]
    precision = PRECISIONS[settings.dtype]
    results = {
        "config": {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                   "seed": settings.seed,
                   **({"init": settings.init, "running_var": settings.running_var} if init is not None else {}),
                   "dtype": settings.dtype, "tf32": settings.tf32, "impls": list(settings.impls),
                   "device": settings.device, "mode": settings.mode, "max_batches": settings.max_batches,
                   "precision": {"parameters": precision[0], "computation": precision[1] or precision[0],
                                 "batch_norm_statistics": precision[0]},
                   "data_parallel": {"workers": settings.data_parallel, "bn_stats": settings.bn_stats,
                                     "started_by": "torchrun" if launch else "compare.py"}
                   if settings.data_parallel > 1 else None},
        "environment": saved_results.environment(devices),
        "runs": {name: runs[name] for name in settings.impls},
        "divergence": divergence(snapshots, ran),
    }
    if reference is not None:
        reference_runs, reference_snapshots = reference
        results["float32_reference"] = {"runs": {name: reference_runs[name] for name in settings.impls},
                                        "drift": drift_from_reference(snapshots, reference_snapshots, ran)}
    results["checkpoints"] = written
    console.print_report(results)
    paths = saved_results.write_all(results, settings.out)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def train_all(settings, launch, weights, data, devices, started, reasons):
    """Every implementation trained as the settings say, each from weights[name]: ({name: its entry
    of results.json}, {name: its snapshots}); the names in `reasons` are reported as not run."""
    runs, snapshots = {}, {}
    for name, reason in reasons.items():
        runs[name], snapshots[name] = {"not_run": reason}, []
    # Without torchrun, PyTorch's workers are new processes, started together for all its implementations.
    local_pytorch = [name for name in settings.impls if name not in runs and settings.data_parallel > 1
                     and launch is None and IMPLEMENTATIONS[name].framework == "pytorch"]
    if local_pytorch:
        try:
            pytorch_weights = {name: weights[name] for name in local_pytorch}
            results = workers.launch_local_workers(workers.pytorch_worker, (local_pytorch, settings, pytorch_weights),
                                                   settings.data_parallel)
        except DataParallelError as error:
            # A worker stopped mid-epoch leaves its progress bar's line unfinished: the error starts a new one.
            line_start = "\n" if settings.progress else ""
            sys.exit(f"{line_start}error: {error}")
        for name in local_pytorch:
            runs[name], snapshots[name] = results[name]
    for name in settings.impls:
        if name not in runs:
            framework = IMPLEMENTATIONS[name].framework
            runs[name], snapshots[name] = run_implementation(name, weights[name], data, settings, devices[framework],
                                                             started.get(framework))
    return runs, snapshots


def initial_weights(settings, reports):
    """(--init's checkpoint or None, {name: the weights it starts from}): the canonical weights, or
    --init's, cast to the run's dtype and, with --running-var convert, with moving variances in each
    implementation's convention. A checkpoint that does not fit ends the run in one line."""
    dtype = settings.parameter_dtype
    if settings.init is None:
        weights = canonical_weights(settings.seed, dtype)
        return None, {name: weights for name in settings.impls}
    try:
        init = checkpoints.read(settings.init)
    except CheckpointError as error:
        sys.exit(f"error: --init: {error}")
    weights = init.weights
    stored = weights["conv1.weight"].dtype
    if stored != dtype:
        weights = cast(weights, dtype)
        if reports:
            print(f"--init {settings.init}: {stored} weights, cast to {dtype} for this run")
    if settings.running_var == "keep":
        return init, {name: weights for name in settings.impls}
    try:
        return init, {name: convert_running_variance(weights, init.metadata.get("running_var"),
                                                     checkpoints.running_variance_of(name), settings.batch_size)
                      for name in settings.impls}
    except CheckpointError as error:
        sys.exit(f"error: --running-var convert: {settings.init}: {error}")


def write_checkpoints(settings, runs, snapshots, init):
    """Each implementation that trained to the end, in every format, into <out>/checkpoints/:
    {name: [its files, relative to --out]}."""
    # An epoch's steps as the harness counts them (common.data.num_batches, at most --max-batches).
    steps_per_epoch = min(num_batches(TRAIN_EXAMPLES, settings.batch_size), settings.max_batches or TRAIN_EXAMPLES)
    steps_before = int(init.metadata.get("steps", 0)) if init is not None else 0
    trained = [name for name, run in runs.items()
               if "not_run" not in run and not run["diverged_at_step"] and run["epochs"]]
    if not trained:
        return {}
    written = {}
    # The folder whole or not at all: an interrupted run leaves no checkpoints/ that evaluate would take.
    with atomic_path(os.path.join(settings.out, checkpoints.FOLDER)) as folder:
        for name in trained:
            run, weights = runs[name], snapshots[name][-1]["weights"]
            metadata = checkpoints.metadata_for(
                name, weights, steps_before + steps_per_epoch * len(run["epochs"]), settings.batch_size, settings.lr,
                settings.seed, run["epochs"][-1]["test_acc"], precision=settings.dtype,
                init=(f"{settings.init} (--running-var {settings.running_var})" if init
                      else f"canonical, seed {settings.seed}"))
            written[name] = [os.path.join(checkpoints.FOLDER, os.path.basename(path))
                             for path in checkpoints.write(folder, name, weights, metadata)]
    return written


def max_abs_difference(a, b, keys):
    return max(float(np.max(np.abs(a[key] - b[key]))) for key in keys)


def divergence(snapshots, names):
    """For each pair, the max abs difference of parameters and of test logits, per epoch."""
    pairs = []
    for a, b in itertools.combinations(names, 2):
        epochs = range(min(len(snapshots[a]), len(snapshots[b])))
        pairs.append({
            "pair": [a, b],
            "max_abs_param_diff": [max_abs_difference(snapshots[a][e]["weights"], snapshots[b][e]["weights"],
                                                      PARAMETER_NAMES) for e in epochs],
            # Without the biases that batch norm cancels (common/init.py): under bf16-mixed, rounding
            # noise walks them furthest, and they change no output.
            "max_abs_shaping_param_diff": [max_abs_difference(snapshots[a][e]["weights"], snapshots[b][e]["weights"],
                                                              SHAPING_PARAMETER_NAMES) for e in epochs],
            "max_abs_test_logit_diff": [float(np.max(np.abs(snapshots[a][e]["logits"] - snapshots[b][e]["logits"])))
                                        for e in epochs],
        })
    return pairs


def drift_from_reference(snapshots, reference_snapshots, names):
    """For each implementation, the max abs difference of its parameters and test logits from its
    own float32 run's, per epoch."""
    return [{"impl": name, **divergence({name: snapshots[name], "float32": reference_snapshots[name]},
                                        [name, "float32"])[0]} for name in names]
