"""LeNet with batch normalization, as in the chapter, Flax Linen edition. Mirror: impls/flax/lenet.py (NNX).

`build_lenet` loads the canonical weights (common/init.py); `export_weights` gives them back.
The canonical layout is PyTorch's; Linen's kernels are laid out as NNX's, so both convert with
the NNX edition's functions, here and nowhere else.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from common.init import BATCH_NORM_LAYERS, WEIGHT_NAMES
from impls.flax.cpu_conv import conv_general_dilated
from impls.flax.lenet import check_batch, from_flax_layout, to_flax_layout
from impls.linen.batch_norm import EPS, MOMENTUM, BatchNorm, builtin_momentum

NORMS = ("scratch", "builtin")
# A LeNet for inference whose batch norm was folded into the layers before it (deploy.py).
FOLDED = "folded"


def make_batch_norm(norm, num_features, num_dims, dtype, param_dtype, axis_name=None, eps=EPS):
    """The chapter's scratch layer, or Flax's own set to the same momentum, eps and variance; with
    a mesh axis, each normalises over the batches of all its workers together. FOLDED: what is
    left of a layer folded into the one before it, its input as it is."""
    if norm == FOLDED:
        return Folded()
    if norm == "scratch":
        # Its output comes in its input's type, its statistics in param_dtype's (see batch_norm).
        return BatchNorm(num_features, num_dims, axis_name=axis_name, param_dtype=param_dtype, eps=eps)
    # The same class synchronises its statistics when given the axis (lax.pmean over it). It reads
    # the number of features from its input, where NNX's is told them.
    # linen.BatchNorm computes E[x^2] - E[x]^2 by default; the two-pass variance matches the others.
    # Its batch statistics are float32 whatever `dtype`, its output's type, and its scale, bias and
    # running statistics stay in theirs (force_float32_reductions), where NNX's needs telling.
    return nn.BatchNorm(momentum=builtin_momentum(MOMENTUM), epsilon=eps, use_fast_variance=False,
                        axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)


class Folded(nn.Module):
    """A batch-norm layer folded into the layer before it: its input, as it is, whatever the mode."""

    def __call__(self, X, use_running_average=None, *, mask=None):
        return X


class LeNet(nn.Module):
    norm: str = "scratch"
    # Mixed precision, Flax's way: each layer stores its parameters in param_dtype and computes
    # in `dtype` (bfloat16), casting its inputs and parameters itself. None: in their own type.
    param_dtype: Any = jnp.float32
    dtype: Any = None
    axis_name: str | None = None
    eps: float = EPS

    def setup(self):
        if self.norm not in (*NORMS, FOLDED):
            raise ValueError(f"norm must be one of {(*NORMS, FOLDED)}, got {self.norm!r}")
        bn_options = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name, eps=self.eps)
        layer_dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # XLA's convolution; on the CPU, rewritten into one that XLA:CPU computes faster (cpu_conv.py).
        conv_options = dict(padding="VALID", conv_general_dilated=conv_general_dilated, **layer_dtypes)
        self.conv1 = nn.Conv(6, kernel_size=(5, 5), **conv_options)
        self.bn1 = make_batch_norm(self.norm, 6, num_dims=4, **bn_options)
        self.conv2 = nn.Conv(16, kernel_size=(5, 5), **conv_options)
        self.bn2 = make_batch_norm(self.norm, 16, num_dims=4, **bn_options)
        self.fc1 = nn.Dense(120, **layer_dtypes)
        self.bn3 = make_batch_norm(self.norm, 120, num_dims=2, **bn_options)
        self.fc2 = nn.Dense(84, **layer_dtypes)
        self.bn4 = make_batch_norm(self.norm, 84, num_dims=2, **bn_options)
        self.fc3 = nn.Dense(10, **layer_dtypes)

    def __call__(self, X, train, mask=None):
        """X: images (batch, 28, 28, 1), NHWC. Returns logits (batch, 10), in the parameters' dtype. train: batch statistics
        (apply with mutable=["batch_stats"]) or the moving ones; Linen takes the mode with each call.
        mask (batch,): True for an example, False for a row that pads a worker's shard (see batch_norm)."""
        check_batch(X, training=train)
        # The mask broadcast against each layer's output, as batch norm's statistics read it.
        image_mask, feature_mask = (None, None) if mask is None else (mask.reshape(-1, 1, 1, 1), mask.reshape(-1, 1))
        inference = not train
        X = nn.avg_pool(nn.sigmoid(self.bn1(self.conv1(X), inference, mask=image_mask)), (2, 2), strides=(2, 2))
        X = nn.avg_pool(nn.sigmoid(self.bn2(self.conv2(X), inference, mask=image_mask)), (2, 2), strides=(2, 2))
        # NHWC flattens in (height, width, channel) order; build_lenet permuted fc1's
        # inputs so that it reads them as PyTorch's fc1 reads (channel, height, width).
        X = X.reshape(X.shape[0], -1)
        X = nn.sigmoid(self.bn3(self.fc1(X), inference, mask=feature_mask))
        X = nn.sigmoid(self.bn4(self.fc2(X), inference, mask=feature_mask))
        # The loss and the comparisons of logits in the parameters' type, under mixed precision too.
        return self.fc3(X).astype(self.param_dtype)


@dataclass
class Model:
    """A Linen module and the variables it is applied to ({'params': ..., 'batch_stats': ...}),
    kept together with the mode: what an NNX or PyTorch model is on its own, and what compare.py
    and the tests drive. The training step itself works on a train state (train.py)."""
    module: LeNet
    variables: dict
    training: bool = True

    @property
    def norm(self):
        return self.module.norm

    def train(self):
        self.training = True

    def eval(self):
        self.training = False


# Canonical field name -> (collection, name of the variable), for each kind of batch-norm layer.
BATCH_NORM_FIELDS = {
    "scratch": {"gamma": ("params", "gamma"), "beta": ("params", "beta"),
                "moving_mean": ("batch_stats", "moving_mean"), "moving_var": ("batch_stats", "moving_var")},
    "builtin": {"gamma": ("params", "scale"), "beta": ("params", "bias"),
                "moving_mean": ("batch_stats", "mean"), "moving_var": ("batch_stats", "var")},
}


def variable_path(norm, canonical_key):
    """'bn1.gamma' -> ('params', 'bn1', 'scale') for linen.BatchNorm; 'conv1.weight' -> ('params', 'conv1', 'kernel')."""
    layer, field = canonical_key.split(".")
    if layer in BATCH_NORM_LAYERS:
        collection, field = BATCH_NORM_FIELDS[norm][field]
        return collection, layer, field
    return "params", layer, "kernel" if field == "weight" else field


def build_lenet(weights, norm="scratch", device=None, axis_name=None, compute_dtype=None, eps=EPS):
    """A LeNet holding the canonical weights, in their dtype, on `device` (default: JAX's); with a
    mesh axis, its batch norm normalises over the batches of all the axis' workers together.
    compute_dtype 'bfloat16': mixed precision (Flax's dtype); None: everything in the weights' dtype."""
    param_dtype = weights["conv1.weight"].dtype
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    module = LeNet(norm, param_dtype=param_dtype, dtype=dtype, axis_name=axis_name, eps=eps)
    # Linen users call module.init(key, example) for random variables; these are the canonical ones.
    variables = {"params": {}, "batch_stats": {}}
    for key in WEIGHT_NAMES:
        collection, layer, field = variable_path(norm, key)
        value = np.ascontiguousarray(to_flax_layout(key, weights[key]))
        # linen.BatchNorm creates its running statistics in float32 whatever param_dtype says; the
        # canonical ones come in the run's dtype, and a float64 run needs float64.
        variables[collection].setdefault(layer, {})[field] = jax.device_put(value, device)
    return Model(module, variables)


def export_weights(model):
    """The model's parameters and moving statistics in the canonical layout, as numpy arrays."""
    weights = {}
    for key in WEIGHT_NAMES:
        collection, layer, field = variable_path(model.norm, key)
        weights[key] = np.ascontiguousarray(from_flax_layout(key, np.asarray(model.variables[collection][layer][field])))
    return weights
