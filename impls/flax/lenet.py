"""LeNet with batch normalization, as in the chapter, Flax NNX edition. Mirror: impls/pytorch/lenet.py.

`build_lenet` loads the canonical weights (common/init.py); `export_weights` gives them back.
The canonical layout is PyTorch's, so both convert, here and nowhere else.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.init import BATCH_NORM_LAYERS, WEIGHT_NAMES
from impls.flax.batch_norm import EPS, MOMENTUM, BatchNorm, builtin_momentum
from impls.flax.cpu_conv import conv_general_dilated

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
    # The same class synchronises its statistics when given the axis (lax.pmean over it).
    # nnx.BatchNorm computes E[x^2] - E[x]^2 by default; the two-pass variance matches the others.
    # Its batch statistics are float32 whatever `dtype`, its output's type; promote_input_only keeps
    # its scale, bias and running statistics in theirs too.
    return nnx.BatchNorm(num_features, momentum=builtin_momentum(MOMENTUM), epsilon=eps, use_fast_variance=False,
                         axis_name=axis_name, dtype=dtype, param_dtype=param_dtype,
                         promote_dtype=promote_input_only, rngs=nnx.Rngs(0))


class Folded(nnx.Module):
    """A batch-norm layer folded into the layer before it: its input, as it is. It keeps the attribute
    that model.train() and .eval() set, since LeNet reads the mode off its first batch-norm layer
    (PyTorch's LeNet reads it off the model: nn.Identity needs none)."""

    def __init__(self):
        self.use_running_average = True

    def __call__(self, X, *, mask=None):
        return X


def promote_input_only(arrays, *, dtype=None, inexact=True):
    """nnx.BatchNorm's promote_dtype: the input in the computation's type, its running statistics,
    scale and bias left in their own (float32 under mixed precision), as PyTorch and linen.BatchNorm
    use theirs. Flax's default (since flax 0.12.1) casts all five to `dtype`: in bfloat16, scale and
    bias would be rounded to 8 significant bits at every use, and the running statistics in inference."""
    x, *variables = arrays
    return (x if dtype is None else jnp.asarray(x, dtype), *variables)



def check_batch(X, training):
    """One example cannot be normalised over the batch: its features have no variance.

    PyTorch's nn.BatchNorm1d raises; Flax's built-ins and the scratch code would divide by
    sqrt(0 + eps) without a word. All six implementations raise, here, with one message.
    """
    if training and X.shape[0] < 2:
        raise ValueError(f"training needs at least 2 examples per batch for batch norm, got shape {tuple(X.shape)}")


class LeNet(nnx.Module):
    def __init__(self, norm="scratch", param_dtype=jnp.float32, dtype=None, axis_name=None, eps=EPS):
        if norm not in (*NORMS, FOLDED):
            raise ValueError(f"norm must be one of {(*NORMS, FOLDED)}, got {norm!r}")
        self.norm = norm
        # Mixed precision, Flax's way: each layer stores its parameters in param_dtype and computes
        # in `dtype` (bfloat16), casting its inputs and parameters itself. None: in their own type.
        self.param_dtype = param_dtype
        bn_options = dict(dtype=dtype, param_dtype=param_dtype, axis_name=axis_name, eps=eps)
        # Flax layers need a random key even though build_lenet overwrites every value.
        rngs = nnx.Rngs(0)
        layer_dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # XLA's convolution; on the CPU, rewritten into one that XLA:CPU computes faster (cpu_conv.py).
        conv_options = dict(padding="VALID", conv_general_dilated=conv_general_dilated, **layer_dtypes)
        self.conv1 = nnx.Conv(1, 6, kernel_size=(5, 5), **conv_options)
        self.bn1 = make_batch_norm(norm, 6, num_dims=4, **bn_options)
        self.conv2 = nnx.Conv(6, 16, kernel_size=(5, 5), **conv_options)
        self.bn2 = make_batch_norm(norm, 16, num_dims=4, **bn_options)
        self.fc1 = nnx.Linear(16 * 4 * 4, 120, **layer_dtypes)
        self.bn3 = make_batch_norm(norm, 120, num_dims=2, **bn_options)
        self.fc2 = nnx.Linear(120, 84, **layer_dtypes)
        self.bn4 = make_batch_norm(norm, 84, num_dims=2, **bn_options)
        self.fc3 = nnx.Linear(84, 10, **layer_dtypes)

    def __call__(self, X, mask=None):
        """X: images (batch, 28, 28, 1), NHWC. Returns logits (batch, 10), in the parameters' dtype.
        mask (batch,): True for an example, False for a row that pads a worker's shard (see batch_norm)."""
        check_batch(X, training=not self.bn1.use_running_average)
        # The mask broadcast against each layer's output, as batch norm's statistics read it.
        image_mask, feature_mask = (None, None) if mask is None else (mask.reshape(-1, 1, 1, 1), mask.reshape(-1, 1))
        X = nnx.avg_pool(nnx.sigmoid(self.bn1(self.conv1(X), mask=image_mask)), window_shape=(2, 2), strides=(2, 2))
        X = nnx.avg_pool(nnx.sigmoid(self.bn2(self.conv2(X), mask=image_mask)), window_shape=(2, 2), strides=(2, 2))
        # NHWC flattens in (height, width, channel) order; build_lenet permuted fc1's
        # inputs so that it reads them as PyTorch's fc1 reads (channel, height, width).
        X = X.reshape(X.shape[0], -1)
        X = nnx.sigmoid(self.bn3(self.fc1(X), mask=feature_mask))
        X = nnx.sigmoid(self.bn4(self.fc2(X), mask=feature_mask))
        # The loss and the comparisons of logits in the parameters' type, under mixed precision too.
        return self.fc3(X).astype(self.param_dtype)


# Canonical field name -> attribute of the layer, for each kind of batch-norm layer.
BATCH_NORM_FIELDS = {
    "scratch": {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_var": "moving_var"},
    "builtin": {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_var": "var"},
}


def model_variable(model, canonical_key):
    """'bn1.gamma' -> model.bn1.scale for nnx.BatchNorm; 'conv1.weight' -> model.conv1.kernel."""
    layer, field = canonical_key.split(".")
    if layer in BATCH_NORM_LAYERS:
        field = BATCH_NORM_FIELDS[model.norm][field]
    elif field == "weight":
        field = "kernel"
    return getattr(getattr(model, layer), field)


def to_flax_layout(canonical_key, value):
    """PyTorch's layout -> Flax's: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if canonical_key == "fc1.weight":
        # Also reorder fc1's inputs from PyTorch's (channel, height, width) flatten order
        # to the (height, width, channel) order in which NHWC features arrive.
        return value.reshape(120, 16, 4, 4).transpose(2, 3, 1, 0).reshape(16 * 4 * 4, 120)
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def from_flax_layout(canonical_key, value):
    """The inverse of to_flax_layout."""
    if canonical_key == "fc1.weight":
        return value.reshape(4, 4, 16, 120).transpose(3, 2, 0, 1).reshape(120, 16 * 4 * 4)
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def build_lenet(weights, norm="scratch", device=None, axis_name=None, compute_dtype=None, eps=EPS):
    """A LeNet holding the canonical weights, in their dtype, on `device` (default: JAX's); with a
    mesh axis, its batch norm normalises over the batches of all the axis' workers together.
    compute_dtype 'bfloat16': mixed precision (Flax's dtype); None: everything in the weights' dtype."""
    param_dtype = weights["conv1.weight"].dtype
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    # The model's structure alone (nnx.eval_shape): the random initial values that Flax's layers
    # would compute, each initialiser a small compiled program, are replaced by the canonical ones.
    model = nnx.eval_shape(lambda: LeNet(norm, param_dtype=param_dtype, dtype=dtype, axis_name=axis_name, eps=eps))
    for key in WEIGHT_NAMES:
        value = np.ascontiguousarray(to_flax_layout(key, weights[key]))
        # set_value replaces the array, dtype included: nnx.BatchNorm creates its running
        # statistics in float32 whatever param_dtype says, and a float64 run needs float64.
        model_variable(model, key).set_value(jax.device_put(value, device))
    return model


def export_weights(model):
    """The model's parameters and moving statistics in the canonical layout, as numpy arrays."""
    return {key: np.ascontiguousarray(from_flax_layout(key, np.asarray(model_variable(model, key)[...])))
            for key in WEIGHT_NAMES}
