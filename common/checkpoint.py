"""Checkpoints of a trained LeNet that any of the six implementations loads.

The canonical file is framework-neutral: safetensors (no pickle; loaders for NumPy, PyTorch and
Flax), holding the tensors of common/init.py under its names (WEIGHT_NAMES) and in its layout
(PyTorch's), the moving statistics included, with string metadata that says what a reader needs
(metadata_for). Each framework writes its own users' format beside it and reads it back into the
canonical weights (impls/<framework>/checkpoint.py: a state_dict; an Orbax folder of NNX's state or
of Linen's variables), through the conversions of its lenet.py.

`read` takes any of them -- the canonical file, a state_dict of this LeNet (the project's or a
user's own), an Orbax folder of NNX or Linen -- and checks it before anything uses it: a tensor
missing or extra, a shape or dtype that does not fit, another model's file, a truncated file or
one that is no checkpoint at all is a CheckpointError of one line, naming the tensor and what was
expected.
"""

import importlib
import os
import shutil
import struct
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from common.files import atomic_path
from common.harness import IMPLEMENTATIONS, framework_module
from common.init import BATCH_NORM_LAYERS, LAYERS, VALUES_PER_EXAMPLE, WEIGHT_NAMES

FOLDER = "checkpoints"  # <out>/checkpoints/: every trained implementation, each in every format
SUFFIX = ".safetensors"
MODEL = "LeNet with batch normalization (d2l), batchnorm-compare"  # metadata["model"]
DTYPES = ("float32", "float64")
# safetensors' names of the types it stores -> numpy's.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
RUNNING_VARIANCES = ("biased", "unbiased")
FRAMEWORKS = tuple(dict.fromkeys(framework for framework, _ in IMPLEMENTATIONS.values()))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into LeNet; the message is one line naming what and why."""


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
    def label(self):
        """Its name in a table: the implementation a canonical file names, else the file's name."""
        if self.format == "safetensors" and self.metadata.get("implementation"):
            return self.metadata["implementation"]
        return os.path.basename(os.path.normpath(self.path))


def first_line(error):
    """A library's error in one line, for a CheckpointError that quotes it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def framework_checkpoint(framework):
    """impls/<framework>/checkpoint.py: the framework's own format."""
    return importlib.import_module(f"impls.{framework}.checkpoint")


def canonical_shapes():
    """{name: shape} of every tensor of a canonical checkpoint, in WEIGHT_NAMES' order."""
    shapes = {}
    for layer, kind, shape in LAYERS:
        if kind == "batch_norm":
            shapes.update({f"{layer}.{field}": shape for field in ("gamma", "beta", "moving_mean", "moving_var")})
        else:
            shapes.update({f"{layer}.weight": shape, f"{layer}.bias": shape[:1]})
    return {name: shapes[name] for name in WEIGHT_NAMES}


def preview(names, count=3):
    names = list(names)
    return ", ".join(repr(name) for name in names[:count]) + (", ..." if len(names) > count else "")


def check_tensors(where, found, expected, optional=()):
    """Raise a CheckpointError naming the first tensor that does not fit. found: {name: (shape,
    dtype name)} as stored; expected: {name: shape} in the format's own names and layout, in the
    order of the forward pass; optional: names that may be there or not (nn.BatchNorm's counter)."""
    stored = {name: (tuple(shape), dtype) for name, (shape, dtype) in found.items() if name not in optional}
    if not set(stored) & set(expected):
        shapes = [shape for shape, _ in stored.values()]
        if shapes == [tuple(shape) for shape in expected.values()]:
            # LeNet's tensors in LeNet's order under other names: a LeNet written otherwise (nn.Sequential).
            first = next(iter(stored))
            raise CheckpointError(f"{where}: LeNet's tensors under other names ({first!r} where LeNet has "
                                  f"{next(iter(expected))!r}): rename them to LeNet's ({preview(expected)})")
        raise CheckpointError(f"{where}: not a checkpoint of this LeNet: none of its {len(stored)} tensors "
                              f"({preview(stored)}) is one of LeNet's ({preview(expected)})")
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{where}: tensor {name!r} is missing: expected shape {tuple(shape)} "
                                  f"(LeNet has {len(expected)} tensors, moving statistics included)")
    for name, (shape, _) in stored.items():
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} (shape {shape}): not one of LeNet's "
                                  f"{len(expected)} ({preview(expected)})")
    first_name = next(iter(expected))
    first_dtype = stored[first_name][1]
    for name, shape in expected.items():
        stored_shape, dtype = stored[name]
        if stored_shape != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {stored_shape}, expected {tuple(shape)}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} is {dtype}, expected float32 or float64")
        if dtype != first_dtype:
            raise CheckpointError(f"{where}: tensor {name!r} is {dtype}, expected {first_dtype} as "
                                  f"{first_name!r} (one dtype for the whole model)")


def metadata_for(name, weights, steps, batch_size, lr, seed, test_acc, precision=None, init="canonical"):
    """The canonical file's metadata for a model trained in implementation `name`, as strings:
    where and how it was trained, and the conventions a reader needs to use its moving statistics."""
    framework, norm = IMPLEMENTATIONS[name]
    batch_norm = importlib.import_module(f"impls.{framework}.batch_norm")
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
    return framework_checkpoint(framework).RUNNING_VARIANCE[norm]


def save(weights, path, metadata):
    """The canonical file at `path`: every tensor of WEIGHT_NAMES and the metadata, whole or not at
    all (common.files). Returns the path."""
    check_tensors(path, {name: (value.shape, value.dtype.name) for name, value in weights.items()},
                  canonical_shapes())
    # Written here rather than by safetensors' save_file, which makes files only their owner may read.
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(safetensors_bytes({name: np.ascontiguousarray(weights[name]) for name in WEIGHT_NAMES},
                                     metadata={key: str(value) for key, value in metadata.items()}))
    return os.fspath(path)


def is_safetensors(path):
    """Whether the file starts as safetensors does: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as file:
        start = file.read(9)
    return len(start) == 9 and start[8:9] == b"{" and struct.unpack("<Q", start[:8])[0] < os.path.getsize(path)


def load(path):
    """A canonical file -> Checkpoint; CheckpointError if it is not a whole one of this LeNet."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as file:
            metadata = dict(file.metadata() or {})
            if metadata.get("model", MODEL) != MODEL:
                raise CheckpointError(f"{path}: a checkpoint of another model: its metadata says "
                                      f"model {metadata['model']!r}, expected {MODEL!r}")
            found = {}
            for name in file.keys():
                tensor = file.get_slice(name)
                dtype = tensor.get_dtype()
                found[name] = (tuple(tensor.get_shape()), SAFETENSORS_DTYPES.get(dtype, dtype))
            check_tensors(path, found, canonical_shapes())
            weights = {name: file.get_tensor(name) for name in WEIGHT_NAMES}
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a whole safetensors file ({first_line(error)})") from None
    return Checkpoint(path, weights, metadata, "safetensors")


def read(path):
    """Any checkpoint of this LeNet -> Checkpoint: the canonical file, a PyTorch state_dict, an Orbax
    folder of NNX or Linen (each framework's checkpoint.py says which is its own)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isfile(path) and (path.endswith(SUFFIX) or is_safetensors(path)):
        return check_metadata(load(path))
    for framework in FRAMEWORKS:
        module = framework_checkpoint(framework)
        if module.is_native(path):
            weights, metadata = module.load_native(path)
            return check_metadata(Checkpoint(path, weights, metadata, framework))
    raise CheckpointError(f"{path}: not a checkpoint: expected a {SUFFIX} file, a PyTorch state_dict (torch.save) "
                          "or an Orbax checkpoint folder of NNX or Linen")


def check_metadata(checkpoint):
    """The checkpoint, if what its metadata says that a run reads back is well formed: the steps it
    trained (a count that --init goes on from) and its running variance's convention."""
    steps, running_var = checkpoint.metadata.get("steps"), checkpoint.metadata.get("running_var")
    if steps is not None and not steps.isdigit():
        raise CheckpointError(f"{checkpoint.path}: metadata 'steps' is {steps!r}, expected a whole number")
    if running_var is not None and running_var not in RUNNING_VARIANCES:
        raise CheckpointError(f"{checkpoint.path}: metadata 'running_var' is {running_var!r}, expected one of "
                              f"{', '.join(RUNNING_VARIANCES)}")
    return checkpoint


def checkpoint_paths(path):
    """A checkpoint, or a folder of them: a run's checkpoints/ folder (or the run's folder that holds
    it) gives its canonical files, one per implementation, in IMPLEMENTATIONS' order."""
    path = os.fspath(path)
    if not os.path.isdir(path) or any(framework_checkpoint(framework).is_native(path) for framework in FRAMEWORKS):
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


def cast(weights, dtype):
    """The weights in `dtype` (a float32 checkpoint in a float64 run, or the reverse)."""
    return {name: value.astype(dtype) for name, value in weights.items()}


def convert_running_variance(weights, stored, wanted, batch_size):
    """The moving variances rescaled from the `stored` convention ('biased' or 'unbiased') to the
    `wanted` one: times n/(n-1) to unbiased, (n-1)/n to biased, n being the values per channel in a
    full training batch of batch_size (VALUES_PER_EXAMPLE). Unchanged where the two agree."""
    if stored not in RUNNING_VARIANCES:
        raise CheckpointError(f"the checkpoint does not say which running variance it keeps (metadata "
                              f"'running_var': {stored!r}, expected one of {', '.join(RUNNING_VARIANCES)})")
    if stored == wanted:
        return weights
    converted = dict(weights)
    for layer in BATCH_NORM_LAYERS:
        n = batch_size * VALUES_PER_EXAMPLE[layer]
        factor = n / (n - 1) if wanted == "unbiased" else (n - 1) / n
        key = f"{layer}.moving_var"
        converted[key] = (weights[key] * factor).astype(weights[key].dtype)
    return converted


def write(folder, name, weights, metadata):
    """Implementation `name`'s trained weights into `folder`: the canonical file, and its framework's
    own format beside it (a model built from the weights saves as that framework's users save one).
    Returns the paths written."""
    framework, norm = IMPLEMENTATIONS[name]
    os.makedirs(folder, exist_ok=True)
    paths = [save(weights, os.path.join(folder, name + SUFFIX), metadata)]
    train = framework_module(framework)
    model = train.build_lenet(weights, norm, train.select_device("cpu", weights[WEIGHT_NAMES[0]].dtype))
    native = framework_checkpoint(framework)
    paths.append(native.save_native(model, os.path.join(folder, name + native.NATIVE_SUFFIX), metadata))
    return paths


def remove_stale(out):
    """An earlier run's checkpoints in `out` must not pass for this run's."""
    folder = os.path.join(out, FOLDER)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
