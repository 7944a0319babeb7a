"""The fast paths (--mode compiled) are bound by the same parity as the eager paths: the same
batches, gathered on the device from the shared indices, give the same per-step losses and the
same weights, partial last batch included."""

import numpy as np
import pytest

from common.data import train_batch_indices
from common.drivers.harness import start_run
from impls.registry import training_of
from common.init import WEIGHT_NAMES, canonical_weights
from tests.support import NAMES, max_difference, trajectory
from tests.tolerances import FLOAT64_TRAJECTORY, assert_close

EXAMPLES = 600  # 2 full batches of 256 and a partial one of 88
BATCH_SIZE = 256


@pytest.fixture(scope="module")
def subset(fashion_mnist):
    train_images, train_labels, _, _ = fashion_mnist
    return train_images[:EXAMPLES], train_labels[:EXAMPLES]


def compiled_epoch(name, weights, images, labels, use_scan=None):
    """One epoch through the FastTrainer: per-step losses and the final weights."""
    # Each framework's best device, as compare.py picks it: on a GPU machine the compiled epoch
    # (PyTorch's captured CUDA graph, JAX's scan) is held to the eager epoch on the CPU.
    module = training_of(name)
    device = module.select_device("auto", weights["conv1.weight"].dtype)
    run = start_run(name, weights, 1.0, device, "compiled", images, labels)
    if use_scan is not None:
        trainer = run.trainer
        run.trainer = type(trainer)(run.model, run.optimizer, trainer.images, trainer.labels, use_scan=use_scan)
    batches = train_batch_indices(len(labels), BATCH_SIZE, seed=0, epoch=1)
    run.model.train()
    loss_sums = []
    for group in (np.stack(batches[:-1]), batches[-1][None]):
        step_losses, _, _, _ = run.trainer.train(group)
        loss_sums.append(np.asarray(run.module.to_numpy(step_losses), np.float64))
    run.trainer.finish()
    sizes = np.array([len(indices) for indices in batches])
    return np.concatenate(loss_sums) / sizes, run.module.export_weights(run.model)


@pytest.fixture(scope="module")
def eager_epoch(subset):
    """name -> the eager path's epoch (per-step losses, weights after each step), computed once per
    implementation and shared by its fast paths."""
    epochs = {}

    def epoch(name):
        if name not in epochs:
            epochs[name] = trajectory(name, canonical_weights(0, np.float64), *subset, steps=3)[:2]
        return epochs[name]
    return epoch


# Flax runs one lax.scan per epoch on GPUs and a compiled step per batch on the CPU. Each Flax API
# has one FastTrainer for both norms, and the scan's body is the per-batch step: here, each API's
# per-batch step with one norm and its scan with the other (NNX's and Linen's differ by the state
# they carry); on a GPU machine the default is the scan, so all four run it.
CASES = [(name, None) for name in NAMES if name not in ("flax-builtin", "linen-scratch")] + [
    ("flax-builtin", True), ("linen-scratch", True)]


@pytest.mark.parametrize("name, use_scan", CASES, ids=[f"{name}{'-scan' if scan else ''}" for name, scan in CASES])
def test_compiled_epoch_equals_eager_epoch(name, use_scan, subset, eager_epoch):
    images, labels = subset
    weights = canonical_weights(0, np.float64)
    eager_losses, eager_weights = eager_epoch(name)
    compiled_losses, compiled_weights = compiled_epoch(name, weights, images, labels, use_scan)
    assert len(compiled_losses) == 3
    assert_close("per-step loss, compiled vs eager", f"{name} compiled", compiled_losses, f"{name} eager",
                 eager_losses, FLOAT64_TRAJECTORY)
    difference, key = max_difference(compiled_weights, eager_weights[-1], WEIGHT_NAMES)
    assert difference <= FLOAT64_TRAJECTORY, (
        f"{key} after one epoch: {name} compiled vs eager differ by {difference:.3e}")
    # The fast path really trained: the weights moved.
    assert max_difference(compiled_weights, weights, WEIGHT_NAMES)[0] > 1e-2
