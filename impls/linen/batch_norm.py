"""Batch normalization from scratch, Flax Linen edition. Mirror: impls/flax/batch_norm.py (NNX).

`batch_norm` holds the mathematics, `BatchNorm` the bookkeeping (parameters, moving
statistics, training versus inference), as in the chapter. The mathematics is JAX's, whichever
Flax API wraps it: `batch_norm`, `check_input` and `sum_over_workers` are the NNX edition's own,
and so are the helpers for the built-ins' options (`builtin_momentum`, `cumulative_average_momentum`,
`reset_running_stats`). What Linen changes is the bookkeeping: its modules hold no state.
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from impls.flax.batch_norm import (  # noqa: F401 (shared)
    EPS, MOMENTUM, VARIANCE_NAMES, batch_norm, builtin_momentum, check_input, cumulative_average_momentum,
    reset_running_stats, sum_over_workers)


class BatchNorm(nn.Module):
    """The chapter's scratch layer; gamma and beta are trained, the moving statistics are state.

    A Linen module is a description: its variables live outside it, in the collections that
    `apply` receives, 'params' for gamma and beta and 'batch_stats' for the moving statistics.
    """

    num_features: int
    num_dims: int
    # The mesh axis whose workers' batches are normalised together, as for linen.BatchNorm; None: this one.
    axis_name: str | None = None
    param_dtype: Any = jnp.float32
    # A field of the module, as linen.BatchNorm's epsilon: the variables do not carry it.
    eps: float = EPS
    # Linen chooses the mode at each call, or here, as linen.BatchNorm does (NNX: model.train()/.eval()).
    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, X, use_running_average=None, *, mask=None):
        training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        check_input(X, self.num_features, self.num_dims, training)
        gamma = self.param("gamma", nn.initializers.ones, (self.num_features,), self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, (self.num_features,), self.param_dtype)
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (self.num_features,), self.param_dtype)
        moving_var = self.variable("batch_stats", "moving_var", jnp.ones, (self.num_features,), self.param_dtype)
        # model.init runs this call once, outside any mesh: no axis to sum over there.
        axis_name = None if self.is_initializing() else self.axis_name
        Y, new_mean, new_var = batch_norm(
            X, gamma, beta, moving_mean.value, moving_var.value,
            eps=self.eps, momentum=MOMENTUM, training=training, axis_name=axis_name, mask=mask)
        if training and not self.is_initializing():
            # Written into the 'batch_stats' collection that apply() was told is mutable, and
            # returned from it: the caller threads it into the next step.
            moving_mean.value, moving_var.value = new_mean, new_var
        return Y
