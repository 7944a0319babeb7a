"""Data-parallel training, Flax Linen edition: a jax.sharding.Mesh and shard_map.
Mirror: impls/flax/data_parallel.py (NNX).

The workers, the mesh and the shards are JAX's and the NNX edition's (one mesh serves both Flax
APIs); what Linen changes is what travels through shard_map: its train state, whose moving
statistics come back from apply() and are threaded into the next step.
"""

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from impls.flax.data_parallel import (AXIS, ENGINE, MeshTrainer, Workers, start_workers, stop_workers,  # noqa: F401 (shared)
                                      use_host_devices)
from impls.linen import lenet
from impls.linen.train import keep_state, state_for_step


def build_lenet(weights, norm, workers, bn_stats, compute_dtype=None):
    """The model every worker trains. 'global' statistics: batch norm over every worker's shard
    together (the scratch layer's psum, linen.BatchNorm's pmean); 'local': over each worker's shard
    alone, which is what shard_map does with a model left as it is."""
    axis_name = AXIS if bn_stats == "global" else None
    return lenet.build_lenet(weights, norm, workers.device, axis_name=axis_name, compute_dtype=compute_dtype)


def worker_loss_and_counts(params, batch_stats, apply_fn, images, labels, mask, global_batch_size):
    """This worker's part of the global batch's mean loss, and (the moving statistics after the
    pass, its shard's summed loss, number correct). mask: True for an example, False for a row
    that pads the shard, or None (no padding)."""
    logits, changed = apply_fn({"params": params, "batch_stats": batch_stats}, images, train=True, mask=mask,
                               mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_sum = jnp.sum(losses, where=mask)
    correct = jnp.sum(logits.argmax(axis=1) == labels, where=mask)
    # Inside shard_map the gradient with respect to the replicated parameters comes out summed over
    # the workers (see the NNX twin): each shard's share of the global mean is its sum over B.
    return loss_sum / global_batch_size, (changed["batch_stats"], loss_sum, correct)


# Gradients with respect to the parameters, the first argument: the moving statistics get none.
worker_value_and_gradients = jax.value_and_grad(worker_loss_and_counts, has_aux=True)


def worker_train_step(state, images, labels, mask, global_batch_size, own_statistics):
    """One SGD step of one worker on its shard; shard_map runs it on every worker at once.
    own_statistics: each worker keeps moving statistics of its own, stacked along the mesh axis."""
    if own_statistics:
        state = state.replace(batch_stats=jax.tree.map(lambda stacked: stacked[0], state.batch_stats))
    (_, (batch_stats, loss_sum, correct)), gradients = worker_value_and_gradients(
        state.params, state.batch_stats, state.apply_fn, images, labels, mask, global_batch_size)
    state = state.apply_gradients(grads=gradients, batch_stats=batch_stats)
    if own_statistics:
        state = state.replace(batch_stats=jax.tree.map(lambda row: row[None], state.batch_stats))
    return state, jax.lax.psum(loss_sum, AXIS), jax.lax.psum(correct, AXIS)


@partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=1)
def train_on_shards(mesh, state, images, labels, mask, global_batch_size, own_statistics):
    """worker_train_step on every worker of the mesh, each on its block of rows of the global batch."""
    # The train state's fields, each with its spec: replicated, but the moving statistics of workers
    # that keep their own.
    state_spec = state.replace(step=P(), params=P(), opt_state=P(), batch_stats=P(AXIS) if own_statistics else P())
    step = jax.shard_map(partial(worker_train_step, global_batch_size=global_batch_size,
                                 own_statistics=own_statistics),
                         mesh=mesh, in_specs=(state_spec, P(AXIS), P(AXIS), P(AXIS)), out_specs=(state_spec, P(), P()))
    return step(state, images, labels, mask)


class DataParallelTrainer(MeshTrainer):
    """Trains the model on every worker of the mesh, each on its shard of each global batch."""

    def __init__(self, model, optimizer, workers):
        super().__init__(workers)
        self.model, self.optimizer = model, optimizer
        # Without an axis to sum over, each worker's moving statistics follow its own shards: they
        # differ, so each worker keeps its own, stacked along the mesh axis.
        self.own_statistics = model.module.axis_name is None
        model.train()
        state = state_for_step(model, optimizer)
        replicated = partial(self.global_array, sharding=self.replicated)
        self.state = state.replace(
            step=replicated(state.step), params=jax.tree.map(replicated, state.params),
            opt_state=jax.tree.map(replicated, state.opt_state),
            batch_stats=jax.tree.map(self.stacked if self.own_statistics else replicated, state.batch_stats))
        self.dtype = model.variables["params"]["conv1"]["kernel"].dtype

    def step(self, images, labels):
        """One SGD step on a global batch (numpy, this framework's layout), each worker training on
        its shard. Returns the global batch's (summed loss, number correct)."""
        X, y, mask = self.sharded_batch(images, labels, self.dtype)
        self.state, loss_sum, correct = train_on_shards(self.workers.mesh, self.state, X, y, mask, len(labels),
                                                        self.own_statistics)
        return loss_sum, correct

    def synchronize(self):
        jax.block_until_ready(self.state)

    def finish(self):
        """Worker 0's state into self.model and self.optimizer, on worker 0's device, for evaluation
        and export; where each worker keeps its own moving statistics, worker 0's (see the NNX twin)."""
        state = self.state.replace(
            step=self.worker_0(self.state.step), params=jax.tree.map(self.worker_0, self.state.params),
            opt_state=jax.tree.map(self.worker_0, self.state.opt_state),
            batch_stats=jax.tree.map(partial(self.worker_0, stacked=self.own_statistics), self.state.batch_stats))
        keep_state(self.model, self.optimizer, state)
