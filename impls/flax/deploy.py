"""Deployment, Flax NNX edition: batch norm folded into the layer before it, and the inference
program exported (jax.export). Mirror: impls/pytorch/deploy.py.

In inference, batch norm is an affine map per channel, y = gamma * (x - mean) / sqrt(var + eps) +
beta, with the moving statistics as stored: it folds into the convolution or Linear layer before it,
W' = W * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel. What
inference uses is what folds: the layer's own eps, the moving variance as it is. A model in training
mode normalises with its batch's statistics instead, which fold into nothing: every function here
refuses one.

JAX and Flax have no folding utility (the one request found: EnzymeAD/Enzyme-JAX#533): `fold` is
written once, for NNX and Linen. Nor an ONNX exporter of their own (google/flax#834, #4430):
docs/deploying.md says what jax2onnx does with this LeNet, and what a Flax user does instead.
"""

import re
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.files import atomic_path
from common.init import BATCH_NORM_AFTER, LAYERS
from impls.flax.lenet import BATCH_NORM_FIELDS, FOLDED, LeNet

PROGRAM = "jax.export"
PROGRAM_SUFFIX = ".jaxexport"
# What batch norm leaves in an exported program (its StableHLO operations): the square root of the
# variance, nnx.BatchNorm's reciprocal one, the scratch layer's own.
BATCH_NORM_OPERATIONS = frozenset({"sqrt", "rsqrt"})
# What batch statistics leave: reductions over the batch (pooling is a reduce_window).
BATCH_STATISTICS_OPERATIONS = frozenset({"reduce"})
STABLEHLO_OPERATION = re.compile(r"\bstablehlo\.([a-z_]+)")
# The platforms the program is lowered for: JAX exports for one list of them, by default the one it
# runs on; a program for both runs on either, GPU or not.
PLATFORMS = ("cpu", "cuda")
# Where each batch norm keeps its eps: an attribute, as PyTorch's does, but not under one name.
EPS_FIELD = {"scratch": "eps", "builtin": "epsilon"}


def check_inference(model):
    """Refuse a model in training mode: what jax.export captures is one function, of one mode."""
    # An NNX model has no mode of its own: model.eval() sets each layer's use_running_average, and
    # LeNet reads its first batch-norm layer's, as its forward pass does.
    if not model.bn1.use_running_average:
        raise ValueError("the model is in training mode, whose batch norm normalises with each batch's "
                         "statistics and updates the moving ones: call model.eval() before folding or exporting")


def fold_batch_norm(model):
    """A LeNet for inference computing what `model` (in inference mode) computes, each batch-norm
    layer folded into the convolution or Linear layer before it: no batch norm left."""
    check_inference(model)
    param_dtype, dtype = model.conv1.kernel[...].dtype, model.conv1.dtype
    folded = nnx.eval_shape(lambda: LeNet(FOLDED, param_dtype=param_dtype, dtype=dtype))
    for layer, kind, _ in LAYERS:
        if kind == "batch_norm":
            continue
        before, norm_layer = getattr(model, layer), BATCH_NORM_AFTER.get(layer)
        kernel, bias = before.kernel[...], before.bias[...]
        if norm_layer:
            kernel, bias = fold(kernel, bias, *statistics(getattr(model, norm_layer), model.norm))
        getattr(folded, layer).kernel.set_value(kernel)
        getattr(folded, layer).bias.set_value(bias)
    return folded


def fold(kernel, bias, scale, offset, mean, var, eps):
    """A convolution's (HWIO) or Dense layer's ((in, out)) kernel and bias, followed by batch norm in
    inference, as one layer's. Both kernels keep the output channel on their last axis, where the
    per-channel factor broadcasts (PyTorch's OIHW and (out, in) keep it first)."""
    factor = scale / jnp.sqrt(var + eps)
    return kernel * factor, (bias - mean) * factor + offset


def statistics(batch_norm, norm):
    """(scale, offset, mean, var, eps) of a batch-norm layer of `norm`, as its inference uses them."""
    fields = BATCH_NORM_FIELDS[norm]
    return (*(getattr(batch_norm, fields[name])[...] for name in ("gamma", "beta", "moving_mean", "moving_var")),
            getattr(batch_norm, EPS_FIELD[norm]))


def export_program(model, path, example):
    """`model`'s inference as a jax.export program with a symbolic batch dimension, serialized at
    `path`, whole or not at all. example: a batch (NHWC) of its dtype. Returns the path."""
    check_inference(model)
    graphdef, state = nnx.split(model)

    def predict(images):
        return nnx.merge(graphdef, state)(images)
    return write_program(predict, path, example)


def write_program(predict, path, example):
    """jax.export of predict (a function of the images alone: the model's arrays are constants of
    the program), for PLATFORMS, its batch symbolic; serialized at `path`. Returns the path."""
    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(predict), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct((batch, *example.shape[1:]), example.dtype))
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(exported.serialize())
    return str(path)


def load_program(path, device):
    """The saved program, back, on `device`, as a function of a numpy batch (NHWC) to numpy logits."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))

    def predict(images):
        # The program runs where its input is: numpy alone would go to JAX's default device.
        return np.asarray(exported.call(jax.device_put(images, device)))
    return predict


def program_operations(path):
    """{StableHLO operation: count} of the saved program, as the runtime compiles it."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    return Counter(STABLEHLO_OPERATION.findall(exported.mlir_module()))
