"""One harness for both frameworks: device choice, synchronised timing, compile-time accounting.

Timing rules, the same for every implementation:
- a clock is read only after the device has finished the work queued before it
  (`synchronize`: torch.cuda.synchronize, jax.block_until_ready);
- the first training step for each new batch shape is where JAX traces and compiles
  (and where PyTorch warms up its allocator and kernels): it is timed apart, reported as
  compile/warm-up time, and left out of the throughput;
- throughput is counted as the chapter's train_ch6 counts it: training examples over training
  time, evaluation excluded.
"""

import importlib
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from common.data import num_batches, test_batches, train_batch_indices, train_batches

IMPLEMENTATIONS = {
    "torch-scratch": ("pytorch", "scratch"),
    "torch-builtin": ("pytorch", "builtin"),
    "flax-scratch": ("flax", "scratch"),
    "flax-builtin": ("flax", "builtin"),
}
MODES = ("eager", "compiled")
# How often the progress bar reads the running loss back from the device (a synchronisation).
PROGRESS_EVERY = 20


def parse_implementations(text):
    """'torch-scratch,flax-builtin' -> a list of names; an unknown name lists the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown or not names:
        raise ValueError(f"unknown implementation {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(IMPLEMENTATIONS)} (comma-separated)")
    return list(dict.fromkeys(names))


def framework_module(framework):
    """impls/<framework>/train.py: 'pytorch' or 'flax'."""
    return importlib.import_module(f"impls.{framework}.train")


def framework_of(name):
    """The impls/<framework>/train.py module that implements `name`."""
    return framework_module(IMPLEMENTATIONS[name][0])


def select_devices(names, request, dtype, tf32=False):
    """{framework: device} for every framework the implementations need; RuntimeError if unusable.
    Each framework's float32 arithmetic on GPUs is set alike: TF32 allowed or not (allow_tf32)."""
    devices = {}
    for name in names:
        module = framework_of(name)
        if module.FRAMEWORK not in devices:
            devices[module.FRAMEWORK] = module.select_device(request, dtype)
            module.allow_tf32(tf32)
    return devices


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

    @property
    def examples_per_sec(self):
        # Every step may have been a compiling one (a single batch per epoch): then there is no figure.
        return self.timed_examples / self.train_seconds if self.timed_examples and self.train_seconds > 0 else float("nan")


def start_run(name, weights, lr, device, mode="eager", train_images=None, train_labels=None):
    """A model from the canonical weights; in compiled mode also the training set on the device."""
    module = framework_of(name)
    _, norm = IMPLEMENTATIONS[name]
    dtype = weights["conv1.weight"].dtype
    model = module.build_lenet(weights, norm, device)
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
    """Train one epoch on the shared batch order; returns (mean loss, accuracy) or None if diverged."""
    module, model = run.module, run.model
    total = num_batches(len(labels), batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    # Training mode, and the step bound to the model for this epoch (evaluations come between).
    train_step = module.bound_train_step(model, run.optimizer)
    step_losses, step_correct, seen_examples = [], [], 0
    losses_read = []  # the step losses read back so far, for the progress bar
    bar = tqdm(total=total, desc=f"{run.name} epoch {epoch}", unit="batch", leave=False, disable=not progress)
    module.synchronize(model)
    epoch_start = time.perf_counter()
    epoch_compile_seconds = 0.0
    for step, (batch_images, batch_labels) in enumerate(
            train_batches(images, labels, batch_size, seed, epoch, layout=module.LAYOUT)):
        if step == total:
            break
        X, y = module.to_device(batch_images, batch_labels, run.device, run.dtype)
        if X.shape in run.seen_shapes:
            loss_sum, correct = train_step(X, y)
            run.timed_examples += len(batch_labels)
        else:
            # A new shape: JAX traces and compiles here. Time it apart.
            module.synchronize(model)
            compile_start = time.perf_counter()
            loss_sum, correct = train_step(X, y)
            module.synchronize(model)
            epoch_compile_seconds += time.perf_counter() - compile_start
            run.seen_shapes.add(X.shape)
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
    module.synchronize(model)
    run.train_seconds += time.perf_counter() - epoch_start - epoch_compile_seconds
    run.compile_seconds += epoch_compile_seconds
    bar.close()
    # The last step read every loss back (step + 1 == total): no need to read them again.
    return epoch_outcome(run, np.array(losses_read), step_correct, seen_examples)


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
    """Inference-mode logits for the whole test set (numpy) and the accuracy."""
    module, model = run.module, run.model
    model.eval()
    logits = np.concatenate([
        module.to_numpy(module.predict(model, module.to_device(batch_images, batch_labels, run.device, run.dtype)[0]))
        for batch_images, batch_labels in test_batches(images, labels, batch_size, layout=module.LAYOUT)])
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return logits, accuracy
