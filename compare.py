"""The chapter's experiment -- LeNet with batch normalization on Fashion-MNIST -- six ways.

    python compare.py                      # lr 1.0, 10 epochs, batch 256, all six implementations
    python compare.py --epochs 1 --max-batches 20 --impls torch-scratch,flax-scratch
    python compare.py --data-parallel 2    # each batch shared by 2 workers, batch norm over all of it
    torchrun --nproc-per-node 2 compare.py # the same, each process started by torchrun
    python compare.py --evaluate runs/X/checkpoints   # each trained model in each implementation
    python compare.py --init runs/X/checkpoints/torch-builtin.pt   # train on from a checkpoint

Every implementation starts from the same canonical weights (common/init.py) and sees the same
batches in the same order (common/data.py); the report says how far they drift apart, and
<out>/checkpoints/ keeps each trained model in files any of the six loads (common/checkpoint.py).
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

from common import checkpoint
from common.checkpoint import CheckpointError
from common.data import DataError, load_fashion_mnist, num_batches, shard_bounds
from common.files import atomic_path
from common.harness import (IMPLEMENTATIONS, MODES, PRECISIONS, cross_evaluate, data_parallel_module,
                            parse_implementations, run_implementation, select_devices)
from common.init import PARAMETER_NAMES, SHAPING_PARAMETER_NAMES, canonical_weights
from common.parallel import DataParallelError, launch_environment, launch_local_workers, pytorch_worker
from common.report import console, page
from common.report import results as saved_results

TRAIN_EXAMPLES = 60000  # Fashion-MNIST's training set
JAX_FRAMEWORKS = {"flax", "linen"}  # Flax's two APIs, NNX and Linen, on one JAX


def integer_at_least(minimum, expected):
    """An argparse type: an integer >= minimum, else `expected` in the error message."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = integer_at_least(1, "a positive integer")
non_negative_int = integer_at_least(0, "a non-negative integer")


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text!r}")
    return value


def implementation_list(text):
    try:
        return parse_implementations(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def trained_batch_sizes(args):
    """The sizes of the batches an epoch trains on: the full ones, and a partial last one if reached."""
    sizes = {args.batch_size} if args.batch_size <= TRAIN_EXAMPLES else set()
    batches = -(-TRAIN_EXAMPLES // args.batch_size)
    if TRAIN_EXAMPLES % args.batch_size and (args.max_batches is None or args.max_batches >= batches):
        sizes.add(TRAIN_EXAMPLES % args.batch_size)
    return sorted(sizes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train LeNet with batch normalization on Fashion-MNIST in PyTorch, Flax NNX and Flax Linen, "
                    "from scratch and built in, from one initialisation on one batch order, and "
                    "report accuracy, speed and how far they drift apart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="examples per batch")
    parser.add_argument("--lr", type=positive_float, default=1.0, help="SGD learning rate")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the initial weights and of each epoch's batch order")
    parser.add_argument("--impls", type=implementation_list, default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated implementations, from: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--dtype", choices=tuple(PRECISIONS), default="float32",
                        help="floating-point type of weights and computation; bf16-mixed: float32 parameters, "
                             "optimizer state and batch-norm statistics, convolutions and matrix products in "
                             "bfloat16 (torch.autocast; Flax's dtype/param_dtype), and every implementation "
                             "trained again in float32 to measure the drift against")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a CUDA GPU for each framework that sees one, else the CPU")
    parser.add_argument("--tf32", action="store_true",
                        help="on NVIDIA GPUs, let both frameworks round float32 convolutions and matrix "
                             "products to TensorFloat-32 (faster, less exact); by default both compute "
                             "IEEE float32 (their own defaults differ: PyTorch uses TF32 in convolutions "
                             "only, JAX in both)")
    parser.add_argument("--mode", choices=MODES, default="eager",
                        help="eager: the chapter's way, one step per batch from host memory; compiled: "
                             "the fast paths (the dataset on the device, torch.compile / one jitted "
                             "lax.scan per epoch), on the same batches")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the four Fashion-MNIST files (.gz or not); default: search "
                             "$FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist, the user cache, "
                             "then download")
    parser.add_argument("--out", default=None,
                        help="folder for results.json, plots and report.html (default: a new folder under runs/)")
    parser.add_argument("--max-batches", type=positive_int, default=None,
                        help="train on at most N batches per epoch (for quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--side-by-side", action="store_true",
                        help="write report.html's source view alone into --out (the mirrored implementations "
                             "side by side, linked to the README's table of differences), without training")
    parallel = parser.add_argument_group("data parallel")
    parallel.add_argument("--data-parallel", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                          help="workers sharing each batch: PyTorch in N processes (torch.distributed, "
                               "DistributedDataParallel), JAX on a mesh of N devices; under torchrun, "
                               "every process it starts (default: torchrun's WORLD_SIZE, else 1)")
    parallel.add_argument("--bn-stats", choices=("global", "local"), default="global",
                          help="with several workers: batch norm over the whole batch (synchronised "
                               "statistics), or over each worker's shard alone")
    parallel.add_argument("--worker-timeout", type=positive_int, default=300, metavar="SECONDS",
                          help="how long a worker waits for the others: at the rendezvous and at every collective")
    trained = parser.add_argument_group("trained models (every run writes each into <out>/checkpoints/)")
    trained.add_argument("--init", metavar="PATH", default=None,
                         help="start every implementation from this checkpoint instead of the canonical "
                              "initialisation: a .safetensors file of a run's checkpoints/, a PyTorch "
                              "state_dict of this LeNet, or an Orbax folder of NNX or Linen (cast to --dtype)")
    trained.add_argument("--running-var", choices=("keep", "convert"), default="keep",
                         help="with --init: keep the moving variances as stored (each implementation then "
                              "predicts what the checkpoint's did), or convert them to each implementation's "
                              "convention (torch-builtin keeps the unbiased variance, the others the biased) by "
                              "n/(n-1), n the values per channel in a batch of --batch-size")
    trained.add_argument("--evaluate", nargs="+", metavar="PATH", default=None,
                         help="train nothing: load each checkpoint (files, or a run's checkpoints/ folder) into "
                              "each of --impls and evaluate it on the test set, in its own dtype: test accuracy "
                              "and the largest logit difference from the implementation it was trained in")
    bench = parser.add_argument_group("benchmark (instead of the experiment)")
    bench.add_argument("--bench", action="store_true",
                       help="measure steady-state training throughput of each implementation in both modes "
                            "against the chapter's own loop (DataLoader with 4 workers), in float32; "
                            "prints a table and writes bench.json into --out")
    bench.add_argument("--bench-batches", type=positive_int, default=50, help="batches per timed repeat")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats; the median is reported")
    args = parser.parse_args(argv)
    # Batch norm in training cannot normalise a batch of one example (all six refuse it).
    if args.batch_size == 1:
        parser.error("--batch-size 1: batch norm in training needs at least 2 examples per batch")
    if min(trained_batch_sizes(args)) == 1:
        parser.error(f"--batch-size {args.batch_size} leaves a last training batch of one example, "
                     "which batch norm cannot normalise; choose another batch size")
    full_batches = TRAIN_EXAMPLES // args.batch_size
    if args.bench and args.bench_batches >= full_batches:
        parser.error(f"--bench-batches {args.bench_batches}: an epoch has only {full_batches} full batches "
                     f"of {args.batch_size}; choose fewer")
    largest = float(np.finfo(PRECISIONS[args.dtype][0]).max)
    if args.lr > largest:
        parser.error(f"--lr {args.lr:g} is beyond the largest {args.dtype} ({largest:.3g})")
    try:
        launch = launch_environment()
    except DataParallelError as error:
        parser.error(str(error))
    asked = getattr(args, "data_parallel", None)
    if launch is not None and asked not in (None, launch.world_size):
        parser.error(f"--data-parallel {asked}: torchrun started {launch.world_size} workers")
    args.data_parallel = asked or (launch.world_size if launch else 1)
    if launch is not None and args.bench:
        parser.error("--bench starts the workers it measures: run it without torchrun (--data-parallel N)")
    if args.data_parallel > 1:
        if args.mode == "compiled":
            parser.error("--data-parallel trains the eager step (one step per batch); leave out --mode compiled")
        # The smallest shard of the smallest batch: shard_bounds cuts shards that differ by one at most.
        smallest = min(batch // args.data_parallel for batch in trained_batch_sizes(args))
        if smallest < 2:
            parser.error(f"--data-parallel {args.data_parallel} with --batch-size {args.batch_size}: a worker's "
                         f"shard would hold {smallest} example(s), and batch norm in training needs at least 2 per "
                         "worker; use fewer workers or larger batches")
    if args.evaluate is not None:
        for flag, given in (("--init", args.init), ("--bench", args.bench), ("--side-by-side", args.side_by_side),
                            ("torchrun", launch), ("--data-parallel", args.data_parallel > 1),
                            ("--mode compiled", args.mode != "eager")):
            if given:
                parser.error(f"--evaluate trains nothing: leave out {flag}")
        if args.dtype != "float32":
            parser.error(f"--evaluate evaluates each checkpoint in its own dtype: leave out --dtype {args.dtype}")
    if args.init is not None and args.bench:
        parser.error("--bench measures from the canonical initialisation: leave out --init")
    if args.running_var != "keep" and args.init is None:
        parser.error(f"--running-var {args.running_var} converts the moving variances of --init FILE: give one")
    if args.out is None:
        args.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return args


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


def not_run_reason(name, args, devices):
    """Why `name` cannot train data-parallel as asked, here; None if it can."""
    framework, norm = IMPLEMENTATIONS[name]
    if args.data_parallel == 1 or norm != "builtin" or args.bn_stats != "global":
        return None
    workers = args.data_parallel
    if framework == "pytorch" and devices["pytorch"].type == "cpu":
        return ("nn.SyncBatchNorm trains only on GPUs (its statistics kernels have no CPU implementation, "
                "pytorch/pytorch#78078); --bn-stats local runs it on the CPU")
    uneven = [batch for batch in trained_batch_sizes(args) if batch % workers]
    if framework in JAX_FRAMEWORKS and uneven:
        sizes = sorted({stop - start for start, stop in shard_bounds(uneven[0], workers)}, reverse=True)
        layer = "nnx.BatchNorm" if framework == "flax" else "linen.BatchNorm"
        return (f"{layer}(axis_name=...) averages the workers' means without weighing them by their "
                f"shard sizes (google/flax#2417), and batches of {uneven[0]} over {workers} workers make shards of "
                f"{' and '.join(map(str, sizes))}; choose batch sizes divisible by {workers}, or --bn-stats local")
    return None


def start_workers(args, launch):
    """{framework: its workers} for each framework whose workers run in this process: JAX's always
    (a mesh of local devices, or, under torchrun, jax.distributed's), one mesh for both Flax APIs;
    PyTorch's under torchrun only (otherwise launch_local_workers starts them)."""
    frameworks = {IMPLEMENTATIONS[name][0] for name in args.impls}
    workers = {}
    if launch is not None:
        # Under torchrun the workers meet at torch.distributed's rendezvous first, whatever runs:
        # it reports one that cannot be reached as an error, where JAX's client would abort the
        # process (a fatal error in C++) if its coordinator did not answer in time.
        torch_parallel = data_parallel_module("pytorch")
        rendezvous = torch_parallel.start_workers(args.device if "pytorch" in frameworks else "cpu",
                                                  args.data_parallel, args.worker_timeout)
        if "pytorch" in frameworks:
            workers["pytorch"] = rendezvous
    jax_frameworks = frameworks & JAX_FRAMEWORKS
    if jax_frameworks:
        jax_parallel = data_parallel_module("flax")
        if launch is None:
            jax_parallel.use_host_devices(args.data_parallel)
        mesh = jax_parallel.start_workers(args.device, args.data_parallel, args.worker_timeout)
        workers.update(dict.fromkeys(jax_frameworks, mesh))
    if launch is not None and "pytorch" not in frameworks:
        torch_parallel.stop_workers(rendezvous)
    return workers


def stop_workers(workers):
    """Each framework's workers, once: both Flax APIs share one mesh."""
    for framework, its_workers in {id(its_workers): (framework, its_workers)
                                   for framework, its_workers in workers.items()}.values():
        data_parallel_module(framework).stop_workers(its_workers)


def initial_weights(args, dtype, reports):
    """(--init's checkpoint or None, {name: the weights it starts from}): the canonical weights, or
    --init's, cast to the run's dtype and, with --running-var convert, with moving variances in each
    implementation's convention. A checkpoint that does not fit ends the run in one line."""
    if args.init is None:
        weights = canonical_weights(args.seed, dtype)
        return None, {name: weights for name in args.impls}
    try:
        init = checkpoint.read(args.init)
    except CheckpointError as error:
        sys.exit(f"error: --init: {error}")
    weights = init.weights
    stored = weights["conv1.weight"].dtype
    if stored != dtype:
        weights = checkpoint.cast(weights, dtype)
        if reports:
            print(f"--init {args.init}: {stored} weights, cast to {dtype} for this run")
    if args.running_var == "keep":
        return init, {name: weights for name in args.impls}
    try:
        return init, {name: checkpoint.convert_running_variance(weights, init.metadata.get("running_var"),
                                                                checkpoint.running_variance_of(name), args.batch_size)
                      for name in args.impls}
    except CheckpointError as error:
        sys.exit(f"error: --running-var convert: {args.init}: {error}")


def write_checkpoints(args, runs, snapshots, init):
    """Each implementation that trained to the end, in every format, into <out>/checkpoints/:
    {name: [its files, relative to --out]}."""
    # An epoch's steps as the harness counts them (common.data.num_batches, at most --max-batches).
    steps_per_epoch = min(num_batches(TRAIN_EXAMPLES, args.batch_size), args.max_batches or TRAIN_EXAMPLES)
    steps_before = int(init.metadata.get("steps", 0)) if init is not None else 0
    trained = [name for name, run in runs.items()
               if "not_run" not in run and not run["diverged_at_step"] and run["epochs"]]
    if not trained:
        return {}
    written = {}
    # The folder whole or not at all: an interrupted run leaves no checkpoints/ that --evaluate would take.
    with atomic_path(os.path.join(args.out, checkpoint.FOLDER)) as folder:
        for name in trained:
            run, weights = runs[name], snapshots[name][-1]["weights"]
            metadata = checkpoint.metadata_for(
                name, weights, steps_before + steps_per_epoch * len(run["epochs"]), args.batch_size, args.lr,
                args.seed, run["epochs"][-1]["test_acc"], precision=args.dtype,
                init=f"{args.init} (--running-var {args.running_var})" if init else f"canonical, seed {args.seed}")
            written[name] = [os.path.join(checkpoint.FOLDER, os.path.basename(path))
                             for path in checkpoint.write(folder, name, weights, metadata)]
    return written


def evaluate_checkpoints(args):
    """compare.py --evaluate: every checkpoint in every selected implementation; nothing trained."""
    try:
        checkpoints = checkpoint.read_all(args.evaluate)
    except CheckpointError as error:
        sys.exit(f"error: --evaluate: {error}")
    # A checkpoint that does not say where it was trained is measured against the first column.
    sources = [(ported.label, ported.source or args.impls[0], ported.weights) for ported in checkpoints]
    dtypes = {ported.weights["conv1.weight"].dtype for ported in checkpoints}
    names = list(dict.fromkeys(args.impls + [source for _, source, _ in sources]))
    try:
        devices = select_devices(names, args.device, max(dtypes, key=lambda dtype: dtype.itemsize), args.tf32)
    except RuntimeError as error:
        sys.exit(f"error: --device cuda: {error}")
    try:
        _, _, test_images, test_labels = load_fashion_mnist(args.data_dir)
    except DataError as error:
        sys.exit(f"error: {error}")
    os.makedirs(args.out, exist_ok=True)
    saved_results.remove_stale(args.out)
    evaluation = cross_evaluate(sources, args.impls, test_images, test_labels, devices, args.batch_size,
                                progress=not args.no_progress)
    evaluation["files"] = [ported.path for ported in checkpoints]
    results = {"config": {"evaluate": args.evaluate, "impls": args.impls, "device": args.device, "tf32": args.tf32,
                          "batch_size": args.batch_size},
               "environment": saved_results.environment(devices),
               "evaluation": evaluation}
    console.print_evaluation(results)
    paths = saved_results.write_all(results, args.out)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.side_by_side:
        print(f"wrote {page.write(args.out)}")
        return 0
    if args.evaluate is not None:
        return evaluate_checkpoints(args)
    launch = launch_environment()
    reports = launch is None or launch.rank == 0  # under torchrun, worker 0 reports
    dtype = np.dtype(PRECISIONS[args.dtype][0])  # the parameters'
    workers = {}
    if args.data_parallel > 1:
        # torch.distributed's C++ side logs each failed connection at length; the error says it in a line.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        try:
            workers = start_workers(args, launch)
        except DataParallelError as error:
            sys.exit(f"error: {error}")
    # --init read, checked and converted before anything trains or is written; after the workers
    # start, since reading an Orbax folder starts JAX's backend, which a mesh of host devices precedes.
    init, weights = initial_weights(args, dtype, reports)
    try:
        devices = select_devices(args.impls, args.device, dtype, args.tf32)
    except RuntimeError as error:
        sys.exit(f"error: --device cuda: {error}")
    try:
        data = load_fashion_mnist(args.data_dir)
    except DataError as error:
        sys.exit(f"error: {error}")
    if reports:
        os.makedirs(args.out, exist_ok=True)
    reasons = {name: not_run_reason(name, args, devices) for name in args.impls}
    reasons = {name: reason for name, reason in reasons.items() if reason}
    if args.bench:
        from common import bench  # noqa: PLC0415 (torchvision is imported only for the benchmark)
        from common.report import bench as bench_report  # noqa: PLC0415
        page.remove_stale(args.out)  # an earlier run's page must not pass for this benchmark's
        try:
            results = bench.benchmark(args, canonical_weights(args.seed, np.float32), data, devices, workers, reasons)
        except DataParallelError as error:
            sys.exit(f"error: {error}")
        bench_report.print_table(results)
        print(f"\nwrote {bench_report.write(results, args.out)}, {page.write(args.out, bench=results)}")
        return 0
    if reports:
        saved_results.remove_stale(args.out)
        checkpoint.remove_stale(args.out)

    if reports:
        for name, reason in reasons.items():
            print(f"{name}: not run: {reason}", file=sys.stderr)
    runs, snapshots = train_all(args, launch, weights, data, devices, workers, reasons)
    reference = None
    if PRECISIONS[args.dtype][1] is not None:
        # Mixed precision is measured against the same runs in float32: same weights, same batches.
        if reports:
            print(f"\nThe same runs in float32, to measure {args.dtype} against:")
        float32_settings = argparse.Namespace(**{**vars(args), "dtype": "float32"})
        reference = train_all(float32_settings, launch, weights, data, devices, workers, reasons)
    # Worker 0 writes the checkpoints while the workers are still joined: under torchrun, Orbax
    # looks for jax.distributed's client even to save from one process.
    checkpoints = write_checkpoints(args, runs, snapshots, init) if reports else None
    stop_workers(workers)
    if not reports:
        return 0
    ran = [name for name in args.impls if "not_run" not in runs[name]]
    results = {
        "config": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   **({"init": args.init, "running_var": args.running_var} if init is not None else {}),
                   "dtype": args.dtype, "tf32": args.tf32, "impls": args.impls, "device": args.device,
                   "mode": args.mode, "max_batches": args.max_batches,
                   "precision": {"parameters": PRECISIONS[args.dtype][0],
                                 "computation": PRECISIONS[args.dtype][1] or PRECISIONS[args.dtype][0],
                                 "batch_norm_statistics": PRECISIONS[args.dtype][0]},
                   "data_parallel": {"workers": args.data_parallel, "bn_stats": args.bn_stats,
                                     "started_by": "torchrun" if launch else "compare.py"}
                   if args.data_parallel > 1 else None},
        "environment": saved_results.environment(devices),
        "runs": {name: runs[name] for name in args.impls},
        "divergence": divergence(snapshots, ran),
    }
    if reference is not None:
        reference_runs, reference_snapshots = reference
        results["float32_reference"] = {"runs": {name: reference_runs[name] for name in args.impls},
                                        "drift": drift_from_reference(snapshots, reference_snapshots, ran)}
    results["checkpoints"] = checkpoints
    console.print_report(results)
    paths = saved_results.write_all(results, args.out)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def train_all(args, launch, weights, data, devices, workers, reasons):
    """Every implementation trained as compare.py's flags say, each from weights[name]: ({name: its
    entry of results.json}, {name: its snapshots}); the names in `reasons` are reported as not run."""
    runs, snapshots = {}, {}
    for name, reason in reasons.items():
        runs[name], snapshots[name] = {"not_run": reason}, []
    # Without torchrun, PyTorch's workers are new processes, started together for all its implementations.
    local_pytorch = [name for name in args.impls if name not in runs and IMPLEMENTATIONS[name][0] == "pytorch"
                     and args.data_parallel > 1 and launch is None]
    if local_pytorch:
        try:
            pytorch_weights = {name: weights[name] for name in local_pytorch}
            results = launch_local_workers(pytorch_worker, (local_pytorch, args, pytorch_weights), args.data_parallel)
        except DataParallelError as error:
            # A worker stopped mid-epoch leaves its progress bar's line unfinished: the error starts a new one.
            line_start = "" if args.no_progress else "\n"
            sys.exit(f"{line_start}error: {error}")
        for name in local_pytorch:
            runs[name], snapshots[name] = results[name]
    for name in args.impls:
        if name not in runs:
            framework = IMPLEMENTATIONS[name][0]
            runs[name], snapshots[name] = run_implementation(name, weights[name], data, args, devices[framework],
                                                             workers.get(framework))
    return runs, snapshots


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: no results.json written")
