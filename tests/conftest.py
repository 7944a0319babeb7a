import os
from pathlib import Path

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


# pytest-xdist's workers (pyproject.toml: -n auto) take whole groups of tests: a module, with its
# module-scoped fixtures (tests/test_compare.py's shared runs), or all the modules that share the
# trained trajectories below, which one worker then computes once. Groups go to the workers in this
# order, then the rest in file order: the two longest first, one to each worker (measured on the
# 2-core machine, 2026-12-04, alone: about 120 s for test_compare, 210 s for the trajectories'
# modules), and test_stopping (120 s) after two mid-sized ones: xdist hands each worker its second
# group at once, and test_stopping there would wait behind test_compare.
TESTS = Path(__file__).resolve().parent
SHARING_TRAJECTORIES = {path.name for path in TESTS.glob("test_*.py") if "trajectories_float" in path.read_text()}
LONGEST_FIRST = ("test_compare.py", "trajectories", "test_options.py", "test_fast_paths.py", "test_stopping.py")
MAX_WORKERS = 4  # -n auto on a larger machine: more workers than long groups would only wait and hold memory


def group_of(path):
    name = Path(path).name
    return "trajectories" if name in SHARING_TRAJECTORIES else name


def pytest_xdist_auto_num_workers(config):
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


# The cores this process's tests have: its share among pytest-xdist's workers (all of them without).
CORES_PER_WORKER = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # PyTorch's threads, a worker's share: its OpenMP threads spin while they wait, and more of them
    # than cores, across the workers, slowed the whole suite (2-core machine, two workers,
    # 2026-12-04: 8:06 with PyTorch's default of a thread per core in each, 7:24 with one).
    import torch
    torch.set_num_threads(CORES_PER_WORKER)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by scope, a scope being group_of's group (its built-in --dist loadgroup
    reads a node id that pytest 9.2 no longer lets it change). _split_scope is the method xdist's
    own scope schedulers override: not a public interface, pinned by pyproject's pytest-xdist range."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return group_of(nodeid.split("::", 1)[0])

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items):
    """Every test that drives chromium (through the `browser` fixture) is marked `browser`, so that
    a machine without chromium and selenium can leave those out by name: `-m "not browser"`. The
    tests go in LONGEST_FIRST's order of their groups."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)

    def rank(item):
        group = group_of(item.path)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the tests of a group keep their order


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
