"""The canonical checkpoint of a trained LeNet: one file that any of the six implementations loads.

It is framework-neutral: safetensors (no pickle; loaders for NumPy, PyTorch and Flax), holding the
tensors of common/init.py under its names (WEIGHT_NAMES) and in its layout (PyTorch's), the moving
statistics included, with string metadata that says what a reader needs. Each framework writes its
own users' format beside it (impls/<framework>/checkpoint.py) and checks what it reads with
`check_tensors`; common/drivers/checkpoints.py reads and writes every format.

Everything here checks before anything uses a file: a tensor missing or extra, a shape or dtype that
does not fit, another model's file, a truncated file or one that is no checkpoint at all is a
CheckpointError of one line, naming the tensor and what was expected.
"""

import os
import struct

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from common.files import atomic_path
from common.init import BATCH_NORM_LAYERS, LAYERS, VALUES_PER_EXAMPLE, WEIGHT_NAMES

SUFFIX = ".safetensors"
MODEL = "LeNet with batch normalization (d2l), batchnorm-compare"  # metadata["model"]
DTYPES = ("float32", "float64")
# safetensors' names of the types it stores -> numpy's.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
RUNNING_VARIANCES = ("biased", "unbiased")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into LeNet; the message is one line naming what and why."""


def first_line(error):
    """A library's error in one line, for a CheckpointError that quotes it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
    """A canonical file -> (its weights, its metadata); CheckpointError if it is not a whole one of
    this LeNet."""
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
    return weights, metadata


def check_metadata(path, metadata):
    """The metadata, if what a run reads back from it is well formed: the steps the model trained (a
    count that --init goes on from), its running variance's convention and its eps."""
    steps, running_var, eps = metadata.get("steps"), metadata.get("running_var"), metadata.get("eps")
    if eps is not None:
        try:
            positive = float(eps) > 0
        except ValueError:
            positive = False
        if not positive:
            raise CheckpointError(f"{path}: metadata 'eps' is {eps!r}, expected a positive number")
    if steps is not None and not steps.isdigit():
        raise CheckpointError(f"{path}: metadata 'steps' is {steps!r}, expected a whole number")
    if running_var is not None and running_var not in RUNNING_VARIANCES:
        raise CheckpointError(f"{path}: metadata 'running_var' is {running_var!r}, expected one of "
                              f"{', '.join(RUNNING_VARIANCES)}")
    return metadata


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
