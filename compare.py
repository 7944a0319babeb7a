"""The chapter's experiment -- LeNet with batch normalization on Fashion-MNIST -- six ways, and what
to do with the models it trains.

    python compare.py                       # train: lr 1.0, 10 epochs, batch 256, all six implementations
    python compare.py train --epochs 1 --max-batches 20 --impls torch-scratch,flax-scratch
    python compare.py train --data-parallel 2   # each batch shared by 2 workers, batch norm over all of it
    torchrun --nproc-per-node 2 compare.py  # the same, each process started by torchrun
    python compare.py evaluate runs/X       # each trained model of a run, evaluated in each implementation
    python compare.py train --init runs/X/checkpoints/torch-builtin.pt   # train on from a checkpoint
    python compare.py bench                 # training throughput against the chapter's own loop
    python compare.py page                  # report.html's source view alone: the six side by side
    python compare.py export runs/X         # each trained model folded, exported, run by ONNX Runtime

This file is the command line alone: its flags become a Settings (common/drivers/settings.py), which
common/drivers/commands.py runs. SIGINT and SIGTERM stop any command in one line, with exit status
130 or 143, leaving nothing half-written and no process behind (common/drivers/stopping.py).
"""

import argparse
import dataclasses
import math
import os
import sys

from common.drivers.settings import COMMANDS, MODES, PRECISIONS, Settings, SettingsError, checked
from common.drivers.stopping import Stopped, stops_cleanly
from common.launch import DataParallelError, launch_environment
from impls.registry import IMPLEMENTATIONS, parse_implementations

DESCRIPTIONS = {
    "train": "Train LeNet with batch normalization on Fashion-MNIST in PyTorch, Flax NNX and Flax Linen, from "
             "scratch and built in, from one initialisation on one batch order, and report accuracy, speed and "
             "how far they drift apart; every trained model is kept in <out>/checkpoints/. What compare.py does "
             "without a command.",
    "evaluate": "Train nothing: load each checkpoint (files, or a run's checkpoints/ folder) into each "
                "implementation and evaluate it on the test set, in its own dtype: test accuracy and the largest "
                "logit difference from the implementation it was trained in.",
    "bench": "Measure steady-state training throughput of each implementation in both modes against the "
             "chapter's own loop (DataLoader with 4 workers), in float32; print a table and write bench.json "
             "and report.html.",
    "page": "Write report.html's source view alone (the mirrored implementations side by side, linked to the "
            "README's tables of differences); no training, no data set.",
    "export": "Deploy each checkpoint: in each framework, batch norm folded into the layer before it, the "
              "inference exported with a dynamic batch (torch.export, jax.export, ONNX from PyTorch), each "
              "artefact loaded back in its own runtime (ONNX Runtime for ONNX) and evaluated on the test set: test "
              "accuracy and the largest logit difference from the checkpoint's own implementation; and each "
              "artefact's inference throughput at batch 1, 256 and 10,000. Needs pip install -e '.[deploy]'.",
}
CHECKPOINT_PATHS = ("checkpoints: .safetensors files, PyTorch state_dicts, Orbax folders, or a run's folder or its "
                    "checkpoints/ folder")
# Flags of the time before commands: what they are now, said in one line.
RENAMED = {
    "--evaluate": "the evaluate command: python compare.py evaluate PATH...",
    "--bench": "the bench command: python compare.py bench",
    "--side-by-side": "the page command: python compare.py page",
    "--bench-batches": "bench's --batches: python compare.py bench --batches N",
}


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
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text!r}")
    return value


def implementation_list(text):
    try:
        return tuple(parse_implementations(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_common_flags(parser, batch_size_help="examples per batch"):
    parser.add_argument("--impls", type=implementation_list, default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated implementations, from: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--batch-size", type=positive_int, default=256, help=batch_size_help)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a CUDA GPU for each framework that sees one, else the CPU")
    parser.add_argument("--tf32", action="store_true",
                        help="on NVIDIA GPUs, let PyTorch and JAX round float32 convolutions and matrix "
                             "products to TensorFloat-32 (faster, less exact); by default both compute "
                             "IEEE float32 (their own defaults differ: PyTorch uses TF32 in convolutions "
                             "only, JAX in both)")
    add_data_and_output_flags(parser)


def add_data_and_output_flags(parser):
    """What every command that reads Fashion-MNIST takes: where the data is, where to write, and
    whether to show progress bars."""
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the four Fashion-MNIST files (.gz or not); default: search "
                             "$FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist, the user cache, "
                             "then download")
    add_out_flag(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_out_flag(parser):
    parser.add_argument("--out", default=None,
                        help="folder for what the command writes (default: a new folder under runs/); what an "
                             "earlier run left there that it would write is removed first")


MIXED_PRECISION = ("bf16-mixed: float32 parameters, optimizer state and batch-norm statistics, convolutions and "
                   "matrix products in bfloat16 (torch.autocast; Flax's dtype/param_dtype)")


def add_training_flags(parser, dtypes, dtype_help):
    parser.add_argument("--lr", type=positive_float, default=1.0, help="SGD learning rate")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the initial weights and of each epoch's batch order")
    parser.add_argument("--dtype", choices=dtypes, default="float32", help=dtype_help)


def add_parallel_flags(parser):
    parallel = parser.add_argument_group("data parallel")
    parallel.add_argument("--data-parallel", type=positive_int, default=1, metavar="N",
                          help="workers sharing each batch: PyTorch in N processes (torch.distributed, "
                               "DistributedDataParallel), JAX on a mesh of N devices; under torchrun, "
                               "every process it starts (torchrun's WORLD_SIZE)")
    parallel.add_argument("--bn-stats", choices=("global", "local"), default="global",
                          help="with several workers: batch norm over the whole batch (synchronised "
                               "statistics), or over each worker's shard alone")
    parallel.add_argument("--worker-timeout", type=positive_int, default=300, metavar="SECONDS",
                          help="how long a worker waits for the others: at the rendezvous and at every collective")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description="Batch normalization in PyTorch, Flax NNX and Flax Linen, side by side: LeNet on "
                    "Fashion-MNIST, six ways, the same numbers. Without a command, compare.py trains "
                    "(python compare.py is python compare.py train).",
        epilog="Each command's own flags: python compare.py COMMAND --help.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    formatter = argparse.ArgumentDefaultsHelpFormatter

    def command(name, summary):
        return commands.add_parser(name, help=summary, description=DESCRIPTIONS[name], formatter_class=formatter)

    train = command("train", "the chapter's experiment, six ways (the default)")
    add_common_flags(train)
    train.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    add_training_flags(train, tuple(PRECISIONS), f"floating-point type of weights and computation; {MIXED_PRECISION}, "
                       "and every implementation trained again in float32 to measure the drift against")
    train.add_argument("--mode", choices=MODES, default="eager",
                       help="eager: the chapter's way, one step per batch from host memory; compiled: "
                            "the fast paths (the dataset on the device, torch.compile / one jitted "
                            "lax.scan per epoch), on the same batches")
    train.add_argument("--max-batches", type=positive_int, default=None,
                       help="train on at most N batches per epoch (for quick runs)")
    add_parallel_flags(train)
    trained = train.add_argument_group("trained models (every run writes each into <out>/checkpoints/)")
    trained.add_argument("--init", metavar="PATH", default=None,
                         help="start every implementation from this checkpoint instead of the canonical "
                              "initialisation: a .safetensors file of a run's checkpoints/, a PyTorch "
                              "state_dict of this LeNet, or an Orbax folder of NNX or Linen (cast to --dtype)")
    trained.add_argument("--running-var", choices=("keep", "convert"), default="keep",
                         help="with --init: keep the moving variances as stored (each implementation then "
                              "predicts what the checkpoint's did), or convert them to each implementation's "
                              "convention (torch-builtin keeps the unbiased variance, the others the biased) by "
                              "n/(n-1), n the values per channel in a batch of --batch-size")

    evaluate = command("evaluate", "each checkpoint evaluated in each implementation")
    evaluate.add_argument("paths", nargs="+", metavar="PATH", help=CHECKPOINT_PATHS)
    add_common_flags(evaluate, batch_size_help="examples per evaluation batch")

    bench = command("bench", "training throughput against the chapter's loop")
    add_common_flags(bench)
    add_training_flags(bench, ("float32", "bf16-mixed"), f"float32 rows always; {MIXED_PRECISION}: each row again "
                       "in mixed precision, beside its float32 one")
    bench.add_argument("--batches", type=positive_int, default=50, help="batches per timed repeat")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats; the median is reported")
    add_parallel_flags(bench)

    page = command("page", "report.html's source view alone")
    add_out_flag(page)

    export = command("export", "each checkpoint folded, exported and run in every runtime")
    export.add_argument("paths", nargs="+", metavar="PATH", help=CHECKPOINT_PATHS)
    export.add_argument("--batch-size", type=positive_int, default=256, help="examples per evaluation batch")
    export.add_argument("--repeats", type=positive_int, default=5,
                        help="timed repeats of each throughput; the median is reported")
    add_data_and_output_flags(export)
    return parser, commands.choices


def parse_args(argv=None):
    """The command line -> a checked Settings; argparse's usage error (exit status 2) for one that
    cannot run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    for flag, now in RENAMED.items():
        if any(argument == flag or argument.startswith(f"{flag}=") for argument in argv):
            parser.error(f"{flag} is now {now} (python compare.py --help lists the commands)")
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)}")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "train")  # flags alone, or nothing: the chapter's experiment
    arguments = vars(parser.parse_args(argv))
    subparser = subparsers[arguments["command"]]
    names = {field.name for field in dataclasses.fields(Settings)}
    settings = Settings(**{name: value for name, value in arguments.items() if name in names})
    try:
        return checked(settings, launch_environment())
    except (SettingsError, DataParallelError) as error:
        subparser.error(str(error))


def main(argv=None):
    settings = None
    try:
        with stops_cleanly():
            settings = parse_args(argv)
            # Imported here, within the clean stop: the driving code imports PyTorch's and JAX's
            # neighbours (matplotlib, tqdm, the exporters' registry) for a second or two.
            from common.drivers import commands  # noqa: PLC0415
            return commands.run(settings)
    except Stopped as stop:
        status, signum = stop.exit_status, stop.signum
    # Said once the except block has let go of the run's frames, and with them of its progress bars,
    # each closed by now; under torchrun, by worker 0 alone. A progress bar may have left its line
    # unfinished: the message starts its own.
    if os.environ.get("RANK", "0") == "0":
        line_start = "\n" if settings is not None and settings.progress else ""
        print(f"{line_start}stopped by {signum.name}: nothing written", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
