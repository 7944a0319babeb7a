"""Data-parallel training, PyTorch edition: torch.distributed and DistributedDataParallel.
Mirror: impls/flax/data_parallel.py.

One process per worker, each started as torchrun starts it (env:// rendezvous: MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK). Every worker holds a replica of the model and trains
it on its shard of each global batch; DistributedDataParallel (DDP) averages the gradients over
the workers during the backward pass, so the replicas take the same SGD step.
"""

import datetime
import os
import socket
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.data import shard_bounds
from common.launch import DataParallelError, launch_environment
from impls.pytorch import lenet
from impls.pytorch.train import loss_and_counts, synchronize, to_device, train_step

ENGINE = "torch.distributed"


@dataclass
class Workers:
    """The workers of a data-parallel run, as this process sees them."""
    count: int          # how many workers (WORLD_SIZE)
    process_index: int  # this process's index, its rank: process 0, which holds worker 0, evaluates and reports
    device: object      # this process's worker's device
    devices: list       # every worker's device, in rank order ("process/host/device")
    process_group: object
    description: str


def start_workers(request, count, timeout):
    """Join the rendezvous of `count` workers from the environment torchrun sets (env://): gloo on
    the CPU, NCCL on GPUs (one GPU per worker, picked by LOCAL_RANK). DataParallelError if the GPUs
    do not suffice or the others do not join in `timeout` seconds, which also bounds every
    collective's wait."""
    launch = launch_environment()
    if launch is None or launch.world_size != count:
        raise DataParallelError(f"{count} workers need the environment torchrun sets (RANK, WORLD_SIZE={count}, "
                                "MASTER_ADDR, MASTER_PORT)")
    if request == "cuda" and not torch.cuda.is_available():
        raise DataParallelError("PyTorch sees no usable CUDA GPU (torch.cuda.is_available() is False)")
    use_cuda = request in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        # NCCL refuses two workers on one GPU: each takes its own, on its machine.
        if launch.local_rank >= torch.cuda.device_count():
            raise DataParallelError(f"{launch.local_world_size} workers on this machine need as many GPUs for NCCL, "
                                    f"PyTorch sees {torch.cuda.device_count()} (--device cpu trains on the CPU, "
                                    "over gloo)")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # The machine's cores shared among its workers: more threads than cores slows every one.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    backend = "nccl" if use_cuda else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    except dist.DistError as error:
        reason = str(error).strip().splitlines()[0]
        raise DataParallelError(
            f"worker {launch.rank} of {count} could not join the rendezvous at {launch.master_addr}:"
            f"{launch.master_port} within {timeout} s ({reason}); check MASTER_ADDR and MASTER_PORT, and that "
            f"all {count} workers were started") from None
    devices = [None] * count
    dist.all_gather_object(devices, f"process {dist.get_rank()}/{socket.gethostname()}/{device}")
    return Workers(count, dist.get_rank(), device, devices, dist.group.WORLD,
                   f"{ENGINE} ({backend}), {count} processes, DistributedDataParallel")


def stop_workers(workers):
    dist.destroy_process_group()


def build_lenet(weights, norm, workers, bn_stats, compute_dtype=None):
    """This worker's replica. 'global' statistics: batch norm over every worker's shard together
    (the scratch layer's all-reduce, nn.SyncBatchNorm); 'local': over this worker's shard alone,
    which is what DDP does with a model left as it is."""
    process_group = workers.process_group if bn_stats == "global" else None
    return lenet.build_lenet(weights, norm, workers.device, process_group=process_group, compute_dtype=compute_dtype)


def worker_loss_and_counts(model, images, labels, global_batch_size, workers):
    """This worker's part of the global batch's mean loss, ready for DDP, and its shard's
    (summed loss, number correct)."""
    loss, loss_sum, correct = loss_and_counts(model, images, labels)
    # DDP divides the sum of the W workers' gradients by W. W times this shard's share of the global
    # mean (its mean times len/B) makes that the gradient of the global batch's mean loss, whether
    # the shards are equal or not. (Equal shards: the factor is exactly 1.)
    return loss * (len(labels) * workers.count / global_batch_size), loss_sum, correct


class DataParallelTrainer:
    """Trains this worker's replica on its shard of each global batch, in step with the others."""

    def __init__(self, model, optimizer, workers):
        self.model, self.optimizer, self.workers = model, optimizer, workers
        # DDP broadcasts worker 0's parameters and buffers to every replica now, averages the
        # gradients during each backward pass, and by default broadcasts worker 0's buffers (the
        # moving statistics) again at the start of each forward pass that follows a training step.
        device_ids = [workers.device.index] if workers.device.type == "cuda" else None
        self.replica = DistributedDataParallel(model, device_ids=device_ids)
        # The parameters' dtype in numpy's terms, as to_device takes it.
        self.dtype = torch.empty(0, dtype=next(model.parameters()).dtype).numpy().dtype

    def step(self, images, labels):
        """One SGD step on a global batch (numpy, this framework's layout), of which this worker
        trains on its shard. Returns the global batch's (summed loss, number correct)."""
        start, stop = shard_bounds(len(labels), self.workers.count)[self.workers.process_index]
        X, y = to_device(images[start:stop], labels[start:stop], self.workers.device, self.dtype)
        self.replica.train()
        compute_loss = partial(worker_loss_and_counts, global_batch_size=len(labels), workers=self.workers)
        loss_sum, correct = train_step(self.replica, self.optimizer, X, y, compute_loss=compute_loss)
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
        dist.all_reduce(totals, group=self.workers.process_group)
        return totals[0], totals[1]

    def synchronize(self):
        synchronize(self.model)

    def finish(self):
        """The replica trains self.model's own parameters and buffers: worker 0's model is ready
        for evaluation as it is."""

