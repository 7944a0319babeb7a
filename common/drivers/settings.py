"""What a run is asked to do: one typed object, built from the command line by compare.py and
passed down. Nothing below compare.py reads argparse's Namespace.

`checked` completes a Settings (the output folder, the workers torchrun started) and refuses what
cannot run, each refusal one line naming the setting and what to choose instead.
"""

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from common.data import EXPECTED, TRAIN_LABELS, num_batches, shard_bounds
from impls.registry import IMPLEMENTATIONS, runs_on

TRAIN_EXAMPLES = EXPECTED[TRAIN_LABELS][0]  # Fashion-MNIST's training set: 60,000
COMMANDS = ("train", "evaluate", "bench", "page", "export")
MODES = ("eager", "compiled")
# --dtype: (the parameters', optimizer's and batch-norm statistics' dtype, the computation's where it
# differs). bf16-mixed: convolutions and matrix products in bfloat16 (torch.autocast; Flax's dtype).
PRECISIONS = {"float32": ("float32", None), "float64": ("float64", None), "bf16-mixed": ("float32", "bfloat16")}


class SettingsError(ValueError):
    """Settings that cannot run together; the message names the setting and the way out."""


@dataclass(frozen=True)
class Settings:
    command: str = "train"             # what to do: one of COMMANDS
    impls: tuple = tuple(IMPLEMENTATIONS)
    out: str | None = None             # the output folder; checked() makes one under runs/
    data_dir: str | None = None        # where Fashion-MNIST is; None: common.data searches
    device: str = "auto"               # 'auto', 'cpu' or 'cuda'
    tf32: bool = False                 # TF32 in float32 convolutions and products on NVIDIA GPUs
    progress: bool = True              # progress bars
    batch_size: int = 256
    # train (and bench)
    epochs: int = 10
    lr: float = 1.0
    seed: int = 0                      # of the canonical weights and of each epoch's batch order
    dtype: str = "float32"             # one of PRECISIONS
    mode: str = "eager"                # one of MODES
    max_batches: int | None = None     # at most this many batches per epoch
    data_parallel: int = 1             # workers sharing each batch
    bn_stats: str = "global"           # several workers: 'global' or 'local' batch-norm statistics
    worker_timeout: int = 300          # seconds a worker waits for the others
    init: str | None = None            # a checkpoint to start from instead of the canonical weights
    running_var: str = "keep"          # with init: 'keep' the moving variances or 'convert' them
    # evaluate, export
    paths: tuple = ()                  # checkpoints: files, or folders of them
    # bench
    batches: int = 50                  # batches per timed repeat
    # bench, and export's throughput
    repeats: int = 5                   # timed repeats; the median is reported

    @property
    def parameter_dtype(self):
        """The parameters', optimizer's and batch-norm statistics' dtype, numpy's."""
        return np.dtype(PRECISIONS[self.dtype][0])

    @property
    def compute_dtype(self):
        """The convolutions' and products' type where it differs from the parameters' (mixed precision)."""
        return PRECISIONS[self.dtype][1]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def trained_batch_sizes(settings):
    """The sizes of the batches an epoch trains on: the full ones, and a partial last one if reached."""
    size = settings.batch_size
    sizes = {size} if size <= TRAIN_EXAMPLES else set()
    if TRAIN_EXAMPLES % size and (settings.max_batches is None
                                  or settings.max_batches >= num_batches(TRAIN_EXAMPLES, size)):
        sizes.add(TRAIN_EXAMPLES % size)
    return sorted(sizes)


def checked(settings, launch=None):
    """The settings completed: the output folder (a new one under runs/ unless given) and, under
    torchrun (launch: common.launch's LaunchEnvironment), its workers. SettingsError if they cannot run."""
    if settings.command in ("train", "bench"):
        check_training(settings)
    if settings.command == "bench":
        full_batches = TRAIN_EXAMPLES // settings.batch_size
        if settings.batches >= full_batches:
            raise SettingsError(f"--batches {settings.batches}: an epoch has only {full_batches} full batches of "
                                f"{settings.batch_size}; choose fewer")
        if launch is not None:
            raise SettingsError("bench starts the workers it measures: run it without torchrun (--data-parallel N)")
    if launch is not None:
        if settings.command != "train":
            raise SettingsError(f"{settings.command} runs in one process: start it without torchrun")
        if settings.data_parallel not in (1, launch.world_size):
            raise SettingsError(f"--data-parallel {settings.data_parallel}: torchrun started {launch.world_size} "
                                "workers")
        settings = settings.replace(data_parallel=launch.world_size)
    if settings.data_parallel > 1:
        check_workers(settings)
    if settings.running_var != "keep" and settings.init is None:
        raise SettingsError(f"--running-var {settings.running_var} converts the moving variances of --init FILE: "
                            "give one")
    if settings.out is None:
        settings = settings.replace(out=os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    return settings


def check_training(settings):
    # Batch norm in training cannot normalise a batch of one example (all six refuse it).
    if settings.batch_size == 1:
        raise SettingsError("--batch-size 1: batch norm in training needs at least 2 examples per batch")
    if min(trained_batch_sizes(settings)) == 1:
        raise SettingsError(f"--batch-size {settings.batch_size} leaves a last training batch of one example, "
                            "which batch norm cannot normalise; choose another batch size")
    largest = float(np.finfo(settings.parameter_dtype).max)
    if settings.lr > largest:
        raise SettingsError(f"--lr {settings.lr:g} is beyond the largest {settings.dtype} ({largest:.3g})")


def check_workers(settings):
    if settings.mode == "compiled":
        raise SettingsError("--data-parallel trains the eager step (one step per batch); leave out --mode compiled")
    # The smallest shard of the smallest batch: shard_bounds cuts shards that differ by one at most.
    smallest = min(batch // settings.data_parallel for batch in trained_batch_sizes(settings))
    if smallest < 2:
        raise SettingsError(f"--data-parallel {settings.data_parallel} with --batch-size {settings.batch_size}: a "
                            f"worker's shard would hold {smallest} example(s), and batch norm in training needs at "
                            "least 2 per worker; use fewer workers or larger batches")


def not_run_reason(name, settings, devices):
    """Why implementation `name` cannot train data-parallel as asked, here (devices: {framework:
    device}); None if it can."""
    framework, norm = IMPLEMENTATIONS[name]
    if settings.data_parallel == 1 or norm != "builtin" or settings.bn_stats != "global":
        return None
    workers = settings.data_parallel
    if runs_on(framework, "torch") and devices[framework].type == "cpu":
        return ("nn.SyncBatchNorm trains only on GPUs (its statistics kernels have no CPU implementation, "
                "pytorch/pytorch#78078); --bn-stats local runs it on the CPU")
    uneven = [batch for batch in trained_batch_sizes(settings) if batch % workers]
    if runs_on(framework, "jax") and uneven:
        sizes = sorted({stop - start for start, stop in shard_bounds(uneven[0], workers)}, reverse=True)
        layer = "nnx.BatchNorm" if framework == "flax" else "linen.BatchNorm"
        return (f"{layer}(axis_name=...) averages the workers' means without weighing them by their "
                f"shard sizes (google/flax#2417), and batches of {uneven[0]} over {workers} workers make shards of "
                f"{' and '.join(map(str, sizes))}; choose batch sizes divisible by {workers}, or --bn-stats local")
    return None
