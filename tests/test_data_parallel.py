"""Data parallel: batch norm over several workers, each training on its shard of every global batch,
with statistics over the whole batch (global) or over each worker's shard (local), in PyTorch and JAX.

Global statistics make data-parallel training the same computation as training on one device on
the whole batch: held to that in float64, layer by layer and over 100 SGD steps, with shards of
equal and of unequal size. Local statistics are batch norm on each shard alone. Every default of
the engines that decides which of the two a user gets is pinned here.

Workers: PyTorch's are processes (torch.distributed over gloo, DistributedDataParallel), launched
once for the session (tests/parallel_workers.py); JAX's are CPU devices of this process (four,
set in conftest.py) under shard_map. A JAX mesh across processes (jax.distributed) is tested end
to end, through compare.py under torchrun (tests/test_compare.py).
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from common.data import shard_bounds
from common.init import MOVING_STAT_NAMES, PARAMETER_NAMES, canonical_weights
from common.drivers.workers import failure_message, launch_local_workers
from common.launch import DataParallelError
from impls import registry
from impls.registry import IMPLEMENTATIONS
from impls.flax import batch_norm as flax_bn
from impls.flax import data_parallel as flax_parallel
from impls.flax.data_parallel import AXIS
from tests import parallel_workers
from tests.conftest import FLOAT64_TRAJECTORY_BATCH, TRAJECTORY_STEPS
from tests.layers import to_nchw, to_nhwc, torch_scratch
from tests.support import NAMES, build, data_parallel_trajectory, inputs, max_difference, trajectory
from tests.tolerances import FLOAT64_PASS, FLOAT64_TRAJECTORY, assert_close, magnitude

# The trajectories' global batch and length: the float64 parity trajectories' (conftest.py), so
# that one device's are those.
BATCH_SIZE, STEPS = FLOAT64_TRAJECTORY_BATCH, TRAJECTORY_STEPS
LOCAL_STEPS = 20  # local statistics and unequal shards: enough to drift apart measurably
# Every moving statistic but the variance of nn.BatchNorm, which is unbiased (test_semantics.py).
BIASED = PARAMETER_NAMES + MOVING_STAT_NAMES


# --- shared runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def worker_processes():
    """One launch of tests/parallel_workers.py in WORKERS processes: what worker 0 gathered."""
    return launch_local_workers(parallel_workers.scenarios,
                                (canonical_weights(0, np.float64), STEPS, LOCAL_STEPS, BATCH_SIZE),
                                parallel_workers.WORKERS)


@pytest.fixture(scope="session")
def one_device(fashion_mnist, trajectories_float64):
    """Single-device torch-scratch trajectories, the reference: {batch size: (losses, weights per
    step)}; at BATCH_SIZE, the parity suite's own (conftest.py)."""
    train_images, train_labels, _, _ = fashion_mnist
    losses, snapshots, _ = trajectory("torch-scratch", canonical_weights(0, np.float64), train_images, train_labels,
                                      LOCAL_STEPS, BATCH_SIZE - 1)
    return {BATCH_SIZE: trajectories_float64["torch-scratch"][:2], BATCH_SIZE - 1: (losses, snapshots)}


def mesh_workers(count):
    """`count` of this process's CPU devices as workers (conftest.py gives it four)."""
    return flax_parallel.start_workers("cpu", count, timeout=60)


# 100 steps for NNX's scratch layer over 2 devices, as for PyTorch's over 2 processes; 20 for the
# rest, whose first 20 steps already show any error in their collectives (Linen's models compute
# NNX's numbers besides: bitwise in bfloat16, tests/test_mixed_precision.py, and within the float64
# bound over 100 steps, test_trajectory.py).
MESH_RUNS = [("flax-scratch", 2, "global", STEPS), ("flax-builtin", 2, "global", LOCAL_STEPS),
             ("linen-scratch", 2, "global", LOCAL_STEPS), ("linen-builtin", 2, "global", LOCAL_STEPS),
             ("flax-builtin", 4, "global", LOCAL_STEPS), ("flax-scratch", 4, "global", LOCAL_STEPS),
             ("flax-scratch", 2, "local", LOCAL_STEPS), ("flax-builtin", 2, "local", LOCAL_STEPS),
             ("linen-builtin", 2, "local", LOCAL_STEPS),
             ("flax-scratch", 3, "global", LOCAL_STEPS),  # 64 over 3: shards of 22, 21 and 21
             ("linen-scratch", 3, "global", LOCAL_STEPS)]


@pytest.fixture(scope="session")
def mesh_trajectories(fashion_mnist):
    """{(name, workers, bn_stats): (losses, weights at the last step)} on meshes of this process."""
    train_images, train_labels, _, _ = fashion_mnist
    weights = canonical_weights(0, np.float64)
    return {(name, count, bn_stats): data_parallel_trajectory(name, weights, mesh_workers(count), bn_stats,
                                                              train_images, train_labels, steps, BATCH_SIZE)
            for name, count, bn_stats, steps in MESH_RUNS}


def all_trajectories(worker_processes, mesh_trajectories):
    """Every data-parallel trajectory: {label: (losses, {step: weights})}."""
    processes = worker_processes["trajectories"]
    runs = {f"{name} on {count} devices, {bn_stats}": run for (name, count, bn_stats), run in mesh_trajectories.items()}
    runs.update({
        "torch-scratch in 2 processes, global": processes["torch-scratch", "global"],
        "torch-scratch in 2 processes, local": processes["torch-scratch", "local"],
        "torch-builtin in 2 processes, local": processes["torch-builtin", "local"],
        "torch-scratch in 2 processes, global, batch 63": processes["torch-scratch", "global", "uneven"],
    })
    return runs


def assert_trajectories_agree(label_a, run_a, label_b, run_b, keys=BIASED):
    """Per-step loss over the steps both ran, and every named weight after the last of them."""
    (losses_a, snapshots_a), (losses_b, snapshots_b) = run_a, run_b
    steps = min(len(losses_a), len(losses_b))
    assert_close(f"per-step loss over {steps} steps", label_a, losses_a[:steps], label_b, losses_b[:steps],
                 FLOAT64_TRAJECTORY)
    weights_a = snapshots_a[steps] if isinstance(snapshots_a, dict) else snapshots_a[steps - 1]
    weights_b = snapshots_b[steps] if isinstance(snapshots_b, dict) else snapshots_b[steps - 1]
    difference, key = max_difference(weights_a, weights_b, keys)
    assert difference <= FLOAT64_TRAJECTORY, (
        f"{key} after {steps} steps: {label_a} vs {label_b} differ by {difference:.3e} (bound {FLOAT64_TRAJECTORY:.0e})")


# --- global statistics: the same computation as one device -----------------------------------

GLOBAL_RUNS = ["torch-scratch in 2 processes, global", "flax-scratch on 2 devices, global",
               "flax-builtin on 2 devices, global", "linen-scratch on 2 devices, global",
               "linen-builtin on 2 devices, global", "flax-scratch on 4 devices, global",
               "flax-builtin on 4 devices, global"]


@pytest.mark.parametrize("label", GLOBAL_RUNS)
def test_global_statistics_train_as_one_device_on_the_whole_batch(label, worker_processes, mesh_trajectories,
                                                                  one_device):
    """Per-step loss, parameters and moving statistics after 100 steps (20 for all but the scratch
    layers over two workers, see MESH_RUNS) within 1e-9 of one device's, on the same global batches."""
    run = all_trajectories(worker_processes, mesh_trajectories)[label]
    assert len(run[0]) == (STEPS if label in ("torch-scratch in 2 processes, global", "flax-scratch on 2 devices, global")
                           else LOCAL_STEPS)
    assert_trajectories_agree(label, run, "one device", one_device[BATCH_SIZE])


@pytest.mark.parametrize("label, batch_size", [("torch-scratch in 2 processes, global, batch 63", BATCH_SIZE - 1),
                                               ("flax-scratch on 3 devices, global", BATCH_SIZE),
                                               ("linen-scratch on 3 devices, global", BATCH_SIZE)])
def test_shards_of_unequal_size_weigh_what_they_hold(label, batch_size, worker_processes, mesh_trajectories,
                                                     one_device):
    """63 over 2 workers (32 + 31), 64 over 3 (22 + 21 + 21; JAX pads the shorter shards and masks
    the padding): the project's layers weigh each worker by its shard's size, as one device would."""
    sizes = {stop - start for start, stop in shard_bounds(batch_size, 2 if "2 processes" in label else 3)}
    assert len(sizes) == 2
    run = all_trajectories(worker_processes, mesh_trajectories)[label]
    assert_trajectories_agree(label, run, "one device", one_device[batch_size])


def test_pytorch_and_flax_agree_under_global_statistics(worker_processes, mesh_trajectories):
    """Over the 100 steps both ran (the 20-step runs meet PyTorch's through one device's, above)."""
    runs = all_trajectories(worker_processes, mesh_trajectories)
    assert_trajectories_agree("torch-scratch in 2 processes, global", runs["torch-scratch in 2 processes, global"],
                              "flax-scratch on 2 devices, global", runs["flax-scratch on 2 devices, global"])


def test_the_data_parallel_trajectory_learns(worker_processes):
    losses, _ = worker_processes["trajectories"]["torch-scratch", "global"]
    assert losses[0] > 2.0 and losses[-10:].mean() < 1.0


# --- local statistics: batch norm on each shard alone ------------------------------------------

def test_pytorch_and_flax_agree_under_local_statistics(worker_processes, mesh_trajectories):
    """Each worker normalises with its own shard's statistics; worker 0's moving statistics are the
    ones evaluated (DDP broadcasts them; JAX keeps one set per worker and takes worker 0's)."""
    runs = all_trajectories(worker_processes, mesh_trajectories)
    assert_trajectories_agree("torch-scratch in 2 processes, local", runs["torch-scratch in 2 processes, local"],
                              "flax-scratch on 2 devices, local", runs["flax-scratch on 2 devices, local"])
    for flax_builtin in ("flax-builtin on 2 devices, local", "linen-builtin on 2 devices, local"):
        assert_trajectories_agree("torch-builtin in 2 processes, local", runs["torch-builtin in 2 processes, local"],
                                  flax_builtin, runs[flax_builtin],
                                  keys=PARAMETER_NAMES + tuple(key for key in MOVING_STAT_NAMES if "mean" in key))


def test_local_statistics_train_measurably_otherwise(worker_processes, mesh_trajectories):
    runs = all_trajectories(worker_processes, mesh_trajectories)
    for framework in ("torch-scratch in 2 processes", "flax-scratch on 2 devices"):
        local_losses, global_losses = runs[f"{framework}, local"][0], runs[f"{framework}, global"][0][:LOCAL_STEPS]
        assert local_losses[0] != global_losses[0]
        assert np.max(np.abs(local_losses - global_losses)) > 1e-2, framework


def single_device_logits(name, images):
    """Training-mode logits of one device's model on `images` (its batch statistics: theirs)."""
    module, model, device = build(name, canonical_weights(0, np.float64))
    model.train()
    X, _ = inputs(module, device, images, np.zeros(len(images), np.int64), np.float64)
    return module.to_numpy(module.predict(model, X))


def mesh_logits(name, images, count, bn_stats):
    """Training-mode logits of every worker's shard under shard_map, its model built for bn_stats."""
    workers = mesh_workers(count)
    framework, norm = IMPLEMENTATIONS[name]
    model = registry.data_parallel(framework).build_lenet(canonical_weights(0, np.float64), norm, workers, bn_stats)
    if framework == "flax":
        model.train()
        graphdef, state = nnx.split(model)

        def worker_logits(state, X):
            return nnx.merge(graphdef, state)(X)
    else:
        state = model.variables

        def worker_logits(variables, X):
            return model.module.apply(variables, X, train=True, mutable=["batch_stats"])[0]
    state = jax.device_put(state, NamedSharding(workers.mesh, P()))  # replicated: every worker's model
    logits = jax.jit(jax.shard_map(worker_logits, mesh=workers.mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))
    return np.asarray(logits(state, jnp.asarray(to_nhwc(np.asarray(images, np.float64)))))


@pytest.mark.parametrize("name", NAMES)
def test_local_statistics_are_each_shards_own(name, worker_processes, fashion_mnist):
    """A model left as it is normalises each worker's shard with that shard's statistics: under
    DistributedDataParallel (PyTorch) and under shard_map (JAX). Exactly one device's batch norm on
    each shard alone; measurably not the whole batch's."""
    images = fashion_mnist[0][:BATCH_SIZE]
    bounds = shard_bounds(BATCH_SIZE, 2)
    if name.startswith("torch"):
        logits = np.concatenate(worker_processes["local logits"][name.split("-")[1]])
    else:
        logits = mesh_logits(name, images, 2, "local")
    for worker, (start, stop) in enumerate(bounds):
        assert_close(f"worker {worker}'s logits", f"{name}, local statistics", logits[start:stop],
                     "one device on the shard", single_device_logits(name, images[start:stop]),
                     FLOAT64_PASS)
    whole_batch = single_device_logits(name, images)
    assert np.max(np.abs(logits - whole_batch)) > 1e-3


def test_flax_global_statistics_logits_are_the_whole_batch_s(fashion_mnist):
    images = fashion_mnist[0][:BATCH_SIZE]
    for name in ("flax-scratch", "flax-builtin", "linen-scratch", "linen-builtin"):
        assert_close("logits", f"{name}, global statistics over 4 workers", mesh_logits(name, images, 4, "global"),
                     "one device", single_device_logits(name, images), FLOAT64_PASS)


# --- one layer, shard by shard -----------------------------------------------------------------

def padded(array, count):
    """The rows of a global batch laid out for `count` workers: each shard padded to the longest,
    one block per worker; and the mask (True for an example)."""
    bounds = shard_bounds(len(array), count)
    rows = max(stop - start for start, stop in bounds)
    blocks, mask = np.zeros((count, rows, *array.shape[1:])), np.zeros((count, rows), bool)
    for worker, (start, stop) in enumerate(bounds):
        blocks[worker, :stop - start] = array[start:stop]
        mask[worker, :stop - start] = True
    return blocks.reshape(count * rows, *array.shape[1:]), mask.reshape(-1)


def unpadded(array, count, length):
    """The inverse of padded(): the global batch's rows, in order."""
    bounds = shard_bounds(length, count)
    rows = len(array) // count
    return np.concatenate([array[worker * rows:worker * rows + stop - start]
                           for worker, (start, stop) in enumerate(bounds)])


def flax_layer_over_mesh(kind, X, cotangent, gamma, beta, count, axis_name=AXIS):
    """The scratch batch_norm ('scratch'), nnx.BatchNorm ('nnx') or linen.BatchNorm ('linen'), on
    every worker's (padded) shard under shard_map:
    (Y, {X, gamma, beta: gradient of sum(Y * cotangent)}, each worker's moving mean and variance).
    NCHW in and out."""
    X_rows, mask = padded(to_nhwc(X), count)
    cotangent_rows, _ = padded(to_nhwc(cotangent), count)
    features = X.shape[1]

    def worker(X, cotangent, mask, gamma, beta):
        where = mask.reshape((-1,) + (1,) * (X.ndim - 1))
        zeros, ones = jnp.zeros(features, X.dtype), jnp.ones(features, X.dtype)
        if kind == "scratch":
            def loss(X, gamma, beta):
                Y, mean, var = flax_bn.batch_norm(X, gamma, beta, zeros, ones, flax_bn.EPS, flax_bn.MOMENTUM, True,
                                                  axis_name=axis_name, mask=where)
                return jnp.sum(Y * cotangent), (Y, mean, var)
        elif kind == "linen":
            def loss(X, gamma, beta):
                layer = linen.BatchNorm(momentum=flax_bn.MOMENTUM, epsilon=flax_bn.EPS, use_fast_variance=False,
                                        axis_name=axis_name, dtype=X.dtype, param_dtype=X.dtype)
                variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": zeros, "var": ones}}
                Y, changed = layer.apply(variables, X, use_running_average=False, mask=where, mutable=["batch_stats"])
                return jnp.sum(Y * cotangent), (Y, changed["batch_stats"]["mean"], changed["batch_stats"]["var"])
        else:
            def loss(X, gamma, beta):
                layer = nnx.BatchNorm(features, momentum=flax_bn.MOMENTUM, epsilon=flax_bn.EPS,
                                      use_fast_variance=False, axis_name=axis_name, dtype=X.dtype,
                                      param_dtype=X.dtype, rngs=nnx.Rngs(0))
                layer.scale[...], layer.bias[...] = gamma, beta
                layer.mean.set_value(zeros)
                layer.var.set_value(ones)
                Y = layer(X, mask=where)
                return jnp.sum(Y * cotangent), (Y, layer.mean[...], layer.var[...])
        (_, (Y, mean, var)), gradients = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(X, gamma, beta)
        return Y, *gradients, mean[None], var[None]

    mesh = mesh_workers(count).mesh
    outputs = jax.jit(jax.shard_map(worker, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P(), P()),
                                    out_specs=(P(AXIS), P(AXIS), P(), P(), P(AXIS), P(AXIS))))(
        X_rows, cotangent_rows, mask, gamma, beta)
    Y, X_gradient, gamma_gradient, beta_gradient, means, variances = (np.asarray(value) for value in outputs)
    return (to_nchw(unpadded(Y, count, len(X))),
            {"X": to_nchw(unpadded(X_gradient, count, len(X))), "gamma": gamma_gradient, "beta": beta_gradient},
            means, variances)


def one_device_layer(X, cotangent, gamma, beta):
    """The reference: the scratch layer on one device on the whole batch (tests/layers.py)."""
    Y, gradients, moving_mean, moving_var = torch_scratch([X], gamma, beta, cotangent)
    return Y, gradients, moving_mean, moving_var


def assert_layer_agrees(label, Y, gradients, means, variances, X, cotangent, gamma, beta):
    Y_ref, gradients_ref, mean_ref, var_ref = one_device_layer(X, cotangent, gamma, beta)
    scale = magnitude(X)
    assert_close("output", label, Y, "one device", Y_ref, FLOAT64_PASS * scale)
    for key in ("X", "gamma", "beta"):
        assert_close(f"gradient wrt {key}", label, gradients[key], "one device", gradients_ref[key],
                     FLOAT64_PASS * magnitude(gradients_ref[key]))
    for worker, (mean, var) in enumerate(zip(means, variances)):
        assert_close(f"worker {worker}'s moving mean", label, mean, "one device", mean_ref, FLOAT64_PASS * scale)
        assert_close(f"worker {worker}'s moving variance", label, var, "one device", var_ref, FLOAT64_PASS * scale)


@pytest.mark.parametrize("shape_label", list(parallel_workers.LAYER_BATCHES))
def test_pytorch_scratch_layer_over_workers_is_one_device_on_the_whole_batch(shape_label, worker_processes):
    """Shards of unequal size (4 + 3 rows, 5 + 4): outputs and input gradients shard by shard,
    parameter gradients summed over the workers (as DDP sums them), moving statistics on each."""
    per_worker = worker_processes["layer"][shape_label]
    X, cotangent, gamma, beta = parallel_workers.layer_inputs(parallel_workers.LAYER_BATCHES[shape_label])
    gradients = {"X": np.concatenate([worker["X"] for worker in per_worker]),
                 "gamma": sum(worker["gamma"] for worker in per_worker),
                 "beta": sum(worker["beta"] for worker in per_worker)}
    assert_layer_agrees("torch-scratch over 2 processes", np.concatenate([worker["Y"] for worker in per_worker]),
                        gradients, [worker["moving_mean"] for worker in per_worker],
                        [worker["moving_var"] for worker in per_worker], X, cotangent, gamma, beta)


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("shape_label", list(parallel_workers.LAYER_BATCHES))
def test_flax_scratch_layer_over_workers_is_one_device_on_the_whole_batch(shape_label, count):
    """7 rows over 4 workers: shards of 2, 2, 2 and 1, padded to 2 and masked."""
    X, cotangent, gamma, beta = parallel_workers.layer_inputs(parallel_workers.LAYER_BATCHES[shape_label])
    assert len({stop - start for start, stop in shard_bounds(len(X), count)}) == 2
    assert_layer_agrees(f"flax-scratch over {count} devices", *flax_layer_over_mesh("scratch", X, cotangent, gamma,
                                                                                     beta, count),
                        X, cotangent, gamma, beta)


@pytest.mark.parametrize("api", ["nnx", "linen"])
@pytest.mark.parametrize("count", [2, 4])
def test_flax_batch_norm_over_equal_shards_is_one_device_on_the_whole_batch(count, api):
    X, cotangent, gamma, beta = parallel_workers.layer_inputs((8, 3, 5, 5))
    assert_layer_agrees(f"{api}.BatchNorm(axis_name) over {count} devices",
                        *flax_layer_over_mesh(api, X, cotangent, gamma, beta, count), X, cotangent, gamma, beta)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax_batch_norm_averages_the_workers_means_unweighted(api):
    """google/flax#2417: nnx.BatchNorm(axis_name=...) and linen.BatchNorm(axis_name=...) take
    lax.pmean of each worker's mean, so a shard of 3 rows weighs as much as one of 4. The scratch
    layer sums and counts instead."""
    X, cotangent, gamma, beta = parallel_workers.layer_inputs(parallel_workers.LAYER_BATCHES["4-D"])
    (first, second), axes = shard_bounds(len(X), 2), (0, 2, 3)
    assert (first[1] - first[0], second[1] - second[0]) == (4, 3)
    unweighted_mean = (X[slice(*first)].mean(axis=axes) + X[slice(*second)].mean(axis=axes)) / 2
    _, _, builtin_means, _ = flax_layer_over_mesh(api, X, cotangent, gamma, beta, 2)
    _, _, scratch_means, _ = flax_layer_over_mesh("scratch", X, cotangent, gamma, beta, 2)
    # From 0, one update with momentum 0.9: the moving mean is a tenth of the batch mean.
    np.testing.assert_allclose(builtin_means[0], 0.1 * unweighted_mean, rtol=1e-12)
    np.testing.assert_allclose(scratch_means[0], 0.1 * X.mean(axis=axes), rtol=1e-12)
    assert np.max(np.abs(unweighted_mean - X.mean(axis=axes))) > 1e-2


# --- the engines' defaults -----------------------------------------------------------------------

def test_ddp_broadcasts_worker_0s_buffers_after_a_forward_pass_with_gradients(worker_processes):
    """DistributedDataParallel's default (broadcast_buffers, forward_sync_buffers): at the start of a
    forward pass, if the one before recorded gradients, worker 0's buffers overwrite every other
    worker's; after a forward pass under torch.no_grad, the next one leaves them as they are."""
    buffers = worker_processes["buffers"]
    own, shard_mean = buffers["own"], buffers["shard_mean"]
    assert np.max(np.abs(own[0] - own[1])) > 1e-4  # each replica's statistics had moved its own way
    # Worker 1 started its forward pass from worker 0's running mean, then moved it towards its shard.
    np.testing.assert_allclose(buffers["after_training_forward"][1], 0.9 * own[0] + 0.1 * shard_mean[1], rtol=1e-12)
    np.testing.assert_allclose(buffers["after_training_forward"][0], 0.9 * own[0] + 0.1 * shard_mean[0], rtol=1e-12)
    # Inference (which does not change the statistics) right after a forward pass without gradients:
    # each worker kept the value it was given (5 and 6)...
    np.testing.assert_array_equal(buffers["after_forward_without_gradients"][0], 5.0)
    np.testing.assert_array_equal(buffers["after_forward_without_gradients"][1], 6.0)
    # ...and right after a training step: worker 0's, on both.
    np.testing.assert_array_equal(buffers["after_forward_with_gradients"][1], 5.0)


def test_sync_batch_norm_refuses_to_train_on_the_cpu(worker_processes):
    """pytorch/pytorch#78078: nn.SyncBatchNorm's statistics kernels exist for GPUs only. DDP refuses
    the model; the layer alone refuses a CPU tensor in training; inference runs (no collective)."""
    refusals = worker_processes["refusals"]
    assert refusals["DistributedDataParallel"] == "SyncBatchNorm layers only work with GPU modules"
    assert refusals["training"].startswith("SyncBatchNorm expected input tensor to be on GPU")
    np.testing.assert_allclose(refusals["inference output"], 1 / np.sqrt(1 + 1e-5), rtol=1e-12)


def test_sync_batch_norm_running_variance_counts_every_worker(worker_processes):
    """nn.SyncBatchNorm on shards of 4 and 3 rows (both workers on one GPU, over gloo): it normalises
    with the global batch's biased variance and keeps the unbiased one with the global count n,
    n/(n-1), in running_var. Runs where PyTorch sees a CUDA GPU."""
    per_worker = worker_processes["gpu"]
    if per_worker is None:
        pytest.skip("needs a CUDA GPU: nn.SyncBatchNorm trains on GPUs only")
    for worker in per_worker:
        assert "error" not in worker, worker.get("error")
    X, _, _, _ = parallel_workers.layer_inputs(parallel_workers.LAYER_BATCHES["4-D"])
    n = X.size // X.shape[1]  # 7 * 5 * 5 values per channel, over both workers
    mean, var = X.mean(axis=(0, 2, 3)), X.var(axis=(0, 2, 3))
    for worker in per_worker:
        np.testing.assert_allclose(worker["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12)
    Y = np.concatenate([worker["Y"] for worker in per_worker])
    expected = (X - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + 1e-5)
    np.testing.assert_allclose(Y, expected, atol=1e-12)


def test_jax_global_view_normalises_over_the_whole_batch_with_no_flag():
    """jax.jit over a batch sharded across the mesh (the global view): nnx.BatchNorm without an
    axis_name computes the whole batch's statistics; XLA inserts the collectives."""
    X, _, gamma, beta = parallel_workers.layer_inputs((8, 3, 5, 5))
    mesh = mesh_workers(4).mesh
    layer = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, dtype=jnp.float64, param_dtype=jnp.float64,
                          rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = jnp.asarray(gamma), jnp.asarray(beta)
    layer.mean.set_value(jnp.zeros(3))
    layer.var.set_value(jnp.ones(3))
    sharded = jax.device_put(jnp.asarray(to_nhwc(X)), NamedSharding(mesh, P(AXIS)))
    assert len(sharded.sharding.device_set) == 4
    Y = nnx.jit(lambda layer, X: layer(X))(layer, sharded)
    Y_ref, _, mean_ref, var_ref = one_device_layer(X, np.zeros_like(X), gamma, beta)
    assert_close("output", "nnx.BatchNorm, global view", to_nchw(np.asarray(Y)), "one device", Y_ref, FLOAT64_PASS)
    assert_close("moving mean", "nnx.BatchNorm, global view", layer.mean[...], "one device", mean_ref, FLOAT64_PASS)
    assert_close("moving variance", "nnx.BatchNorm, global view", layer.var[...], "one device", var_ref, FLOAT64_PASS)


def test_shard_map_sums_the_gradients_of_replicated_parameters():
    """Under shard_map (check_vma, JAX's default), the gradient of a worker's loss with respect to a
    replicated parameter comes out already summed over the workers, and lax.pmean leaves it so: a
    loss that is each shard's mean gives N times the gradient of the global mean. The pmap-era
    recipe (per-worker gradients, then pmean) holds with check_vma=False only."""
    mesh = mesh_workers(2).mesh
    x, w = jnp.arange(1.0, 5.0), jnp.asarray(2.0)

    def shard_mean_loss(w, x):
        return jnp.mean((w * x) ** 2)

    def global_mean_gradient(w, x):
        return jax.grad(lambda w: jnp.mean((w * x) ** 2))(w)

    def pmean_of_gradient(w, x):
        return jax.lax.pmean(jax.grad(shard_mean_loss)(w, x), AXIS)

    expected = global_mean_gradient(w, x)
    summed = jax.shard_map(pmean_of_gradient, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())(w, x)
    averaged = jax.shard_map(pmean_of_gradient, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                             check_vma=False)(w, x)
    assert float(summed) == pytest.approx(2 * float(expected), rel=1e-12)
    assert float(averaged) == pytest.approx(float(expected), rel=1e-12)


def test_a_worker_that_fails_stops_the_others_and_says_why():
    """The launcher stops worker 0, which waits at a collective for worker 1, and the error names
    the worker and its reason in one line."""
    with pytest.raises(DataParallelError) as failure:
        launch_local_workers(parallel_workers.fail_on_worker_1, (), parallel_workers.WORKERS)
    assert str(failure.value) == "worker 1 of 2 failed: worker 1 cannot go on"


@pytest.mark.parametrize(("exitcode", "message"), [
    (-signal.SIGKILL, "was killed by SIGKILL (out of memory?); no results written"),
    (-signal.SIGTERM, "was killed by SIGTERM; no results written"),
    (3, "failed: exit code 3 (see its output above)"),
], ids=["SIGKILL", "SIGTERM", "exit code"])
def test_a_worker_that_left_no_error_file_is_described_by_its_exit_code(tmp_path, exitcode, message):
    """What the launcher records of a worker that ended without raising (a signal, or sys.exit):
    the signal by name, or the exit code. A worker killed by SIGKILL, and the message in a run of
    compare.py: tests/test_compare.py."""
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=exitcode, error_file=str(tmp_path / "error.json"))
    assert failure_message(failure) == message


def test_jax_cannot_shard_a_batch_unevenly():
    """Why the JAX workers pad a shorter shard and mask it: an array's sharded axis must divide."""
    mesh = mesh_workers(2).mesh
    with pytest.raises(ValueError, match="should evenly divide"):
        jax.device_put(jnp.arange(5.0), NamedSharding(mesh, P(AXIS)))
