"""Data-parallel training, Flax NNX edition: a jax.sharding.Mesh and shard_map.
Mirror: impls/pytorch/data_parallel.py.

One program runs on every device of a one-axis mesh (shard_map), each device a worker that trains
on its shard of each global batch, in one process or in several. In one process the mesh holds N
local devices: N CPU devices (set before JAX starts its CPU backend) or N GPUs. Started by torchrun,
each process brings its own devices and jax.distributed joins them into one mesh, the path that
multi-host JAX takes. The parameters are replicated; the gradients come out summed over the workers.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.data import shard_bounds
from common.launch import DataParallelError, launch_environment
from impls.flax import lenet

ENGINE = "jax.sharding"
# The mesh's one axis, along which the workers sit: the axis_name that batch norm sums over.
AXIS = "workers"


def use_host_devices(count):
    """`count` CPU devices in this process, for a mesh on the CPU. Read when JAX starts its CPU
    backend: call it before anything asks JAX for a device. (PyTorch's twin is a process per
    worker: its CPU workers are processes, not devices.)"""
    jax.config.update("jax_num_cpu_devices", count)


@dataclass
class Workers:
    """The workers of a data-parallel run, as this process sees them."""
    count: int          # how many workers (devices of the mesh)
    process_index: int  # this process's index: process 0, which holds worker 0, evaluates and reports
    device: object      # this process's first worker's device: worker 0's in process 0
    devices: list       # every worker's device, in mesh order ("process/device")
    mesh: Mesh
    description: str


def start_workers(request, count, timeout):
    """A mesh of `count` devices: this process's own, or, where torchrun started this process, every
    process's, joined by jax.distributed (CPU collectives over gloo). DataParallelError if the
    devices do not suffice; JAX's error if the others do not join in `timeout` seconds."""
    launch = launch_environment()
    if launch is not None:
        # Before JAX starts a backend. On a GPU machine each process takes the GPU of its LOCAL_RANK.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(launch.jax_coordinator, launch.world_size, launch.rank,
                                   local_device_ids=[launch.local_rank], initialization_timeout=timeout)
    gpus = jax.devices("gpu") if jax.default_backend() == "gpu" else []
    if request == "cuda" and not gpus:
        raise DataParallelError(f"JAX sees no usable CUDA GPU (its backend is {jax.default_backend()!r}; "
                                "pip install 'batchnorm-compare[cuda]' brings JAX's CUDA support)")
    platform = "gpu" if request in ("auto", "cuda") and gpus else "cpu"
    devices = jax.devices(platform)
    if len(devices) < count:
        hint = ("--device cpu trains on CPU devices" if platform == "gpu" else
                "compare.py sets as many CPU devices as --data-parallel asks, before JAX starts")
        raise DataParallelError(f"{count} workers need {count} JAX {platform} devices, JAX sees {len(devices)} ({hint})")
    mesh = Mesh(np.array(devices[:count]), (AXIS,))
    own = [device for device in mesh.devices.flat if device.process_index == jax.process_index()]
    processes = jax.process_count()
    where = f"{processes} processes joined by jax.distributed" if processes > 1 else "one process"
    return Workers(count, jax.process_index(), own[0],
                   [f"process {device.process_index}/{device.platform}:{device.id}" for device in mesh.devices.flat],
                   mesh, f"{ENGINE} mesh of {count} {platform} devices in {where}, shard_map")


def stop_workers(workers):
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def build_lenet(weights, norm, workers, bn_stats, compute_dtype=None):
    """The model every worker trains. 'global' statistics: batch norm over every worker's shard
    together (the scratch layer's psum, nnx.BatchNorm's pmean); 'local': over each worker's shard
    alone, which is what shard_map does with a model left as it is."""
    axis_name = AXIS if bn_stats == "global" else None
    return lenet.build_lenet(weights, norm, workers.device, axis_name=axis_name, compute_dtype=compute_dtype)


def worker_loss_and_counts(model, images, labels, mask, global_batch_size):
    """This worker's part of the global batch's mean loss, and its shard's (summed loss, number
    correct). mask: True for an example, False for a row that pads the shard, or None (no padding)."""
    logits = model(images, mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_sum = jnp.sum(losses, where=mask)
    correct = jnp.sum(logits.argmax(axis=1) == labels, where=mask)
    # Inside shard_map the gradient with respect to the replicated parameters comes out summed over
    # the workers (JAX transposes their implicit broadcast into a psum, so a further lax.pmean would
    # change nothing). This shard's share of the global mean, its sum over B, makes that sum the
    # gradient of the global batch's mean loss, whether the shards are equal or not.
    return loss_sum / global_batch_size, (loss_sum, correct)


# Gradients with respect to nnx.Param only: the moving statistics (nnx.BatchStat) get none.
worker_value_and_gradients = nnx.value_and_grad(worker_loss_and_counts, argnums=nnx.DiffState(0, nnx.Param),
                                                has_aux=True)


def worker_train_step(graphdef, batch_stats, rest, images, labels, mask, global_batch_size, own_statistics):
    """One SGD step of one worker on its shard; shard_map runs it on every worker at once.
    own_statistics: each worker keeps moving statistics of its own, stacked along the mesh axis."""
    if own_statistics:
        batch_stats = jax.tree.map(lambda stacked: stacked[0], batch_stats)  # this worker's row
    model, optimizer = nnx.merge(graphdef, batch_stats, rest)
    (_, (loss_sum, correct)), gradients = worker_value_and_gradients(model, images, labels, mask, global_batch_size)
    optimizer.update(model, gradients)
    _, batch_stats, rest = nnx.split((model, optimizer), nnx.BatchStat, ...)
    if own_statistics:
        batch_stats = jax.tree.map(lambda row: row[None], batch_stats)
    return batch_stats, rest, jax.lax.psum(loss_sum, AXIS), jax.lax.psum(correct, AXIS)


@partial(jax.jit, static_argnums=(0, 1, 7, 8), donate_argnums=(2, 3))
def train_on_shards(graphdef, mesh, batch_stats, rest, images, labels, mask, global_batch_size, own_statistics):
    """worker_train_step on every worker of the mesh, each on its block of rows of the global batch."""
    stats_spec = P(AXIS) if own_statistics else P()
    step = jax.shard_map(partial(worker_train_step, graphdef, global_batch_size=global_batch_size,
                                 own_statistics=own_statistics),
                         mesh=mesh, in_specs=(stats_spec, P(), P(AXIS), P(AXIS), P(AXIS)),
                         out_specs=(stats_spec, P(), P(), P()))
    return step(batch_stats, rest, images, labels, mask)


class MeshTrainer:
    """What a trainer over the mesh needs whichever Flax API holds the model (NNX here, Linen in
    impls/linen/data_parallel.py): this process's workers, arrays over the whole mesh, and each
    global batch cut into shards of one shape."""

    def __init__(self, workers):
        self.workers = workers
        self.own_workers = [index for index, device in enumerate(workers.mesh.devices.flat)
                            if device.process_index == jax.process_index()]
        self.replicated, self.by_worker = NamedSharding(workers.mesh, P()), NamedSharding(workers.mesh, P(AXIS))

    def global_array(self, local_value, sharding):
        """One array over the whole mesh from this process's part of it (its workers' rows, or,
        replicated, the whole value: then every process must pass the same)."""
        local_value = np.asarray(local_value)
        shape = local_value.shape if sharding is self.replicated else (
            (len(local_value) // len(self.own_workers)) * self.workers.count, *local_value.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local_value, shape)

    def stacked(self, value):
        """A value every worker starts from, one copy per worker along the mesh axis."""
        return self.global_array(np.stack([np.asarray(value)] * len(self.own_workers)), self.by_worker)

    def shards(self, array, bounds, rows):
        """This process's workers' shards of a global batch, each padded to `rows` rows."""
        blocks = np.zeros((len(self.own_workers), rows, *array.shape[1:]), array.dtype)
        for block, worker in zip(blocks, self.own_workers):
            start, stop = bounds[worker]
            block[:stop - start] = array[start:stop]
        return blocks.reshape(-1, *array.shape[1:])

    def sharded_batch(self, images, labels, dtype):
        """A global batch (numpy) over the mesh, each worker's shard in its block of rows: (images,
        labels, mask). JAX runs one program on shards of one shape: where the shards differ in size,
        the shorter are padded, and the mask keeps the padding out of batch norm's statistics and
        the loss; None where they do not."""
        bounds = shard_bounds(len(labels), self.workers.count)
        sizes = [stop - start for start, stop in bounds]
        rows = max(sizes)
        X = self.global_array(self.shards(np.asarray(images, dtype), bounds, rows), self.by_worker)
        y = self.global_array(self.shards(labels.astype(np.int32), bounds, rows), self.by_worker)
        mask = None
        if min(sizes) < rows:
            mask = self.global_array(np.concatenate([np.arange(rows) < sizes[worker] for worker in self.own_workers]),
                                     self.by_worker)
        return X, y, mask

    def worker_0(self, value, stacked=False):
        """Worker 0's copy of a value over the mesh, on its device (in process 0)."""
        shard = next(shard for shard in value.addressable_shards if shard.device == self.workers.device)
        return shard.data[0] if stacked else shard.data


class DataParallelTrainer(MeshTrainer):
    """Trains the model on every worker of the mesh, each on its shard of each global batch."""

    def __init__(self, model, optimizer, workers):
        super().__init__(workers)
        self.model, self.optimizer = model, optimizer
        # Without an axis to sum over, each worker's moving statistics follow its own shards: they
        # differ, so each worker keeps its own, stacked along the mesh axis.
        self.own_statistics = model.bn1.axis_name is None
        model.train()
        # NNX's graph bookkeeping once, here; the step works on the arrays.
        self.graphdef, batch_stats, rest = nnx.split((model, optimizer), nnx.BatchStat, ...)
        self.rest = jax.tree.map(lambda value: self.global_array(value, self.replicated), rest)
        self.batch_stats = jax.tree.map(self.stacked if self.own_statistics else (
            lambda value: self.global_array(value, self.replicated)), batch_stats)
        self.dtype = model.conv1.kernel[...].dtype

    def step(self, images, labels):
        """One SGD step on a global batch (numpy, this framework's layout), each worker training on
        its shard. Returns the global batch's (summed loss, number correct)."""
        X, y, mask = self.sharded_batch(images, labels, self.dtype)
        self.batch_stats, self.rest, loss_sum, correct = train_on_shards(
            self.graphdef, self.workers.mesh, self.batch_stats, self.rest, X, y, mask, len(labels),
            self.own_statistics)
        return loss_sum, correct

    def synchronize(self):
        jax.block_until_ready((self.batch_stats, self.rest))

    def finish(self):
        """Worker 0's state into self.model, on worker 0's device, for evaluation and export. Where
        each worker keeps its own moving statistics, worker 0's: as flax.jax_utils.unreplicate took
        device 0's copy under pmap, and as DDP's default hands worker 0's buffers to every replica."""
        nnx.update((self.model, self.optimizer),
                   jax.tree.map(partial(self.worker_0, stacked=self.own_statistics), self.batch_stats),
                   jax.tree.map(self.worker_0, self.rest))
