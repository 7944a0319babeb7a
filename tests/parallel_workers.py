"""What the suite measures in separate worker processes: one launch of WORKERS processes (as
torchrun starts them, through common.drivers.workers.launch_local_workers), shared by every test that
needs torch.distributed (tests/test_data_parallel.py).

Worker 0 gathers what every worker saw and returns it; the tests compare it in the parent process
with single-device computations. (JAX across processes, jax.distributed, is tested end to end,
through compare.py under torchrun: tests/test_compare.py.)
"""

import numpy as np

WORKERS = 2
TIMEOUT_S = 120
# A global batch of each shape, cut into shards of unequal size (4 + 3 rows, 5 + 4 rows).
LAYER_BATCHES = {"4-D": (7, 3, 5, 5), "2-D": (9, 5)}


def layer_inputs(shape):
    """The global batch, cotangent, gamma and beta of the layer tests: the same in every process."""
    rng = np.random.default_rng(3)
    channels = shape[1]
    per_channel = (1, -1) if len(shape) == 2 else (1, -1, 1, 1)
    X = 2.0 + rng.uniform(0.5, 2.0, channels).reshape(per_channel) * rng.standard_normal(shape)
    return X, rng.standard_normal(shape), rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)


def gathered(value):
    """Every worker's `value`, in rank order (torch.distributed's object collective)."""
    import torch.distributed as dist
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def scratch_layer_over_workers(workers):
    """The scratch batch_norm on this worker's shard of each LAYER_BATCHES batch, statistics over
    every worker's: output, gradients of sum(Y * cotangent), moving statistics after the update,
    per worker."""
    import torch
    from common.data import shard_bounds
    from impls.pytorch import batch_norm as torch_bn
    results = {}
    for label, shape in LAYER_BATCHES.items():
        X, cotangent, gamma, beta = layer_inputs(shape)
        start, stop = shard_bounds(shape[0], workers.count)[workers.process_index]
        X = torch.tensor(X[start:stop], requires_grad=True)
        g, b = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
        Y, moving_mean, moving_var = torch_bn.batch_norm(
            X, g, b, torch.zeros(shape[1], dtype=X.dtype), torch.ones(shape[1], dtype=X.dtype),
            torch_bn.EPS, torch_bn.MOMENTUM, training=True, process_group=workers.process_group)
        (Y * torch.from_numpy(cotangent[start:stop])).sum().backward()
        results[label] = gathered({"Y": Y.detach().numpy(), "X": X.grad.numpy(), "gamma": g.grad.numpy(),
                                   "beta": b.grad.numpy(), "moving_mean": moving_mean.numpy(),
                                   "moving_var": moving_var.numpy()})
    return results


def shard_tensors(workers, images, labels):
    """This worker's shard of a global batch, as float64 and int64 tensors."""
    import torch
    from common.data import shard_bounds
    start, stop = shard_bounds(len(images), workers.count)[workers.process_index]
    return torch.from_numpy(np.asarray(images[start:stop], np.float64)), torch.from_numpy(np.array(labels[start:stop]))


def ddp_local_logits(workers, weights, images, labels):
    """{norm: every worker's training-mode logits of its shard} for a model left as it is, wrapped in
    DistributedDataParallel: what each replica's batch norm normalises with."""
    from torch.nn.parallel import DistributedDataParallel
    from impls.pytorch import lenet
    X, _ = shard_tensors(workers, images, labels)
    logits = {}
    for norm in lenet.NORMS:
        replica = DistributedDataParallel(lenet.build_lenet(weights, norm, workers.device))
        replica.train()
        logits[norm] = gathered(replica(X).detach().numpy())
    return logits


def ddp_buffers(workers, weights, images, labels):
    """The first running mean of nn.BatchNorm under DistributedDataParallel, each worker on its shard,
    around the forward passes that follow an SGD step: when does DDP hand worker 0's buffers to the
    others?"""
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from impls.pytorch import lenet, train
    X, y = shard_tensors(workers, images, labels)
    model = lenet.build_lenet(weights, "builtin", workers.device)
    replica = DistributedDataParallel(model)
    optimizer = train.make_optimizer(model, 1.0)

    def sgd_step():
        replica.train()
        train.train_step(replica, optimizer, X, y)

    def running_mean():
        return model.bn1.running_mean.clone().numpy()

    sgd_step()  # each replica's running statistics move towards its own shard's
    own = running_mean()
    with torch.no_grad():
        shard_mean = model.conv1(X).mean(dim=(0, 2, 3)).numpy()
        replica(X)  # training mode, after a forward pass with gradients
    after_training_forward = running_mean()
    distinct = float(workers.process_index) + 5.0
    with torch.no_grad():
        model.bn1.running_mean.fill_(distinct)
        replica.eval()
        replica(X)  # inference, after a forward pass without gradients
    after_forward_without_gradients = running_mean()
    sgd_step()
    with torch.no_grad():
        model.bn1.running_mean.fill_(distinct)
        replica.eval()
        replica(X)  # inference, after a forward pass with gradients
    after_forward_with_gradients = running_mean()
    return {"own": gathered(own), "shard_mean": gathered(shard_mean),
            "after_training_forward": gathered(after_training_forward),
            "after_forward_without_gradients": gathered(after_forward_without_gradients),
            "after_forward_with_gradients": gathered(after_forward_with_gradients)}


def sync_batch_norm_refusals(workers, weights):
    """What nn.SyncBatchNorm says on the CPU: under DDP, and alone in training; and that inference runs."""
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from impls.pytorch import lenet
    refusals = {}
    try:
        DistributedDataParallel(lenet.build_lenet(weights, "builtin", "cpu", process_group=workers.process_group))
    except ValueError as error:
        refusals["DistributedDataParallel"] = str(error)
    layer = torch.nn.SyncBatchNorm(3, process_group=workers.process_group).double()
    try:
        layer(torch.ones(4, 3, dtype=torch.float64))
    except ValueError as error:
        refusals["training"] = str(error)
    layer.eval()
    refusals["inference output"] = layer(torch.ones(4, 3, dtype=torch.float64)).detach().numpy()
    return refusals


def sync_batch_norm_on_a_gpu(workers):
    """nn.SyncBatchNorm on shards of unequal size, both workers on GPU 0 (gloo carries CUDA tensors):
    output and running variance, per worker. None without a GPU; the error's text if it fails."""
    import torch
    if not torch.cuda.is_available():
        return None
    from common.data import shard_bounds
    X, _, _, _ = layer_inputs(LAYER_BATCHES["4-D"])
    start, stop = shard_bounds(len(X), workers.count)[workers.process_index]
    try:
        layer = torch.nn.SyncBatchNorm(X.shape[1], momentum=0.1, process_group=workers.process_group)
        layer = layer.to(device="cuda", dtype=torch.float64).train()
        Y = layer(torch.from_numpy(X[start:stop]).cuda())
        result = {"Y": Y.detach().cpu().numpy(), "running_var": layer.running_var.cpu().numpy()}
    except Exception as error:  # reported to the test, which fails with it
        result = {"error": f"{type(error).__name__}: {error}"}
    return gathered(result)


def scenarios(weights, steps, local_steps, batch_size):
    """Everything the tests need from separate processes (see the module's docstring). weights:
    canonical, float64."""
    from common.data import load_fashion_mnist
    from impls.pytorch import data_parallel as torch_parallel
    from tests.support import data_parallel_trajectory

    workers = torch_parallel.start_workers("cpu", WORKERS, TIMEOUT_S)
    train_images, train_labels, _, _ = load_fashion_mnist()
    images, labels = train_images[:batch_size], train_labels[:batch_size]
    try:
        results = {
            "devices": workers.devices,
            "layer": scratch_layer_over_workers(workers),
            "local logits": ddp_local_logits(workers, weights, images, labels),
            "buffers": ddp_buffers(workers, weights, images, labels),
            "refusals": sync_batch_norm_refusals(workers, weights),
            "gpu": sync_batch_norm_on_a_gpu(workers),
            "trajectories": {},
        }
        trajectories = results["trajectories"]
        for name, bn_stats, count in (("torch-scratch", "global", steps), ("torch-scratch", "local", local_steps),
                                      ("torch-builtin", "local", local_steps)):
            trajectories[name, bn_stats] = data_parallel_trajectory(
                name, weights, workers, bn_stats, train_images, train_labels, count, batch_size)
        # A global batch of one example fewer: shards of unequal size (batch_size / 2 and one less).
        trajectories["torch-scratch", "global", "uneven"] = data_parallel_trajectory(
            "torch-scratch", weights, workers, "global", train_images, train_labels, local_steps, batch_size - 1)
    finally:
        torch_parallel.stop_workers(workers)
    return results if workers.process_index == 0 else None


def fail_on_worker_1():
    """Worker 1 stops with an error while worker 0 waits for it at a collective."""
    import os

    import torch.distributed as dist

    from common.launch import DataParallelError
    dist.init_process_group("gloo", init_method="env://")
    if dist.get_rank() == 1:
        raise DataParallelError("worker 1 cannot go on")
    dist.barrier()  # never passed: worker 1 is gone
    return os.getpid()


# --- batch-norm options over workers (tests/test_options.py) ----------------------------------------

OPTION_WORKERS = 4
# Grouped statistics: workers 0 and 1 normalise together, and 2 and 3 (PyTorch's process_group of
# new_subgroups_by_enumeration, Flax's axis_index_groups).
GROUPS = [[0, 1], [2, 3]]
OPTION_STEPS = 3
# A global batch per step, two rows per worker; the grouped layer sees the first.
OPTION_BATCH = (8, 3)
DDP_MOMENTUM = 0.25  # PyTorch's convention


def option_inputs():
    """The option tests' global batches, cotangents, gamma and beta: the same in every process."""
    rng = np.random.default_rng(5)
    batch, channels = OPTION_BATCH
    # A mean and a spread per worker's rows, so that every worker's statistics differ.
    offsets = np.repeat(rng.uniform(-3.0, 3.0, (OPTION_WORKERS, channels)), batch // OPTION_WORKERS, axis=0)
    batches = offsets + rng.uniform(0.5, 2.0, channels) * rng.standard_normal((OPTION_STEPS, batch, channels))
    return batches, rng.standard_normal((OPTION_STEPS, batch, channels)), rng.uniform(0.5, 2.0, channels), \
        rng.normal(size=channels)


def grouped_scratch_layer(workers, group):
    """The scratch batch_norm on this worker's rows of the first batch, statistics over its group's:
    output, gradients of sum(Y * cotangent), moving statistics."""
    import torch
    from impls.pytorch import batch_norm as torch_bn
    batches, cotangents, gamma, beta = option_inputs()
    rows = slice(*shard_rows(workers))
    X = torch.tensor(batches[0][rows], requires_grad=True)
    g, b = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    Y, moving_mean, moving_var = torch_bn.batch_norm(
        X, g, b, torch.zeros(len(gamma), dtype=X.dtype), torch.ones(len(gamma), dtype=X.dtype),
        torch_bn.EPS, torch_bn.MOMENTUM, training=True, process_group=group)
    (Y * torch.from_numpy(cotangents[0][rows])).sum().backward()
    return gathered({"Y": Y.detach().numpy(), "X": X.grad.numpy(), "gamma": g.grad.numpy(), "beta": b.grad.numpy(),
                     "moving_mean": moving_mean.numpy(), "moving_var": moving_var.numpy()})


def shard_rows(workers):
    from common.data import shard_bounds
    return shard_bounds(OPTION_BATCH[0], workers.count)[workers.process_index]


def ddp_running_statistics(workers, broadcast_buffers):
    """nn.BatchNorm1d under DistributedDataParallel(broadcast_buffers=...), each worker on its rows of
    every batch, SGD on sum(Y * cotangent): every worker's running mean and variance after each step."""
    import warnings

    import torch
    from torch.nn.parallel import DistributedDataParallel
    batches, cotangents, gamma, beta = option_inputs()
    rows = slice(*shard_rows(workers))
    layer = torch.nn.BatchNorm1d(len(gamma), momentum=DDP_MOMENTUM, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    with warnings.catch_warnings():
        # torch 2.14 deprecates it for forward_sync_buffers, which syncs the buffers when DDP starts
        # even when False (the same here: every replica starts from the same layer).
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        replica = DistributedDataParallel(layer, broadcast_buffers=broadcast_buffers)
    optimizer = torch.optim.SGD(replica.parameters(), lr=0.5)
    statistics = []
    for X, cotangent in zip(batches, cotangents):
        (replica(torch.from_numpy(X[rows])) * torch.from_numpy(cotangent[rows])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        statistics.append((layer.running_mean.clone().numpy(), layer.running_var.clone().numpy()))
    return gathered(statistics)


def grouped_sync_batch_norm_on_a_gpu(workers, group):
    """nn.SyncBatchNorm(process_group=...) on this worker's rows of the first batch, all workers on
    GPU 0 (gloo carries CUDA tensors): output and running statistics, per worker. None without a GPU;
    the error's text if it fails."""
    import torch
    if not torch.cuda.is_available():
        return None
    batches, _, _, _ = option_inputs()
    try:
        layer = torch.nn.SyncBatchNorm(OPTION_BATCH[1], momentum=0.1, process_group=group)
        layer = layer.to(device="cuda", dtype=torch.float64).train()
        Y = layer(torch.from_numpy(batches[0][slice(*shard_rows(workers))]).cuda())
        result = {"Y": Y.detach().cpu().numpy(), "running_mean": layer.running_mean.cpu().numpy(),
                  "running_var": layer.running_var.cpu().numpy()}
    except Exception as error:  # reported to the test, which fails with it
        result = {"error": f"{type(error).__name__}: {error}"}
    return gathered(result)


def option_scenarios():
    """What tests/test_options.py needs from OPTION_WORKERS processes, in one launch."""
    import torch.distributed as dist
    from impls.pytorch import data_parallel as torch_parallel
    workers = torch_parallel.start_workers("cpu", OPTION_WORKERS, TIMEOUT_S)
    try:
        # Every process creates every group, in the same order; each gets its own back.
        group, _ = dist.new_subgroups_by_enumeration(GROUPS)
        results = {"grouped": grouped_scratch_layer(workers, group),
                   "gpu grouped": grouped_sync_batch_norm_on_a_gpu(workers, group),
                   "ddp": {flag: ddp_running_statistics(workers, flag) for flag in (True, False)}}
    finally:
        torch_parallel.stop_workers(workers)
    return results if workers.process_index == 0 else None
