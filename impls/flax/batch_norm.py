"""Batch normalization from scratch, Flax NNX edition. Mirror: impls/pytorch/batch_norm.py.

`batch_norm` holds the mathematics, `BatchNorm` the bookkeeping (parameters, moving
statistics, training versus inference), as in the chapter. Given the workers of a data-parallel
run, the statistics are those of the global batch: every worker's shard, each weighed by its size.
"""

import jax
import jax.numpy as jnp
from flax import nnx

EPS = 1e-5
# The chapter's convention: moving = MOMENTUM * moving + (1 - MOMENTUM) * batch.
# nnx.BatchNorm uses the same convention, but its default is momentum=0.99.
MOMENTUM = 0.9


def builtin_momentum(momentum):
    """The chapter's momentum (the weight of the old statistics) as nnx.BatchNorm and linen.BatchNorm
    take it: Flax's convention is the chapter's, so m here is m there. Statistics that training must
    not move are momentum=1.0 here and there (and momentum=0 in PyTorch, which weighs the new batch)."""
    return momentum


def cumulative_average_momentum(batches_seen):
    """The momentum, in the chapter's convention, that makes the moving statistics the plain average
    of every batch's so far (batches_seen before this one): what PyTorch's nn.BatchNorm(momentum=None)
    keeps. Flax has no such option and counts no batches: the training loop counts its steps and
    gives the layer this momentum before each (an attribute of nnx.BatchNorm, a field of linen.BatchNorm)."""
    return batches_seen / (batches_seen + 1)


def sum_over_workers(value, axis_name):
    """`value` summed over every worker along the mesh axis, the same sum on each; `value` itself
    without an axis (one device). JAX differentiates through the collective: the backward pass
    sums the gradients over the workers in turn, so that it is synchronised too."""
    if axis_name is None:
        return value
    return jax.lax.psum(value, axis_name)


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, axis_name=None, mask=None):
    """Normalise X; return (Y, new moving mean, new moving variance).

    Training normalises with the batch's mean and biased variance and moves the moving
    statistics towards them; inference normalises with the moving statistics.
    A pure function: JAX arrays are immutable, so the new statistics are returned.
    With an axis name, the batch is every worker's X together (global statistics).
    """
    # JAX/Flax is channels-last: a 4-D batch is NHWC, so a channel's statistics gather
    # over the batch and both spatial axes, and per-channel vectors broadcast as (1, 1, 1, C).
    reduce_axes = (0,) if X.ndim == 2 else (0, 1, 2)
    per_channel = (1, -1) if X.ndim == 2 else (1, 1, 1, -1)
    # The statistics in the moving statistics' type (float32, float64 in the float64 suite), whatever
    # X's: under mixed precision X arrives in bfloat16, whose 8 significant bits cannot hold a sum
    # over the 147,456 values of a channel of LeNet's first layer at batch 256. The chapter's code
    # computed them in X's type; PyTorch's and Flax's built-ins compute them in float32 (see
    # tests/test_mixed_precision.py for what that saves). Y goes on in X's type, as the built-ins'.
    input_dtype = X.dtype
    X = X.astype(moving_mean.dtype)
    if training:
        # Sums and counts over every worker, so that a worker holding fewer examples (a shard of
        # a partial batch) weighs less, exactly as on one device. JAX runs one program on shards
        # of one shape: a shorter shard is padded, and its mask (True for an example, False for
        # padding, broadcastable to X, as nnx.BatchNorm's) leaves the padding out of sums and counts.
        count = sum_over_workers(jnp.sum(jnp.ones_like(X[..., :1]), where=mask), axis_name)
        mean = sum_over_workers(jnp.sum(X, axis=reduce_axes, where=mask), axis_name) / count
        # Two passes (subtract the mean, then average the squares), biased: divide by n.
        var = sum_over_workers(jnp.sum((X - mean.reshape(per_channel)) ** 2, axis=reduce_axes, where=mask),
                               axis_name) / count
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    else:
        mean, var = moving_mean, moving_var
    X_hat = (X - mean.reshape(per_channel)) / jnp.sqrt(var.reshape(per_channel) + eps)
    Y = gamma.reshape(per_channel) * X_hat + beta.reshape(per_channel)
    # The moving statistics are state, not part of the graph that gradients flow through.
    return Y.astype(input_dtype), jax.lax.stop_gradient(moving_mean), jax.lax.stop_gradient(moving_var)


def check_input(X, num_features, num_dims, training):
    """Refuse input that batch_norm would silently broadcast into nonsense."""
    if not jnp.issubdtype(X.dtype, jnp.floating):
        raise TypeError(f"BatchNorm needs floating-point input, got {X.dtype}")
    if X.ndim != num_dims:
        expected = "(batch, features)" if num_dims == 2 else "(batch, height, width, channels)"
        raise ValueError(f"BatchNorm expects {num_dims}-D input {expected}, got shape {tuple(X.shape)}")
    if X.shape[-1] != num_features:
        raise ValueError(f"BatchNorm has {num_features} features, input has {X.shape[-1]} (shape {tuple(X.shape)})")
    if training and X.size // num_features == 1:
        # One value per channel has no variance to normalise by; PyTorch's built-in raises
        # here, and all six implementations follow it (see tests/test_models.py).
        raise ValueError(f"BatchNorm in training needs more than one value per channel, got shape {tuple(X.shape)}")


class BatchNorm(nnx.Module):
    """The chapter's scratch layer; gamma and beta are trained, the moving statistics are state."""

    def __init__(self, num_features, num_dims, *, axis_name=None, param_dtype=jnp.float32, eps=EPS):
        self.num_features, self.num_dims = num_features, num_dims
        # A plain attribute, as nnx.BatchNorm's epsilon: nnx.state(model) does not carry it.
        self.eps = eps
        # The mesh axis whose workers' batches are normalised together, as for nnx.BatchNorm; None: this one.
        self.axis_name = axis_name
        self.gamma = nnx.Param(jnp.ones(num_features, param_dtype))
        self.beta = nnx.Param(jnp.zeros(num_features, param_dtype))
        # nnx.BatchStat marks state that is not trained: nnx.Optimizer(wrt=nnx.Param) leaves
        # it alone, and nnx.state(model) carries it along with the parameters.
        self.moving_mean = nnx.BatchStat(jnp.zeros(num_features, param_dtype))
        self.moving_var = nnx.BatchStat(jnp.ones(num_features, param_dtype))
        # The attribute that model.train() / model.eval() set, as for nnx.BatchNorm.
        self.use_running_average = False

    def __call__(self, X, *, mask=None):
        training = not self.use_running_average
        check_input(X, self.num_features, self.num_dims, training)
        Y, moving_mean, moving_var = batch_norm(
            X, self.gamma[...], self.beta[...], self.moving_mean[...], self.moving_var[...],
            eps=self.eps, momentum=MOMENTUM, training=training, axis_name=self.axis_name, mask=mask)
        if training:
            self.moving_mean[...], self.moving_var[...] = moving_mean, moving_var
        return Y


# The moving variances among a model's moving statistics, by name: nnx.BatchNorm's and
# linen.BatchNorm's, and the scratch layer's; every other moving statistic is a mean.
VARIANCE_NAMES = ("var", "moving_var")


def reset_running_stats(batch_stats):
    """What nn.BatchNorm.reset_running_stats() does, for Flax's layers, which have no such method:
    every moving mean back to 0 and every moving variance to 1, where a new layer starts them.
    batch_stats: nnx.state(model, nnx.BatchStat), or Linen's 'batch_stats' collection; returns the
    same tree, reset (nnx.update(model, ...) puts it in place; Linen's next apply takes it)."""
    def reset(path, value):
        is_variance = any(getattr(key, "key", None) in VARIANCE_NAMES for key in path)
        return jnp.ones_like(value) if is_variance else jnp.zeros_like(value)
    return jax.tree_util.tree_map_with_path(reset, batch_stats)
