"""Checkpoints, Flax Linen edition: the model's variables ({'params', 'batch_stats'}) saved with Orbax,
the checkpointing library Flax documents, as Linen users keep a model, beside the canonical file that
every framework reads (common/checkpoint.py). Mirror: impls/flax/checkpoint.py (NNX).

`save_native` writes the framework's own format; `load_native` reads it back (this project's, or a
user's own of this LeNet) into the canonical weights, through lenet.py's names and layout: the
conversions are written there, once. Orbax serves both Flax APIs: its functions are the NNX edition's.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from common.checkpoint import check_tensors
from common.init import BATCH_NORM_LAYERS
from impls.flax.checkpoint import is_orbax_folder, orbax_tree_names, read_orbax, save_orbax
from impls.linen.lenet import BATCH_NORM_FIELDS, LeNet, Model, export_weights

NATIVE_SUFFIX = ".orbax"  # a folder
# Which variance the moving variance averages, by batch norm. linen.BatchNorm keeps the biased one it
# normalises the batch with, as the chapter's layer does (nn.BatchNorm: the unbiased one).
RUNNING_VARIANCE = {"scratch": "biased", "builtin": "biased"}


def save_native(model, path, metadata):
    """The model's variables at `path`, an Orbax checkpoint folder, the metadata in its custom
    metadata; restores as Flax's guide restores them (checkpointer.restore, then module.apply).
    Returns the path."""
    # Host copies: a checkpoint saved on a GPU restores on a machine without one.
    return save_orbax(jax.tree.map(np.asarray, model.variables), path, metadata)


def is_native(path):
    """Whether `path` is an Orbax checkpoint folder of a Linen model: its collections, 'params'
    among them, at the top of the tree (NNX's state has the layers there)."""
    return is_orbax_folder(path) and "params" in (orbax_tree_names(path) or ())


def norm_of(names):
    """Which batch norm the stored names are of: linen.BatchNorm's where its mean is there."""
    collection, moving_mean = BATCH_NORM_FIELDS["builtin"]["moving_mean"]
    return "builtin" if f"{collection}/{BATCH_NORM_LAYERS[0]}/{moving_mean}" in names else "scratch"


def native_shapes(norm):
    """{'collection/layer/variable': shape} of this LeNet with `norm`'s batch norm: read off the
    module itself, its variables made as shapes alone (module.init under jax.eval_shape)."""
    variables = jax.eval_shape(lambda: LeNet(norm).init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False))
    return {name: value.shape for name, value in flatten_dict(variables, sep="/").items()}


def load_native(path):
    """An Orbax checkpoint of this LeNet's Linen variables -> (canonical weights, what the folder
    tells of itself)."""
    tree, stored = read_orbax(path)
    found = flatten_dict(tree, sep="/")
    norm = norm_of(found)
    check_tensors(f"{path} (Linen variables)", {name: (value.shape, value.dtype.name) for name, value in found.items()},
                  native_shapes(norm))
    # Linen's way back: the variables are the model, beside a module of the same structure.
    dtype = next(iter(found.values())).dtype
    # The folder's own metadata, where it has some, says where the model trained (a canonical file
    # moved into this format keeps its source); the format alone says only how it is stored.
    metadata = {"framework": "linen", "norm": norm, "running_var": RUNNING_VARIANCE[norm], **stored}
    return export_weights(Model(LeNet(norm, param_dtype=dtype), tree)), metadata
