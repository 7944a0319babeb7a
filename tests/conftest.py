import jax
import pytest

from common.data import load_fashion_mnist
from impls.flax.data_parallel import use_host_devices

# The parity suite compares float64 results; JAX computes in float32 unless 64-bit mode is on.
# Every float32 test passes its dtype explicitly, so turning it on does not change those.
jax.config.update("jax_enable_x64", True)
# Four CPU devices, for the data-parallel tests' meshes (before JAX starts its CPU backend); the
# other tests run on the first, as compare.py does.
use_host_devices(4)


def pytest_collection_modifyitems(items):
    """Every test that drives chromium (through the `browser` fixture) is marked `browser`, so that
    a machine without chromium and selenium can leave those out by name: `-m "not browser"`."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real data (CI installs dataset-fashion-mnist): a failure here means it is missing."""
    return load_fashion_mnist()


@pytest.fixture(scope="session")
def first_batch(fashion_mnist):
    """The first training batch of epoch 1 (seed 0, batch 256) in the shared order, NCHW."""
    from common.data import train_batches
    train_images, train_labels, _, _ = fashion_mnist
    return next(train_batches(train_images, train_labels, 256, seed=0, epoch=1))


def _trajectories(fashion_mnist, dtype, steps, batch_size):
    from common.init import canonical_weights
    from tests.support import NAMES, trajectory
    train_images, train_labels, _, _ = fashion_mnist
    weights = canonical_weights(0, dtype)
    return {name: trajectory(name, weights, train_images, train_labels, steps, batch_size) for name in NAMES}


TRAJECTORY_STEPS = 100
# float32 trains on the chapter's batches of 256. float64 on batches of 64: XLA:CPU's float64
# convolutions make a JAX step at 256 four times as costly, and six implementations take 100 each.
FLOAT32_TRAJECTORY_BATCH, FLOAT64_TRAJECTORY_BATCH = 256, 64


@pytest.fixture(scope="session")
def trajectories_float64(fashion_mnist):
    """Every implementation trained TRAJECTORY_STEPS steps (lr 1.0, the shared batch order) in
    float64: {name: (losses, weights per step, (module, model, device))}."""
    import numpy as np
    return _trajectories(fashion_mnist, np.float64, TRAJECTORY_STEPS, FLOAT64_TRAJECTORY_BATCH)


@pytest.fixture(scope="session")
def trajectories_float32(fashion_mnist):
    import numpy as np
    return _trajectories(fashion_mnist, np.float32, TRAJECTORY_STEPS, FLOAT32_TRAJECTORY_BATCH)
