"""The chapter's experiment -- LeNet with batch normalization on Fashion-MNIST -- four ways.

    python compare.py                      # lr 1.0, 10 epochs, batch 256, all four implementations
    python compare.py --epochs 1 --max-batches 20 --impls torch-scratch,flax-scratch

Every implementation starts from the same canonical weights (common/init.py) and sees the same
batches in the same order (common/data.py); the report says how far they drift apart.
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

from common import report
from common.data import DataError, load_fashion_mnist
from common.harness import (IMPLEMENTATIONS, MODES, evaluate, parse_implementations, select_devices,
                            start_run, train_epoch, train_epoch_compiled)
from common.init import PARAMETER_NAMES, canonical_weights

TRAIN_EXAMPLES = 60000  # Fashion-MNIST's training set


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train LeNet with batch normalization on Fashion-MNIST in PyTorch and Flax NNX, "
                    "from scratch and built in, from one initialisation on one batch order, and "
                    "report accuracy, speed and how far the four drift apart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="examples per batch")
    parser.add_argument("--lr", type=positive_float, default=1.0, help="SGD learning rate")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the initial weights and of each epoch's batch order")
    parser.add_argument("--impls", type=implementation_list, default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated implementations, from: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of weights and computation")
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
                        help="folder for results.json and plots (default: a new folder under runs/)")
    parser.add_argument("--max-batches", type=positive_int, default=None,
                        help="train on at most N batches per epoch (for quick runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = parser.add_argument_group("benchmark (instead of the experiment)")
    bench.add_argument("--bench", action="store_true",
                       help="measure steady-state training throughput of each implementation in both modes "
                            "against the chapter's own loop (DataLoader with 4 workers), in float32; "
                            "prints a table and writes bench.json into --out")
    bench.add_argument("--bench-batches", type=positive_int, default=50, help="batches per timed repeat")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats; the median is reported")
    args = parser.parse_args(argv)
    # Batch norm in training cannot normalise a batch of one example (all four refuse it).
    if args.batch_size == 1:
        parser.error("--batch-size 1: batch norm in training needs at least 2 examples per batch")
    training_batches = -(-TRAIN_EXAMPLES // args.batch_size)
    if args.max_batches is None or args.max_batches >= training_batches:
        if TRAIN_EXAMPLES % args.batch_size == 1:
            parser.error(f"--batch-size {args.batch_size} leaves a last training batch of one example, "
                         "which batch norm cannot normalise; choose another batch size")
    full_batches = TRAIN_EXAMPLES // args.batch_size
    if args.bench and args.bench_batches >= full_batches:
        parser.error(f"--bench-batches {args.bench_batches}: an epoch has only {full_batches} full batches "
                     f"of {args.batch_size}; choose fewer")
    largest = float(np.finfo(args.dtype).max)
    if args.lr > largest:
        parser.error(f"--lr {args.lr:g} is beyond the largest {args.dtype} ({largest:.3g})")
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
            "max_abs_test_logit_diff": [float(np.max(np.abs(snapshots[a][e]["logits"] - snapshots[b][e]["logits"])))
                                        for e in epochs],
        })
    return pairs


def run_implementation(name, weights, data, args, device, snapshots):
    """Train one implementation for all epochs; return its entry of results.json."""
    train_images, train_labels, test_images, test_labels = data
    wall_start = time.perf_counter()
    run = start_run(name, weights, args.lr, device, args.mode, train_images, train_labels)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        if args.mode == "compiled":
            outcome = train_epoch_compiled(run, len(train_labels), args.batch_size, args.seed, epoch,
                                           max_batches=args.max_batches, progress=not args.no_progress)
        else:
            outcome = train_epoch(run, train_images, train_labels, args.batch_size, args.seed, epoch,
                                  max_batches=args.max_batches, progress=not args.no_progress)
        if outcome is None:
            print(f"{name}: diverged (loss not finite) at step {run.diverged_at_step}, epoch {epoch}",
                  file=sys.stderr)
            break
        train_loss, train_acc = outcome
        logits, test_acc = evaluate(run, test_images, test_labels, args.batch_size)
        snapshots[name].append({"weights": run.module.export_weights(run.model), "logits": logits})
        epochs.append({"epoch": epoch, "train_loss": float(train_loss), "train_acc": float(train_acc),
                       "test_acc": test_acc, "train_seconds": run.train_seconds})
        if not args.no_progress:
            report.print_epoch(name, epochs[-1])
    final = run.module.export_weights(run.model)
    return {
        "device": run.module.device_description(device),
        "epochs": epochs,
        "examples_per_sec": run.examples_per_sec,
        "compile_seconds": run.compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "diverged_at_step": run.diverged_at_step,
        "first_bn": {"gamma": final["bn1.gamma"].tolist(), "beta": final["bn1.beta"].tolist()},
    }


def main(argv=None):
    args = parse_args(argv)
    dtype = np.dtype(args.dtype)
    try:
        devices = select_devices(args.impls, args.device, dtype, args.tf32)
    except RuntimeError as error:
        sys.exit(f"error: --device cuda: {error}")
    try:
        data = load_fashion_mnist(args.data_dir)
    except DataError as error:
        sys.exit(f"error: {error}")
    os.makedirs(args.out, exist_ok=True)
    if args.bench:
        from common import bench  # noqa: PLC0415 (torchvision is imported only for the benchmark)
        results = bench.benchmark(args, canonical_weights(args.seed, np.float32), data, devices)
        bench.print_table(results)
        print(f"\nwrote {bench.write(results, args.out)}")
        return 0
    report.remove_stale_results(args.out)

    weights = canonical_weights(args.seed, dtype)
    snapshots = {name: [] for name in args.impls}
    runs = {}
    for name in args.impls:
        framework = IMPLEMENTATIONS[name][0]
        runs[name] = run_implementation(name, weights, data, args, devices[framework], snapshots)
    results = {
        "config": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   "dtype": args.dtype, "tf32": args.tf32, "impls": args.impls, "device": args.device,
                   "mode": args.mode, "max_batches": args.max_batches},
        "environment": report.environment(devices),
        "runs": runs,
        "divergence": divergence(snapshots, args.impls),
    }
    report.print_report(results)
    paths = report.write_all(results, args.out)
    print(f"\nwrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: no results.json written")
