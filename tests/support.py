"""Driving the six implementations from tests, through the interface the driving code uses
(impls/interface.py)."""

import numpy as np

from common.data import to_layout, train_batches
from common.drivers.harness import start_run
from impls.registry import IMPLEMENTATIONS, training_of
from common.init import MOVING_STAT_NAMES, PARAMETER_NAMES

NAMES = tuple(IMPLEMENTATIONS)


def build(name, weights, compute_dtype=None):
    """(train module, model, device) for one implementation, on the CPU, holding `weights`;
    compute_dtype 'bfloat16': mixed precision (build_lenet's)."""
    module = training_of(name)
    device = module.select_device("cpu", weights["conv1.weight"].dtype)
    return module, module.build_lenet(weights, IMPLEMENTATIONS[name][1], device, compute_dtype=compute_dtype), device


def inputs(module, device, images, labels, dtype):
    return module.to_device(to_layout(images, module.LAYOUT), labels, device, dtype)


def predict(name, weights, images):
    """Inference-mode logits of implementation `name` holding `weights`, for NCHW images (numpy)."""
    module, model, device = build(name, weights)
    model.eval()
    X, _ = inputs(module, device, images, np.zeros(len(images), np.int64), weights["conv1.weight"].dtype)
    return module.to_numpy(module.predict(model, X))


def trajectory(name, weights, train_images, train_labels, steps, batch_size=256, seed=0, lr=1.0, compute_dtype=None):
    """Train `steps` SGD steps on the shared batch order: (per-step losses, weights after every step,
    (module, model, optimizer))."""
    module, model, device = build(name, weights, compute_dtype)
    dtype = weights["conv1.weight"].dtype
    optimizer = module.make_optimizer(model, lr)
    train_step = module.bound_train_step(model, optimizer)  # training mode, as compare.py's loop trains
    losses, snapshots = [], []
    batches = train_batches(train_images, train_labels, batch_size, seed, epoch=1, layout=module.LAYOUT)
    for _, (images, labels) in zip(range(steps), batches):
        X, y = module.to_device(images, labels, device, dtype)
        loss_sum, _ = train_step(X, y)
        losses.append(float(loss_sum) / len(labels))
        snapshots.append(module.export_weights(model))
    return np.array(losses), snapshots, (module, model, optimizer)


def data_parallel_trajectory(name, weights, workers, bn_stats, train_images, train_labels, steps, batch_size,
                             checkpoints=()):
    """trajectory() over data-parallel workers, each on its shard of the same global batches: per-step
    loss of the global batch, and worker 0's weights after each checkpoint step and the last."""
    run = start_run(name, weights, 1.0, workers.device, workers=workers, bn_stats=bn_stats)
    losses, snapshots = [], {}
    batches = train_batches(train_images, train_labels, batch_size, seed=0, epoch=1, layout=run.module.LAYOUT)
    for step, (images, labels) in zip(range(1, steps + 1), batches):
        loss_sum, _ = run.data_parallel.step(images, labels)
        losses.append(float(loss_sum) / len(labels))
        if step in checkpoints or step == steps:
            run.data_parallel.finish()
            snapshots[step] = run.module.export_weights(run.model)
    return np.array(losses), snapshots


def max_difference(a, b, keys):
    """The largest abs difference over the named arrays of two canonical weight dicts, and where."""
    return max((float(np.max(np.abs(a[key].astype(np.float64) - b[key]))), key) for key in keys)


__all__ = ["NAMES", "PARAMETER_NAMES", "MOVING_STAT_NAMES", "build", "inputs", "predict", "trajectory",
           "data_parallel_trajectory", "max_difference"]
