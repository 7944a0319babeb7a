"""The six implementations as models: canonical weights, the round trip, one pass on real data,
inference after training, errors, and the state that moves with a model."""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from common.init import (BATCH_NORM_LAYERS, LAYERS, MOVING_STAT_NAMES, PARAMETER_NAMES, WEIGHT_NAMES,
                         canonical_weights)
from impls.flax import batch_norm as flax_bn
from impls.linen import batch_norm as linen_bn
from impls.pytorch import batch_norm as torch_bn
from tests.support import NAMES, build, inputs, max_difference, predict
from tests.tolerances import FLOAT32_PASS, FLOAT64_PASS, FLOAT64_TRAJECTORY, assert_close

PAIRS = list(itertools.combinations(NAMES, 2))
DTYPES = [np.float64, np.float32]
PASS_BOUND = {np.float64: FLOAT64_PASS, np.float32: FLOAT32_PASS}


# --- canonical weights -------------------------------------------------------------------------

def test_canonical_weights_shapes_dtypes_and_batch_norm_start():
    weights = canonical_weights(0, np.float64)
    assert list(weights) == list(WEIGHT_NAMES)
    for name, kind, shape in LAYERS:
        if kind == "batch_norm":
            np.testing.assert_array_equal(weights[f"{name}.gamma"], np.ones(shape))
            np.testing.assert_array_equal(weights[f"{name}.beta"], np.zeros(shape))
            np.testing.assert_array_equal(weights[f"{name}.moving_mean"], np.zeros(shape))
            np.testing.assert_array_equal(weights[f"{name}.moving_var"], np.ones(shape))
        else:
            assert weights[f"{name}.weight"].shape == shape
            assert weights[f"{name}.bias"].shape == shape[:1]
    assert all(value.dtype == np.float32 for value in canonical_weights(0).values())


@pytest.mark.parametrize("name, shape", [(name, shape) for name, kind, shape in LAYERS if kind != "batch_norm"])
def test_weights_are_xavier_uniform_and_biases_pytorch_default(name, shape):
    """Bounds as torch.nn.init.xavier_uniform_ and nn.Conv2d/nn.Linear's reset_parameters compute them."""
    weights = canonical_weights(3, np.float64)
    torch_weight, torch_layer = torch.empty(shape, dtype=torch.float64), None
    xavier_bound = np.sqrt(6 / (shape[1] * np.prod(shape[2:]) + shape[0] * np.prod(shape[2:])))
    torch.nn.init.xavier_uniform_(torch_weight)
    # torch's own bound, read off a large sample of its initialiser, matches ours.
    assert np.max(np.abs(torch_weight.numpy())) <= xavier_bound
    weight, bias = weights[f"{name}.weight"], weights[f"{name}.bias"]
    assert np.max(np.abs(weight)) <= xavier_bound
    assert np.max(np.abs(weight)) > 0.9 * xavier_bound  # uniform over the whole interval
    assert abs(weight.std() - xavier_bound / np.sqrt(3)) < 0.15 * xavier_bound / np.sqrt(3)
    torch_layer = torch.nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else torch.nn.Linear(shape[1], shape[0])
    bias_bound = 1 / np.sqrt(np.prod(shape[1:]))
    assert np.max(np.abs(torch_layer.bias.detach().numpy())) <= bias_bound
    assert np.max(np.abs(bias)) <= bias_bound
    assert np.max(np.abs(bias)) > 0.5 * bias_bound


def test_canonical_weights_follow_the_seed():
    a, b, c = canonical_weights(0), canonical_weights(0), canonical_weights(1)
    assert all(np.array_equal(a[key], b[key]) for key in WEIGHT_NAMES)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    # float32 weights are the float64 ones, rounded.
    np.testing.assert_array_equal(canonical_weights(0, np.float64)["fc1.weight"].astype(np.float32), a["fc1.weight"])


def test_canonical_weights_refuse_other_dtypes():
    with pytest.raises(ValueError, match="float32 or float64"):
        canonical_weights(0, np.float16)


# --- the boundary: canonical -> framework -> canonical ---------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(name, dtype):
    weights = canonical_weights(7, dtype)
    # Make every batch-norm value distinct, so that a swapped field could not pass.
    rng = np.random.default_rng(0)
    for key in WEIGHT_NAMES:
        if key.split(".")[0] in BATCH_NORM_LAYERS:
            weights[key] = rng.uniform(0.5, 2, weights[key].shape).astype(dtype)
    module, model, _ = build(name, weights)
    exported = module.export_weights(model)
    assert list(exported) == list(WEIGHT_NAMES)
    for key in WEIGHT_NAMES:
        assert exported[key].dtype == np.dtype(dtype), f"{name} exports {key} as {exported[key].dtype}"
        np.testing.assert_array_equal(exported[key], weights[key], err_msg=f"{name}: {key} changed in the round trip")


# --- one pass on real data -----------------------------------------------------------------

def one_pass(name, weights, images, labels, training):
    module, model, device = build(name, weights)
    model.train() if training else model.eval()
    X, y = inputs(module, device, images, labels, weights["conv1.weight"].dtype)
    return module.loss_and_gradients(model, X, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_mode_logits_loss_and_gradients_agree(first_batch, dtype):
    """From the canonical weights and one real batch: the same logits, loss and every gradient."""
    images, labels = first_batch
    weights = canonical_weights(0, dtype)
    results = {name: one_pass(name, weights, images, labels, training=True) for name in NAMES}
    bound = PASS_BOUND[dtype]
    for a, b in PAIRS:
        (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results[a], results[b]
        assert_close("training-mode logits", a, logits_a, b, logits_b, bound)
        assert_close("loss", a, loss_a, b, loss_b, bound)
        for key in PARAMETER_NAMES:
            assert_close(f"gradient of {key}", a, grads_a[key], b, grads_b[key], bound)
    assert all(results[name][1].dtype == np.dtype(dtype) for name in NAMES)


def test_inference_mode_from_canonical_weights_agrees(first_batch):
    """Moving mean 0, variance 1: inference mode is the identity-normalised network in all four."""
    images, labels = first_batch
    weights = canonical_weights(0, np.float64)
    results = {name: one_pass(name, weights, images, labels, training=False) for name in NAMES}
    for a, b in PAIRS:
        assert_close("inference-mode logits", a, results[a][1], b, results[b][1], FLOAT64_PASS)
        for key in PARAMETER_NAMES:
            assert_close(f"inference-mode gradient of {key}", a, results[a][2][key], b, results[b][2][key],
                         FLOAT64_PASS)


# --- inference after training: torch-builtin's unbiased running variance --------------------

INFERENCE_AFTER_STEPS = 5


def test_inference_after_training_agrees_except_torch_builtin(trajectories_float64, fashion_mnist):
    """After a few SGD steps the moving statistics have moved: inference uses them."""
    _, _, test_images, _ = fashion_mnist
    images = test_images[:500]
    trained = {name: trajectories_float64[name][1][INFERENCE_AFTER_STEPS - 1] for name in NAMES}
    logits = {name: predict(name, trained[name], images) for name in NAMES}
    biased = [name for name in NAMES if name != "torch-builtin"]
    for a, b in itertools.combinations(biased, 2):
        assert_close("inference-mode logits after training", a, logits[a], b, logits[b], FLOAT64_PASS)
    # torch-builtin's running variance is unbiased, so its inference differs visibly...
    assert np.max(np.abs(logits["torch-builtin"] - logits["torch-scratch"])) > 1e-6
    # ...and only because of that: with the scratch layer's variance put in, it agrees, within
    # the drift of its own few training steps (nn.BatchNorm's backward sums in another order).
    # tests/test_semantics.py asserts the n/(n-1) relation itself.
    corrected = dict(trained["torch-builtin"])
    corrected.update({key: trained["torch-scratch"][key] for key in MOVING_STAT_NAMES if key.endswith("moving_var")})
    assert_close("inference-mode logits, torch-builtin with biased moving variance", "torch-builtin",
                 predict("torch-builtin", corrected, images), "torch-scratch", logits["torch-scratch"],
                 FLOAT64_TRAJECTORY)


# --- errors and the batch of one -----------------------------------------------------------

class LinenLayer:
    """Linen's scratch layer with its variables, called and switched as the other frameworks' are."""

    def __init__(self, features, dims):
        self.module = linen_bn.BatchNorm(features, dims, param_dtype=jnp.float64)
        self.variables = {"params": {"gamma": jnp.ones(features), "beta": jnp.zeros(features)},
                          "batch_stats": {"moving_mean": jnp.zeros(features), "moving_var": jnp.ones(features)}}
        self.training = True

    def eval(self):
        self.training = False

    def __call__(self, X):
        Y, changed = self.module.apply(self.variables, X, use_running_average=not self.training,
                                       mutable=["batch_stats"])
        self.variables = {**self.variables, **changed}
        return Y


SCRATCH_LAYERS = {
    "torch": lambda features, dims: torch_bn.BatchNorm(features, dims).double(),
    "flax": lambda features, dims: flax_bn.BatchNorm(features, dims, param_dtype=jnp.float64),
    "linen": LinenLayer,
}


def array_for(framework, shape, dtype=np.float64):
    value = np.ones(shape, dtype) if np.dtype(dtype).kind != "f" else np.random.default_rng(0).random(shape).astype(dtype)
    return torch.from_numpy(value) if framework == "torch" else jnp.asarray(value)


@pytest.mark.parametrize("framework", SCRATCH_LAYERS)
def test_scratch_layer_refuses_input_of_wrong_rank(framework):
    layer = SCRATCH_LAYERS[framework](6, 4)
    for shape in [(8, 6), (8, 6, 5), (2, 8, 6, 5, 5)]:
        with pytest.raises(ValueError, match="expects 4-D input"):
            layer(array_for(framework, shape))
    with pytest.raises(ValueError, match="expects 2-D input"):
        SCRATCH_LAYERS[framework](6, 2)(array_for(framework, (8, 6, 3, 3)))


@pytest.mark.parametrize("framework", SCRATCH_LAYERS)
def test_scratch_layer_refuses_wrong_feature_count(framework):
    shape = (8, 5, 4, 4) if framework == "torch" else (8, 4, 4, 5)
    with pytest.raises(ValueError, match="has 6 features, input has 5"):
        SCRATCH_LAYERS[framework](6, 4)(array_for(framework, shape))
    with pytest.raises(ValueError, match="has 84 features, input has 120"):
        SCRATCH_LAYERS[framework](84, 2)(array_for(framework, (8, 120)))


@pytest.mark.parametrize("framework", SCRATCH_LAYERS)
def test_scratch_layer_refuses_integer_input(framework):
    with pytest.raises(TypeError, match="floating-point input"):
        SCRATCH_LAYERS[framework](3, 2)(array_for(framework, (8, 3), np.int64))


@pytest.mark.parametrize("framework", SCRATCH_LAYERS)
def test_scratch_layer_refuses_one_value_per_channel_in_training_only(framework):
    layer = SCRATCH_LAYERS[framework](3, 2)
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer(array_for(framework, (1, 3)))
    layer.eval()
    assert layer(array_for(framework, (1, 3))).shape == (1, 3)


@pytest.mark.parametrize("name", NAMES)
def test_training_batch_of_one_raises_the_same_error_in_all_six(name, first_batch):
    """nn.BatchNorm1d raises; the others would quietly divide by sqrt(eps). All six raise."""
    images, labels = first_batch
    module, model, device = build(name, canonical_weights(0, np.float64))
    model.train()
    X, y = inputs(module, device, images[:1], labels[:1], np.float64)
    with pytest.raises(ValueError, match="at least 2 examples per batch"):
        module.train_step(model, module.make_optimizer(model, 1.0), X, y)


def test_inference_batch_of_one_works_and_agrees(first_batch):
    images, _ = first_batch
    weights = canonical_weights(0, np.float64)
    logits = {name: predict(name, weights, images[:1]) for name in NAMES}
    for a, b in PAIRS:
        assert_close("inference-mode logits of one example", a, logits[a], b, logits[b], FLOAT64_PASS)


# --- where the moving statistics live --------------------------------------------------------

def test_torch_scratch_moving_statistics_are_buffers_that_move_and_save():
    module, model, _ = build("torch-scratch", canonical_weights(0))
    state = model.state_dict()
    assert {"bn1.moving_mean", "bn1.moving_var", "bn4.moving_var"} <= set(state)
    assert "bn1.moving_mean" not in dict(model.named_parameters())
    model = model.double()
    assert model.bn1.moving_var.dtype == torch.float64  # buffers follow .to(), unlike plain attributes


def test_flax_scratch_moving_statistics_are_batch_stats_the_optimizer_leaves_alone(first_batch):
    images, labels = first_batch
    module, model, device = build("flax-scratch", canonical_weights(0))
    stats = nnx.state(model, nnx.BatchStat)
    assert set(stats["bn1"]) == {"moving_mean", "moving_var"}
    optimizer = module.make_optimizer(model, 1.0)
    assert "moving_mean" not in nnx.state(optimizer.opt_state)  # no optimizer state for them
    model.train()
    X, y = inputs(module, device, images, labels, np.float32)
    module.train_step(model, optimizer, X, y)
    moved = module.export_weights(model)
    # One update from (0, 1) with momentum 0.9: 0.1 of the batch's statistics.
    assert np.all(np.abs(moved["bn1.moving_mean"]) > 0)
    assert np.all(moved["bn1.moving_var"] != 1)


def test_linen_scratch_moving_statistics_are_a_collection_outside_the_module(first_batch):
    """A Linen module holds nothing: the moving statistics are the variables' 'batch_stats'
    collection; the train state carries them beside the parameters, the optimizer has no state
    for them, and a step returns them moved, to be threaded into the next."""
    images, labels = first_batch
    module, model, device = build("linen-scratch", canonical_weights(0))
    assert set(model.variables["batch_stats"]["bn1"]) == {"moving_mean", "moving_var"}
    assert set(model.variables["params"]["bn1"]) == {"gamma", "beta"}
    optimizer = module.make_optimizer(model, 1.0)
    jax.tree.map(np.testing.assert_array_equal, optimizer.state.batch_stats, model.variables["batch_stats"])
    assert "moving_mean" not in str(optimizer.state.opt_state)  # no optimizer state for them
    model.train()
    X, y = inputs(module, device, images, labels, np.float32)
    before = model.variables["batch_stats"]
    module.train_step(model, optimizer, X, y)
    assert model.variables["batch_stats"] is optimizer.state.batch_stats is not before
    moved = module.export_weights(model)
    assert np.all(np.abs(moved["bn1.moving_mean"]) > 0)
    assert np.all(moved["bn1.moving_var"] != 1)


# --- the bound step compare.py's loop uses ---------------------------------------------------------

# Linen's bound step is train_step with the mode set, the same for both norms: one of them here.
@pytest.mark.parametrize("name", [name for name in NAMES if name != "linen-builtin"])
def test_bound_train_step_trains_as_train_step_across_evaluations(name, first_batch):
    """compare.py binds the step to the model once per epoch, after the last evaluation
    (bound_train_step; in NNX, nnx.cached_partial, which trains a copy of the model sharing its
    Variables). Two epochs of two steps, each followed by an evaluation, must give train_step's
    numbers in training mode exactly, and the model evaluated must be the one trained."""
    images, labels = first_batch
    results = {}
    for way in ("train_step", "bound_train_step"):
        module, model, device = build(name, canonical_weights(0, np.float64))
        optimizer = module.make_optimizer(model, 1.0)
        X, y = inputs(module, device, images, labels, np.float64)
        losses, logits = [], []
        for _ in range(2):
            model.eval()  # as after an evaluation: bound_train_step must put the model in training mode
            if way == "bound_train_step":
                step = module.bound_train_step(model, optimizer)
            else:
                model.train()
                step = partial(module.train_step, model, optimizer)
            losses += [float(step(X, y)[0]) for _ in range(2)]
            model.eval()
            logits.append(module.to_numpy(module.predict(model, X)))
        results[way] = losses, logits, module.export_weights(model)
    (losses, logits, weights), (bound_losses, bound_logits, bound_weights) = results.values()
    assert bound_losses == losses and len(set(losses)) == 4
    np.testing.assert_array_equal(np.stack(bound_logits), np.stack(logits))
    for key in WEIGHT_NAMES:
        np.testing.assert_array_equal(bound_weights[key], weights[key], err_msg=key)


# One implementation per framework: the dtype comes from the weights, the same way for both norms.
@pytest.mark.parametrize("name", ["torch-scratch", "flax-builtin", "linen-scratch"])
def test_float64_runs_in_float64(name, first_batch):
    images, labels = first_batch
    loss, logits, gradients = one_pass(name, canonical_weights(0, np.float64), images, labels, training=True)
    assert logits.dtype == np.float64 and np.asarray(loss).dtype == np.float64
    assert all(gradient.dtype == np.float64 for gradient in gradients.values())


def test_max_difference_reports_the_key():
    a = {"x": np.zeros(3), "y": np.zeros(2)}
    b = {"x": np.zeros(3), "y": np.array([0.0, 0.5])}
    assert max_difference(a, b, ["x", "y"]) == (0.5, "y")
