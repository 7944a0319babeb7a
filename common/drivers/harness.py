"""The training loop and its clocks, the same for every implementation: compare.py's experiment,
the benchmark and the tests drive each framework through it.

Timing rules, the same for every implementation:
- a clock is read only after the device has finished the work queued before it
  (`synchronize`: torch.cuda.synchronize, jax.block_until_ready);
- the first training step for each new batch shape is where JAX traces and compiles
  (and where PyTorch warms up its allocator and kernels): it is timed apart, reported as
  compile/warm-up time, and left out of the throughput;
- throughput is counted as the chapter's train_ch6 counts it: training examples over training
  time, evaluation excluded.
"""

import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from common.data import DataError, load_fashion_mnist, num_batches, test_batches, train_batch_indices, train_batches
from impls import registry
from impls.registry import IMPLEMENTATIONS

# How often the progress bar reads the running loss back from the device (a synchronisation).
PROGRESS_EVERY = 20


def select_devices(names, request, dtype, tf32=False):
    """{framework: device} for every framework the implementations need; RuntimeError if unusable.
    Each framework's float32 arithmetic on GPUs is set alike: TF32 allowed or not (allow_tf32)."""
    devices = {}
    for name in names:
        framework = IMPLEMENTATIONS[name].framework
        if framework not in devices:
            module = registry.training(framework)
            devices[framework] = module.select_device(request, dtype)
            module.allow_tf32(tf32)
    return devices


def devices_or_exit(names, settings, dtype):
    """select_devices for a run's settings; a device that cannot be had ends the run in one line."""
    try:
        return select_devices(names, settings.device, dtype, settings.tf32)
    except RuntimeError as error:
        sys.exit(f"error: --device {settings.device}: {error}")


def data_or_exit(settings):
    """Fashion-MNIST, as load_fashion_mnist finds it; where it cannot, the run ends in one line saying why."""
    try:
        return load_fashion_mnist(settings.data_dir)
    except DataError as error:
        sys.exit(f"error: {error}")


@dataclass
class Run:
    """One implementation being trained: its model, optimizer and the clocks' totals."""
    name: str
    module: object
    device: object
    dtype: np.dtype
    model: object
    optimizer: object
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    timed_examples: int = 0
    seen_shapes: set = field(default_factory=set)
    diverged_at_step: int | None = None
    steps_done: int = 0
    trainer: object = None  # the fast path's FastTrainer, in --mode compiled
    data_parallel: object = None  # the DataParallelTrainer, when several workers train

    @property
    def reports(self):
        """Whether this process evaluates and reports: always, but for a data-parallel run's
        processes other than the first."""
        return self.data_parallel is None or self.data_parallel.workers.process_index == 0

    def synchronize(self):
        if self.data_parallel is not None:
            self.data_parallel.synchronize()
        else:
            self.module.synchronize(self.model)

    @property
    def examples_per_sec(self):
        # Every step may have been a compiling one (a single batch per epoch): then there is no figure.
        measured = self.timed_examples and self.train_seconds > 0
        return self.timed_examples / self.train_seconds if measured else float("nan")


def start_run(name, weights, lr, device, mode="eager", train_images=None, train_labels=None, workers=None,
              bn_stats="global", compute_dtype=None):
    """A model from the canonical weights; in compiled mode also the training set on the device.
    With `workers` (data parallel), each worker's replica, trained on its shards of the batches;
    `device` is then this process's first worker's device. compute_dtype: see settings.PRECISIONS."""
    framework, norm = IMPLEMENTATIONS[name]
    module = registry.training(framework)
    dtype = weights["conv1.weight"].dtype
    if workers is not None:
        parallel = registry.data_parallel(framework)
        model = parallel.build_lenet(weights, norm, workers, bn_stats, compute_dtype)
        run = Run(name, module, workers.device, dtype, model, module.make_optimizer(model, lr))
        run.data_parallel = parallel.DataParallelTrainer(model, run.optimizer, workers)
        return run
    model = module.build_lenet(weights, norm, device, compute_dtype=compute_dtype)
    run = Run(name, module, device, dtype, model, module.make_optimizer(model, lr))
    if mode == "compiled":
        images, labels = module.put_dataset(train_images, train_labels, device, dtype)
        run.trainer = module.FastTrainer(model, run.optimizer, images, labels)
    return run


def first_non_finite(losses):
    """Index of the first loss that is NaN or infinite, or None."""
    bad = np.flatnonzero(~np.isfinite(losses))
    return int(bad[0]) if bad.size else None


def train_epoch(run, images, labels, batch_size, seed, epoch, max_batches=None, progress=True):
    """Train one epoch on the shared batch order; returns (mean loss, accuracy) or None if diverged.
    Data parallel: each worker trains on its shard of every batch; the figures are the whole batches'."""
    module = run.module
    total = num_batches(len(labels), batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    train_step = run.data_parallel.step if run.data_parallel is not None else host_batch_step(run)
    step_losses, step_correct, seen_examples = [], [], 0
    losses_read = []  # the step losses read back so far, for the progress bar
    bar = tqdm(total=total, desc=f"{run.name} epoch {epoch}", unit="batch", leave=False,
               disable=not (progress and run.reports))
    run.synchronize()
    epoch_start = time.perf_counter()
    epoch_compile_seconds = 0.0
    for step, (batch_images, batch_labels) in enumerate(
            train_batches(images, labels, batch_size, seed, epoch, layout=module.LAYOUT)):
        if step == total:
            break
        if batch_images.shape in run.seen_shapes:
            loss_sum, correct = train_step(batch_images, batch_labels)
            run.timed_examples += len(batch_labels)
        else:
            # A new shape: JAX traces and compiles here. Time it apart.
            run.synchronize()
            compile_start = time.perf_counter()
            loss_sum, correct = train_step(batch_images, batch_labels)
            run.synchronize()
            epoch_compile_seconds += time.perf_counter() - compile_start
            run.seen_shapes.add(batch_images.shape)
        step_losses.append(loss_sum)
        step_correct.append(correct)
        seen_examples += len(batch_labels)
        bar.update()
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == total:
            # Reading values back synchronises; every PROGRESS_EVERY steps keeps that cheap.
            losses_read.extend(float(value) for value in step_losses[len(losses_read):])
            bad_step = first_non_finite(np.array(losses_read))
            if bad_step is not None:
                run.diverged_at_step = run.steps_done + bad_step + 1
                bar.close()
                return None
            bar.set_postfix(loss=f"{sum(losses_read) / seen_examples:.4f}")
    run.synchronize()
    run.train_seconds += time.perf_counter() - epoch_start - epoch_compile_seconds
    run.compile_seconds += epoch_compile_seconds
    bar.close()
    # The last step read every loss back (step + 1 == total): no need to read them again.
    return epoch_outcome(run, np.array(losses_read), step_correct, seen_examples)


def host_batch_step(run):
    """The chapter's step on one device: each batch from host memory to the device, then
    train_step, bound to the model for this epoch (evaluations come between). Training mode."""
    bound_step = run.module.bound_train_step(run.model, run.optimizer)

    def step(images, labels):
        return bound_step(*run.module.to_device(images, labels, run.device, run.dtype))
    return step


def epoch_outcome(run, losses, step_correct, seen_examples):
    """(mean loss, accuracy) of an epoch from its per-step summed losses (numpy) and per-step
    correct counts (device values); None, with the step recorded, if a loss is not finite."""
    bad_step = first_non_finite(losses)
    if bad_step is not None:
        run.diverged_at_step = run.steps_done + bad_step + 1
        return None
    run.steps_done += len(losses)
    correct = sum(int(np.sum(run.module.to_numpy(value))) for value in step_correct)
    return losses.sum() / seen_examples, correct / seen_examples


def train_epoch_compiled(run, num_examples, batch_size, seed, epoch, max_batches=None, progress=True):
    """The fast path's epoch: the same batches as train_epoch, gathered on the device, full
    batches in one call to the trainer and a partial last batch in another."""
    trainer = run.trainer
    batches = train_batch_indices(num_examples, batch_size, seed, epoch)[:max_batches]
    full = [indices for indices in batches if len(indices) == batch_size]
    groups = ([np.stack(full)] if full else []) + ([batches[-1][None]] if len(batches[-1]) != batch_size else [])
    bar = tqdm(total=len(batches), desc=f"{run.name} epoch {epoch}", unit="batch", leave=False,
               disable=not progress)
    run.model.train()
    trainer.synchronize()
    epoch_start = time.perf_counter()
    compile_seconds, compile_examples, step_losses, step_correct = 0.0, 0, [], []
    for group in groups:
        loss_sums, corrects, group_compile_seconds, group_compile_examples = trainer.train(group)
        compile_seconds += group_compile_seconds
        compile_examples += group_compile_examples
        step_losses.append(loss_sums)
        step_correct.append(corrects)
        bar.update(len(group))
    trainer.synchronize()
    run.train_seconds += time.perf_counter() - epoch_start - compile_seconds
    run.compile_seconds += compile_seconds
    seen_examples = sum(len(indices) for indices in batches)
    run.timed_examples += seen_examples - compile_examples
    bar.close()
    trainer.finish()
    losses = np.concatenate([np.asarray(run.module.to_numpy(value), np.float64) for value in step_losses])
    return epoch_outcome(run, losses, step_correct, seen_examples)


def evaluate(run, images, labels, batch_size):
    """Inference-mode logits for the whole test set (numpy) and the accuracy. Data parallel: worker
    0's model, on its device."""
    module, model = run.module, run.model
    if run.data_parallel is not None:
        run.data_parallel.finish()
    model.eval()
    logits = np.concatenate([
        module.to_numpy(module.predict(model, module.to_device(batch_images, batch_labels, run.device, run.dtype)[0]))
        for batch_images, batch_labels in test_batches(images, labels, batch_size, layout=module.LAYOUT)])
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return logits, accuracy


def print_epoch(name, epoch):
    tqdm.write(f"{name:14s} epoch {epoch['epoch']:2d}: loss {epoch['train_loss']:.3f}, "
               f"train acc {epoch['train_acc']:.3f}, test acc {epoch['test_acc']:.3f}")


def run_implementation(name, weights, data, settings, device, workers=None):
    """Train one implementation for all epochs, evaluating after each (compare.py's experiment).

    settings: common.drivers.settings.Settings (epochs, batch_size, lr, seed, dtype, mode, max_batches,
    progress, bn_stats).
    Returns (its entry of results.json, its snapshots: weights and test logits after each epoch); in a
    data-parallel run, in the process that reports only, and (None, None) in the others."""
    train_images, train_labels, test_images, test_labels = data
    wall_start = time.perf_counter()
    run = start_run(name, weights, settings.lr, device, settings.mode, train_images, train_labels, workers,
                    settings.bn_stats, settings.compute_dtype)
    progress = settings.progress and run.reports
    epochs, snapshots = [], []
    for epoch in range(1, settings.epochs + 1):
        if settings.mode == "compiled":
            outcome = train_epoch_compiled(run, len(train_labels), settings.batch_size, settings.seed, epoch,
                                           max_batches=settings.max_batches, progress=progress)
        else:
            outcome = train_epoch(run, train_images, train_labels, settings.batch_size, settings.seed, epoch,
                                  max_batches=settings.max_batches, progress=progress)
        if outcome is None:
            if run.reports:
                print(f"{name}: diverged (loss not finite) at step {run.diverged_at_step}, epoch {epoch}",
                      file=sys.stderr)
            break
        if not run.reports:
            continue
        train_loss, train_acc = outcome
        logits, test_acc = evaluate(run, test_images, test_labels, settings.batch_size)
        snapshots.append({"weights": run.module.export_weights(run.model), "logits": logits})
        epochs.append({"epoch": epoch, "train_loss": float(train_loss), "train_acc": float(train_acc),
                       "test_acc": test_acc, "train_seconds": run.train_seconds})
        if progress:
            print_epoch(name, epochs[-1])
    if not run.reports:
        return None, None
    if run.data_parallel is not None:
        run.data_parallel.finish()
    final = run.module.export_weights(run.model)
    entry = {
        "device": run.module.device_description(run.device),
        "epochs": epochs,
        "examples_per_sec": run.examples_per_sec,
        "compile_seconds": run.compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "diverged_at_step": run.diverged_at_step,
        "first_bn": {"gamma": final["bn1.gamma"].tolist(), "beta": final["bn1.beta"].tolist()},
    }
    if workers is not None:
        entry["data_parallel"] = {"workers": workers.count, "bn_stats": settings.bn_stats,
                                  "engine": workers.description, "devices": workers.devices}
    return entry, snapshots
