"""Checkpoints in every format: what a run writes into <out>/checkpoints/, and what --init and
evaluate read.

A run writes each trained implementation twice: the canonical file (common/checkpoint.py), with the
metadata a reader needs (metadata_for), and its framework's own users' format beside it
(impls/<framework>/checkpoint.py: a state_dict; an Orbax folder of NNX's state or of Linen's
variables). `read` takes any of them -- the canonical file, a state_dict of this LeNet (the
project's or a user's own), an Orbax folder of NNX or Linen -- into the canonical weights, checked
before anything uses them.
"""

import os
from dataclasses import dataclass

from common.checkpoint import MODEL, SUFFIX, CheckpointError, check_metadata, is_safetensors, load, save
from common.drivers.outputs import CHECKPOINTS as FOLDER
from common.init import WEIGHT_NAMES
from impls import registry
from impls.registry import FRAMEWORKS, IMPLEMENTATIONS


@dataclass
class Checkpoint:
    path: str
    weights: dict   # canonical names and layout, numpy
    metadata: dict  # strings: what the file says of itself, and what its format tells
    format: str     # "safetensors", or the framework whose own format it is

    @property
    def source(self):
        """The implementation it was trained in, where known: where its own predictions are made."""
        if self.metadata.get("implementation") in IMPLEMENTATIONS:
            return self.metadata["implementation"]
        framework, norm = self.metadata.get("framework"), self.metadata.get("norm")
        return next((name for name, its in IMPLEMENTATIONS.items() if its == (framework, norm)), None)

    @property
    def eps(self):
        """The model's batch-norm eps, where the checkpoint says it (this project's do), else None: a
        Python float of each layer, which no state_dict or Flax state carries."""
        return float(self.metadata["eps"]) if "eps" in self.metadata else None

    @property
    def label(self):
        """Its name in a table: the implementation a canonical file names, else the file's name."""
        if self.format == "safetensors" and self.metadata.get("implementation"):
            return self.metadata["implementation"]
        return os.path.basename(os.path.normpath(self.path))


def metadata_for(name, weights, steps, batch_size, lr, seed, test_acc, precision=None, init="canonical"):
    """The canonical file's metadata for a model trained in implementation `name`, as strings:
    where and how it was trained, and the conventions a reader needs to use its moving statistics."""
    framework, norm = IMPLEMENTATIONS[name]
    batch_norm = registry.batch_norm(framework)
    dtype = weights[WEIGHT_NAMES[0]].dtype.name
    return {
        "model": MODEL,
        "layout": "canonical: common/init.py's names, PyTorch's layout (OIHW kernels, (out, in) weights, "
                  "fc1 reading C,H,W)",
        "implementation": name, "framework": framework, "norm": norm, "dtype": dtype,
        "precision": precision or dtype, "steps": str(steps), "batch_size": str(batch_size), "lr": str(lr),
        "seed": str(seed), "test_acc": str(test_acc), "init": init,
        # Which variance the moving variance averages: nn.BatchNorm's is unbiased (n/(n-1) times the
        # batch's), every other implementation's biased. Inference uses it as it is.
        "running_var": running_variance_of(name),
        "momentum": str(batch_norm.MOMENTUM),
        "momentum_convention": "the chapter's: moving = momentum * moving + (1 - momentum) * batch "
                               "(nn.BatchNorm's momentum is 1 - this)",
        "eps": str(batch_norm.EPS),
    }


def running_variance_of(name):
    """'biased' or 'unbiased': which variance implementation `name` keeps as its moving variance."""
    framework, norm = IMPLEMENTATIONS[name]
    return registry.checkpoint(framework).RUNNING_VARIANCE[norm]


def read(path):
    """Any checkpoint of this LeNet -> Checkpoint: the canonical file, a PyTorch state_dict, an Orbax
    folder of NNX or Linen (each framework's checkpoint.py says which is its own)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder{latest_run_beside(path)}")
    if os.path.isfile(path) and (path.endswith(SUFFIX) or is_safetensors(path)):
        weights, metadata = load(path)
        return Checkpoint(path, weights, check_metadata(path, metadata), "safetensors")
    for framework in FRAMEWORKS:
        module = registry.checkpoint(framework)
        if module.is_native(path):
            weights, metadata = module.load_native(path)
            return Checkpoint(path, weights, check_metadata(path, metadata), framework)
    raise CheckpointError(f"{path}: not a checkpoint: expected a {SUFFIX} file, a PyTorch state_dict (torch.save) "
                          "or an Orbax checkpoint folder of NNX or Linen")


def latest_run_beside(path):
    """For a path that does not exist: the newest run beside it that holds checkpoints (runs/X in the
    README's commands stands for a run's folder, named by its date and time), as a hint, or ""."""
    parent = os.path.dirname(os.path.normpath(path)) or os.curdir
    try:
        runs = [entry.path for entry in os.scandir(parent) if os.path.isdir(os.path.join(entry.path, FOLDER))]
    except OSError:
        return ""
    if not runs:
        return ""
    return f" (the newest run there with checkpoints: {max(runs, key=os.path.getmtime)})"


def checkpoint_paths(path):
    """A checkpoint, or a folder of them: a run's checkpoints/ folder (or the run's folder that holds
    it) gives its canonical files, one per implementation, in IMPLEMENTATIONS' order."""
    path = os.fspath(path)
    if not os.path.isdir(path) or any(registry.checkpoint(framework).is_native(path) for framework in FRAMEWORKS):
        return [path]
    if os.path.isdir(os.path.join(path, FOLDER)):
        path = os.path.join(path, FOLDER)
    files = sorted(name for name in os.listdir(path) if name.endswith(SUFFIX))
    if not files:
        raise CheckpointError(f"{path}: a folder without {SUFFIX} checkpoints (compare.py writes them into "
                              f"<out>/{FOLDER}/)")
    order = {name + SUFFIX: index for index, name in enumerate(IMPLEMENTATIONS)}
    return [os.path.join(path, name) for name in sorted(files, key=lambda name: (order.get(name, len(order)), name))]


def read_all(paths):
    """Every checkpoint that `paths` (files or folders) name, each read and checked."""
    return [read(path) for given in paths for path in checkpoint_paths(given)]


def write(folder, name, weights, metadata):
    """Implementation `name`'s trained weights into `folder`: the canonical file, and its framework's
    own format beside it (a model built from the weights saves as that framework's users save one).
    Returns the paths written."""
    framework, norm = IMPLEMENTATIONS[name]
    os.makedirs(folder, exist_ok=True)
    paths = [save(weights, os.path.join(folder, name + SUFFIX), metadata)]
    train = registry.training(framework)
    model = train.build_lenet(weights, norm, train.select_device("cpu", weights[WEIGHT_NAMES[0]].dtype))
    native = registry.checkpoint(framework)
    paths.append(native.save_native(model, os.path.join(folder, name + native.NATIVE_SUFFIX), metadata))
    return paths
