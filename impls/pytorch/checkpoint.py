"""Checkpoints, PyTorch edition: the model's state_dict saved with torch.save, as PyTorch users keep
a model, beside the canonical file that every framework reads (common/checkpoint.py). Mirror:
impls/flax/checkpoint.py.

`save_native` writes the framework's own format; `load_native` reads it back (this project's, or a
user's own of this LeNet) into the canonical weights, through lenet.py's names and layout: the
conversions are written there, once.
"""

import os
import zipfile

import torch

from common.checkpoint import CheckpointError, canonical_shapes, check_tensors, first_line
from common.files import atomic_path
from common.init import BATCH_NORM_LAYERS, WEIGHT_NAMES
from impls.pytorch.lenet import BATCH_NORM_FIELDS, LeNet, export_weights, state_dict_key

NATIVE_SUFFIX = ".pt"
# Which variance the moving variance averages, by batch norm. nn.BatchNorm keeps the unbiased one,
# n/(n-1) times the biased variance it normalises the batch with; the chapter's layer the biased one.
RUNNING_VARIANCE = {"scratch": "biased", "builtin": "unbiased"}


def save_native(model, path, metadata):
    """The model's state_dict at `path`, whole or not at all, as torch.save writes it; loads with
    load_state_dict. Returns the path."""
    state = model.state_dict()
    if model.norm == "builtin" and "steps" in metadata:
        # nn.BatchNorm counts the batches it trained on; a model built from canonical weights starts
        # at 0, so the count comes from the metadata (Hugging Face's converters leave it at 0).
        for layer in BATCH_NORM_LAYERS:
            state[f"{layer}.num_batches_tracked"] = torch.tensor(int(metadata["steps"]))
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return os.fspath(path)


def is_native(path):
    """Whether `path` is a file that torch.save wrote (a zip archive) or that is named as one."""
    return os.path.isfile(path) and (path.endswith((".pt", ".pth")) or zipfile.is_zipfile(path))


def norm_of(names):
    """Which batch norm the stored names are of: nn.BatchNorm's where a running_mean is there (under
    any layer's name: a user's own LeNet may name its layers otherwise)."""
    moving_mean = BATCH_NORM_FIELDS["builtin"]["moving_mean"]
    return "builtin" if any(name.endswith(f".{moving_mean}") for name in names) else "scratch"


def native_shapes(norm):
    """{key of the state_dict: shape} of this LeNet with `norm`'s batch norm, in forward order."""
    shapes = canonical_shapes()
    return {state_dict_key(key, norm): shapes[key] for key in WEIGHT_NAMES}


def load_native(path):
    """A state_dict of this LeNet -> (canonical weights, what the file tells of itself)."""
    try:
        # weights_only: tensors and containers, never arbitrary pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises several kinds (zip, pickle, EOF) for what it cannot read
        raise CheckpointError(f"{path}: torch.load(weights_only=True) cannot read it "
                              f"({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: torch.load gave a {type(state).__name__}, expected a state_dict "
                              "(a dict of tensors, as model.state_dict() returns)")
    norm = norm_of(state)
    # nn.BatchNorm's batch counters: a user's own state_dict may hold them or not.
    counters = [f"{layer}.num_batches_tracked" for layer in BATCH_NORM_LAYERS] if norm == "builtin" else []
    optional = [name for name in state if name.endswith(".num_batches_tracked")] if norm == "builtin" else []
    check_tensors(f"{path} (state_dict)", {name: (tuple(value.shape), str(value.dtype).removeprefix("torch."))
                                           for name, value in state.items()}, native_shapes(norm), optional)
    dtype = state[next(iter(native_shapes(norm)))].dtype
    model = LeNet(norm, dtype=dtype)
    model.load_state_dict({**{counter: torch.tensor(0) for counter in counters}, **state})
    metadata = {"framework": "pytorch", "norm": norm, "running_var": RUNNING_VARIANCE[norm]}
    if counters and all(counter in state for counter in counters):
        metadata["steps"] = str(int(state[counters[0]]))
    return export_weights(model), metadata
