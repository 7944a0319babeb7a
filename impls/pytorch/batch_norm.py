"""Batch normalization from scratch, PyTorch edition. Mirror: impls/flax/batch_norm.py.

`batch_norm` holds the mathematics, `BatchNorm` the bookkeeping (parameters, moving
statistics, training versus inference), as in the chapter. Given the workers of a data-parallel
run, the statistics are those of the global batch: every worker's shard, each weighed by its size.
"""

import warnings

import torch
from torch import nn
from torch.distributed.nn.functional import all_reduce

# Recent torch releases deprecate torch.distributed.nn's differentiable collectives in favour of
# the private torch.distributed._functional_collectives, whose autograd support older ones lack.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)

EPS = 1e-5
# The chapter's convention: moving = MOMENTUM * moving + (1 - MOMENTUM) * batch.
# PyTorch's nn.BatchNorm weighs the other term: momentum=0.1 there is this 0.9.
MOMENTUM = 0.9


def builtin_momentum(momentum):
    """The chapter's momentum (the weight of the old statistics) as nn.BatchNorm takes it: PyTorch's
    weighs the new batch, so m here is 1 - m there. Statistics that training must not move are
    momentum 1 here and momentum=0 there (and momentum=1.0 in Flax, whose convention is the chapter's)."""
    return 1.0 - momentum


def cumulative_average_momentum(batches_seen):
    """The momentum, in the chapter's convention, that makes the moving statistics the plain average
    of every batch's so far (batches_seen before this one): what nn.BatchNorm(momentum=None) keeps,
    counting the batches in its num_batches_tracked buffer."""
    return batches_seen / (batches_seen + 1)


def sum_over_workers(value, process_group):
    """`value` summed over every worker of the process group, the same sum on each; `value` itself
    without a group (one device). A differentiable collective: its backward pass sums the
    gradients over the workers in turn, so that the backward pass is synchronised too."""
    if process_group is None:
        return value
    return all_reduce(value, group=process_group)


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, process_group=None):
    """Normalise X; return (Y, new moving mean, new moving variance).

    Training normalises with the batch's mean and biased variance and moves the moving
    statistics towards them; inference normalises with the moving statistics.
    The chapter chose the mode with `torch.is_grad_enabled()`; here the caller says.
    With a process group, the batch is every worker's X together (global statistics).
    """
    # PyTorch is channels-first: a 4-D batch is NCHW, so a channel's statistics gather
    # over the batch and both spatial axes, and per-channel vectors broadcast as (1, C, 1, 1).
    reduce_axes = (0,) if X.ndim == 2 else (0, 2, 3)
    per_channel = (1, -1) if X.ndim == 2 else (1, -1, 1, 1)
    # The statistics in the moving statistics' type (float32, float64 in the float64 suite), whatever
    # X's: under mixed precision X arrives in bfloat16, whose 8 significant bits cannot hold a sum
    # over the 147,456 values of a channel of LeNet's first layer at batch 256. The chapter's code
    # computed them in X's type; PyTorch's and Flax's built-ins compute them in float32 (see
    # tests/test_mixed_precision.py for what that saves). Y goes on in X's type, as the built-ins'.
    input_dtype = X.dtype
    X = X.to(moving_mean.dtype)
    if training:
        # Sums and counts over every worker, so that a worker holding fewer examples (a shard of
        # a partial batch) weighs less, exactly as on one device. (new_full, not a copy from the
        # host: the fast path on a GPU captures this step in a CUDA graph.)
        count = sum_over_workers(X.new_full((), X.numel() // X.shape[1]), process_group)
        mean = sum_over_workers(X.sum(dim=reduce_axes), process_group) / count
        # Two passes (subtract the mean, then average the squares), biased: divide by n.
        var = sum_over_workers(((X - mean.reshape(per_channel)) ** 2).sum(dim=reduce_axes), process_group) / count
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    else:
        mean, var = moving_mean, moving_var
    X_hat = (X - mean.reshape(per_channel)) / torch.sqrt(var.reshape(per_channel) + eps)
    Y = gamma.reshape(per_channel) * X_hat + beta.reshape(per_channel)
    # The moving statistics are state, not part of the graph that gradients flow through.
    return Y.to(input_dtype), moving_mean.detach(), moving_var.detach()


def check_input(X, num_features, num_dims, training):
    """Refuse input that batch_norm would silently broadcast into nonsense."""
    if not torch.is_floating_point(X):
        raise TypeError(f"BatchNorm needs floating-point input, got {X.dtype}")
    if X.ndim != num_dims:
        expected = "(batch, features)" if num_dims == 2 else "(batch, channels, height, width)"
        raise ValueError(f"BatchNorm expects {num_dims}-D input {expected}, got shape {tuple(X.shape)}")
    if X.shape[1] != num_features:
        raise ValueError(f"BatchNorm has {num_features} features, input has {X.shape[1]} (shape {tuple(X.shape)})")
    if training and X.numel() // num_features == 1:
        # One value per channel has no variance to normalise by; PyTorch's built-in raises
        # here too, and all six implementations follow it (see tests/test_models.py).
        raise ValueError(f"BatchNorm in training needs more than one value per channel, got shape {tuple(X.shape)}")


class BatchNorm(nn.Module):
    """The chapter's scratch layer; gamma and beta are trained, the moving statistics are state."""

    def __init__(self, num_features, num_dims, process_group=None, eps=EPS):
        super().__init__()
        self.num_features, self.num_dims = num_features, num_dims
        # A plain attribute, as nn.BatchNorm's eps: a state_dict does not carry it.
        self.eps = eps
        # The workers whose batches are normalised together, as for nn.SyncBatchNorm; None: this one.
        self.process_group = process_group
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        # Buffers, unlike the chapter's plain attributes, follow model.to(device) and
        # are saved in state_dict.
        self.register_buffer("moving_mean", torch.zeros(num_features))
        self.register_buffer("moving_var", torch.ones(num_features))

    def forward(self, X):
        check_input(X, self.num_features, self.num_dims, self.training)
        # model.train() / model.eval() choose the mode, as for nn.BatchNorm2d.
        Y, moving_mean, moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=self.eps, momentum=MOMENTUM, training=self.training, process_group=self.process_group)
        if self.training:
            # In place, as nn.BatchNorm2d updates its buffers: they keep their memory, which
            # a CUDA graph (the fast path on a GPU) reads and writes at every replay.
            self.moving_mean.copy_(moving_mean)
            self.moving_var.copy_(moving_var)
        return Y
