"""One batch-norm layer, six ways, behind one signature, plus a plain NumPy reference.

Inputs and outputs are NCHW (or (N, C)) numpy arrays; the Flax layers (NNX and Linen) see NHWC
and the results are transposed back, so that every comparison is made in one layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen, nnx

from impls.flax import batch_norm as flax_bn
from impls.linen import batch_norm as linen_bn
from impls.pytorch import batch_norm as torch_bn


def to_nhwc(x):
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def to_nchw(x):
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def numpy_batch_norm(batches, gamma, beta, cotangent, eps=1e-5, momentum=0.9, unbiased_running_var=False):
    """The chapter's mathematics in float64 NumPy, with the backward pass written out by hand.

    Returns (Y of the first batch, its gradients {X, gamma, beta} for the loss sum(Y * cotangent),
    moving mean and variance after every batch has updated them).
    """
    moving_mean, moving_var = np.zeros(gamma.shape), np.ones(gamma.shape)
    for index, X in enumerate(batches):
        X = np.asarray(X, np.float64)
        axes = (0,) if X.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if X.ndim == 2 else (1, -1, 1, 1)
        mean = X.mean(axis=axes)
        var = ((X - mean.reshape(shape)) ** 2).mean(axis=axes)
        n = X.size // X.shape[1]
        running_var = var * n / (n - 1) if unbiased_running_var else var
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_var = momentum * moving_var + (1 - momentum) * running_var
        if index == 0:
            inv_std = 1 / np.sqrt(var + eps)
            X_hat = (X - mean.reshape(shape)) * inv_std.reshape(shape)
            Y = gamma.reshape(shape) * X_hat + beta.reshape(shape)
            dY = np.asarray(cotangent, np.float64)
            dX_hat = dY * gamma.reshape(shape)
            gradients = {
                "X": inv_std.reshape(shape) * (dX_hat - dX_hat.mean(axis=axes, keepdims=True)
                                               - X_hat * (dX_hat * X_hat).mean(axis=axes, keepdims=True)),
                "gamma": (dY * X_hat).sum(axis=axes),
                "beta": dY.sum(axis=axes),
            }
    return Y, gradients, moving_mean, moving_var


def torch_scratch(batches, gamma, beta, cotangent, training=True):
    moving_mean = torch.zeros(gamma.shape, dtype=torch.from_numpy(gamma).dtype)
    moving_var = torch.ones_like(moving_mean)
    for index, X in enumerate(batches):
        X = torch.tensor(X, requires_grad=True)
        g, b = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
        Y, moving_mean, moving_var = torch_bn.batch_norm(
            X, g, b, moving_mean, moving_var, torch_bn.EPS, torch_bn.MOMENTUM, training=training)
        if index == 0:
            (Y * torch.from_numpy(cotangent)).sum().backward()
            first = Y.detach().numpy(), {"X": X.grad.numpy(), "gamma": g.grad.numpy(), "beta": b.grad.numpy()}
    return (*first, moving_mean.numpy(), moving_var.numpy())


def torch_builtin(batches, gamma, beta, cotangent, training=True):
    dtype = torch.from_numpy(gamma).dtype
    layer_class = torch.nn.BatchNorm2d if batches[0].ndim == 4 else torch.nn.BatchNorm1d
    layer = layer_class(len(gamma), eps=torch_bn.EPS, momentum=1 - torch_bn.MOMENTUM, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    layer.train(training)
    for index, X in enumerate(batches):
        X = torch.tensor(X, requires_grad=True)
        Y = layer(X)
        if index == 0:
            (Y * torch.from_numpy(cotangent)).sum().backward()
            first = Y.detach().numpy(), {"X": X.grad.numpy(), "gamma": layer.weight.grad.numpy(),
                                         "beta": layer.bias.grad.numpy()}
    return (*first, layer.running_mean.numpy(), layer.running_var.numpy())


def flax_scratch(batches, gamma, beta, cotangent, training=True):
    def loss(X, g, b, moving_mean, moving_var):
        Y, moving_mean, moving_var = flax_bn.batch_norm(
            X, g, b, moving_mean, moving_var, flax_bn.EPS, flax_bn.MOMENTUM, training=training)
        return (Y * to_nhwc(cotangent)).sum(), (Y, moving_mean, moving_var)

    # Jitted, as JAX code runs: one compilation per shape instead of one per operation and shape.
    gradient_function = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    moving_mean, moving_var = jnp.zeros(gamma.shape, gamma.dtype), jnp.ones(gamma.shape, gamma.dtype)
    for index, X in enumerate(batches):
        (_, (Y, moving_mean, moving_var)), grads = gradient_function(
            jnp.asarray(to_nhwc(X)), jnp.asarray(gamma), jnp.asarray(beta), moving_mean, moving_var)
        if index == 0:
            first = to_nchw(np.asarray(Y)), {"X": to_nchw(np.asarray(grads[0])), "gamma": np.asarray(grads[1]),
                                             "beta": np.asarray(grads[2])}
    return (*first, np.asarray(moving_mean), np.asarray(moving_var))


def flax_builtin(batches, gamma, beta, cotangent, training=True):
    layer = nnx.BatchNorm(len(gamma), momentum=flax_bn.MOMENTUM, epsilon=flax_bn.EPS, use_fast_variance=False,
                          use_running_average=not training, dtype=gamma.dtype, param_dtype=gamma.dtype,
                          rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = jnp.asarray(gamma), jnp.asarray(beta)
    # nnx.BatchNorm creates its running statistics in float32 whatever param_dtype says.
    layer.mean.set_value(jnp.zeros(gamma.shape, gamma.dtype))
    layer.var.set_value(jnp.ones(gamma.shape, gamma.dtype))

    def loss(layer, X):
        Y = layer(X)
        return (Y * to_nhwc(cotangent)).sum(), Y

    gradient_function = nnx.jit(nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True))
    for index, X in enumerate(batches):
        (_, Y), (layer_grads, X_grad) = gradient_function(layer, jnp.asarray(to_nhwc(X)))
        if index == 0:
            first = to_nchw(np.asarray(Y)), {"X": to_nchw(np.asarray(X_grad)),
                                             "gamma": np.asarray(layer_grads["scale"][...]),
                                             "beta": np.asarray(layer_grads["bias"][...])}
    return (*first, np.asarray(layer.mean[...]), np.asarray(layer.var[...]))


def linen_layer(layer, names, batches, gamma, beta, cotangent, training):
    """A Linen batch-norm module applied to each batch in turn, its 'batch_stats' collection
    threaded from one apply to the next; names: (gamma, beta, moving mean, moving variance) as the
    module calls its variables."""
    gamma_name, beta_name, mean_name, var_name = names

    def loss(X, gamma, beta, batch_stats):
        variables = {"params": {gamma_name: gamma, beta_name: beta}, "batch_stats": batch_stats}
        Y, changed = layer.apply(variables, X, use_running_average=not training, mutable=["batch_stats"])
        return (Y * to_nhwc(cotangent)).sum(), (Y, changed["batch_stats"])

    gradient_function = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    batch_stats = {mean_name: jnp.zeros(gamma.shape, gamma.dtype), var_name: jnp.ones(gamma.shape, gamma.dtype)}
    for index, X in enumerate(batches):
        (_, (Y, batch_stats)), grads = gradient_function(jnp.asarray(to_nhwc(X)), jnp.asarray(gamma),
                                                         jnp.asarray(beta), batch_stats)
        if index == 0:
            first = to_nchw(np.asarray(Y)), {"X": to_nchw(np.asarray(grads[0])), "gamma": np.asarray(grads[1]),
                                             "beta": np.asarray(grads[2])}
    return (*first, np.asarray(batch_stats[mean_name]), np.asarray(batch_stats[var_name]))


def linen_scratch(batches, gamma, beta, cotangent, training=True):
    layer = linen_bn.BatchNorm(len(gamma), batches[0].ndim, param_dtype=gamma.dtype)
    return linen_layer(layer, ("gamma", "beta", "moving_mean", "moving_var"), batches, gamma, beta, cotangent,
                       training)


def linen_builtin(batches, gamma, beta, cotangent, training=True):
    layer = linen.BatchNorm(momentum=linen_bn.MOMENTUM, epsilon=linen_bn.EPS, use_fast_variance=False,
                            dtype=gamma.dtype, param_dtype=gamma.dtype)
    return linen_layer(layer, ("scale", "bias", "mean", "var"), batches, gamma, beta, cotangent, training)


LAYERS = {"torch-scratch": torch_scratch, "torch-builtin": torch_builtin,
          "flax-scratch": flax_scratch, "flax-builtin": flax_builtin,
          "linen-scratch": linen_scratch, "linen-builtin": linen_builtin}
