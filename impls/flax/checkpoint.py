"""Checkpoints, Flax NNX edition: the model's state (nnx.state) saved with Orbax, the checkpointing
library Flax documents, as NNX users keep a model, beside the canonical file that every framework
reads (common/checkpoint.py). Mirror: impls/pytorch/checkpoint.py.

`save_native` writes the framework's own format; `load_native` reads it back (this project's, or a
user's own of this LeNet) into the canonical weights, through lenet.py's names and layout: the
conversions are written there, once.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.traverse_util import flatten_dict

from common.checkpoint import CheckpointError, check_tensors, first_line
from common.init import BATCH_NORM_LAYERS
from impls.flax.lenet import BATCH_NORM_FIELDS, LeNet, export_weights

NATIVE_SUFFIX = ".orbax"  # a folder
# Which variance the moving variance averages, by batch norm. nnx.BatchNorm keeps the biased one it
# normalises the batch with, as the chapter's layer does (nn.BatchNorm: the unbiased one).
RUNNING_VARIANCE = {"scratch": "biased", "builtin": "biased"}


def save_native(model, path, metadata):
    """The model's state at `path`, an Orbax checkpoint folder, the metadata in its custom metadata;
    restores as Flax's guide restores one (nnx.split of a model, checkpointer.restore, nnx.merge).
    Returns the path."""
    # Host copies: a checkpoint saved on a GPU restores on a machine without one.
    return save_orbax(jax.tree.map(np.asarray, nnx.state(model)), path, metadata)


def is_native(path):
    """Whether `path` is an Orbax checkpoint folder of an NNX model: its layers at the top of the tree
    (Linen's variables have 'params' there)."""
    return is_orbax_folder(path) and "params" not in (orbax_tree_names(path) or ())


def norm_of(names):
    """Which batch norm the stored names are of: nnx.BatchNorm's where its mean is there."""
    moving_mean = BATCH_NORM_FIELDS["builtin"]["moving_mean"]
    return "builtin" if f"{BATCH_NORM_LAYERS[0]}/{moving_mean}" in names else "scratch"


def native_shapes(norm):
    """{'layer/variable' of the state: shape} of this LeNet with `norm`'s batch norm: read off the
    model itself, built as shapes alone (nnx.eval_shape)."""
    model = nnx.eval_shape(lambda: LeNet(norm))
    return {name: value.shape for name, value in flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/").items()}


def load_native(path):
    """An Orbax checkpoint of this LeNet's NNX state -> (canonical weights, what the folder tells of
    itself)."""
    tree, stored = read_orbax(path)
    state = pure_dict(tree)
    found = flatten_dict(state, sep="/")
    norm = norm_of(found)
    check_tensors(f"{path} (NNX state)", {name: (value.shape, value.dtype.name) for name, value in found.items()},
                  native_shapes(norm))
    # Flax's way back: the model's structure (nnx.eval_shape), its state replaced by the stored one.
    dtype = next(iter(found.values())).dtype
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: LeNet(norm, param_dtype=dtype)))
    nnx.replace_by_pure_dict(abstract_state, state)
    # The folder's own metadata, where it has some, says where the model trained (a canonical file
    # moved into this format keeps its source); the format alone says only how it is stored.
    metadata = {"framework": "flax", "norm": norm, "running_var": RUNNING_VARIANCE[norm], **stored}
    return export_weights(nnx.merge(graphdef, abstract_state)), metadata


# --- Orbax, for both Flax APIs (impls/linen/checkpoint.py imports these) --------------------------

def checkpointer():
    """Orbax's synchronous checkpointer: save returns once the folder is complete (its default,
    StandardCheckpointer, saves in a background thread, to be waited for). This process alone:
    under jax.distributed, Orbax would otherwise meet every process at a barrier around each save,
    where here worker 0 writes the checkpoints by itself."""
    process = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=process, active_processes={process})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=alone)


def save_orbax(tree, path, metadata):
    """A tree of arrays as an Orbax checkpoint folder at `path`, replacing one there. Orbax writes
    into a temporary folder beside it and renames that when complete: an interrupted save leaves
    only the temporary folder, which read_orbax refuses. Returns the path."""
    checkpointer().save(os.path.abspath(path), args=ocp.args.StandardSave(tree), force=True,
                        custom_metadata={key: str(value) for key, value in metadata.items()})
    return os.fspath(path)


def is_orbax_folder(path):
    """Whether `path` is a folder that Orbax wrote, or began to (its temporary folder)."""
    return os.path.isdir(path) and (ocp.path.step.TMP_DIR_SUFFIX in os.path.basename(os.path.normpath(path)) or any(
        os.path.exists(os.path.join(path, name)) for name in ("_CHECKPOINT_METADATA", "_METADATA")))


def orbax_tree_names(path):
    """The names at the top of an Orbax checkpoint's tree, or None where Orbax cannot read them."""
    try:
        return set(checkpointer().metadata(os.path.abspath(path)).item_metadata.tree)
    except Exception:  # noqa: BLE001 (read_orbax reports what is wrong, in one line)
        return None


def read_orbax(path):
    """(the tree, as numpy arrays; the custom metadata) of an Orbax checkpoint folder."""
    path = os.path.abspath(path)
    if not ocp.path.step.is_checkpoint_finalized(path):
        raise CheckpointError(f"{path}: an Orbax save that did not finish (its temporary folder): nothing to load")
    try:
        metadata = checkpointer().metadata(path)
        # Restored onto the host as numpy arrays, whatever device saved them.
        target = jax.tree.map(lambda array: np.empty(array.shape, array.dtype), metadata.item_metadata.tree)
        tree = checkpointer().restore(path, args=ocp.args.StandardRestore(target))
    except Exception as error:  # noqa: BLE001 (Orbax raises many kinds for a folder it cannot read)
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({first_line(error)})") from None
    return tree, dict(metadata.custom_metadata or {})


def pure_dict(tree):
    """The state as nnx.to_pure_dict gives it: nnx.state saves each variable as {'value': array}."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {key: pure_dict(value) for key, value in tree.items()}
    return tree

