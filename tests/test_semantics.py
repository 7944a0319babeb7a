"""Every semantic difference between the frameworks, pinned (see the table in README.md).

Each test states what one framework does, so that it fails the day either side changes --
and with it the settings that make the six implementations agree.
"""

import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen, nnx

from common.init import BATCH_NORM_LAYERS, canonical_weights
from impls.flax import batch_norm as flax_bn
from impls.flax import lenet as flax_lenet
from impls.flax import train as flax_train
from impls.pytorch import batch_norm as torch_bn
from impls.pytorch import train as torch_train
from tests.conftest import FLOAT64_TRAJECTORY_BATCH, TRAJECTORY_STEPS
from tests.layers import LAYERS, numpy_batch_norm, to_nhwc
from tests.support import build, inputs
from tests.tolerances import FLOAT64_PASS, assert_close

RNG = np.random.default_rng(42)
BATCH_2D = 3.0 + 2.0 * RNG.standard_normal((32, 5))
BATCH_4D = 3.0 + 2.0 * RNG.standard_normal((8, 3, 6, 6))


def moving_stats_after_one_update(name, X):
    gamma, beta = np.ones(X.shape[1]), np.zeros(X.shape[1])
    _, _, moving_mean, moving_var = LAYERS[name]([X], gamma, beta, np.zeros_like(X))
    return moving_mean, moving_var


def batch_statistics(X):
    axes = (0,) if X.ndim == 2 else (0, 2, 3)
    return X.mean(axis=axes), X.var(axis=axes), X.size // X.shape[1]


# --- momentum ----------------------------------------------------------------------------------

def test_the_chapter_momentum_weighs_the_old_statistics():
    assert torch_bn.MOMENTUM == flax_bn.MOMENTUM == 0.9
    assert torch_bn.EPS == flax_bn.EPS == 1e-5
    mean, var, _ = batch_statistics(BATCH_2D)
    for name in ("torch-scratch", "flax-scratch", "flax-builtin", "linen-scratch", "linen-builtin"):
        moving_mean, moving_var = moving_stats_after_one_update(name, BATCH_2D)
        # From (0, 1): moving = 0.9 * old + 0.1 * batch.
        np.testing.assert_allclose(moving_mean, 0.1 * mean, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(moving_var, 0.9 + 0.1 * var, rtol=1e-12, err_msg=name)


def test_pytorch_momentum_weighs_the_new_batch():
    """nn.BatchNorm: running = (1 - m) * running + m * batch. Its m=0.1 is the chapter's 0.9."""
    mean, _, _ = batch_statistics(BATCH_2D)
    layer = torch.nn.BatchNorm1d(5, momentum=0.25, dtype=torch.float64)
    layer(torch.from_numpy(BATCH_2D))
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.25 * mean, rtol=1e-12)
    assert torch.nn.BatchNorm1d(5).momentum == 0.1
    model = build("torch-builtin", canonical_weights(0))[1]
    assert all(getattr(model, layer).momentum == pytest.approx(1 - torch_bn.MOMENTUM) for layer in BATCH_NORM_LAYERS)


def test_flax_momentum_weighs_the_old_statistics_with_default_0_99():
    mean, _, _ = batch_statistics(BATCH_2D)
    layer = nnx.BatchNorm(5, momentum=0.25, use_fast_variance=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layer.mean.set_value(jnp.zeros(5, jnp.float64))  # float32 by default (see below)
    layer.var.set_value(jnp.ones(5, jnp.float64))
    layer(jnp.asarray(BATCH_2D))
    np.testing.assert_allclose(np.asarray(layer.mean[...]), 0.75 * mean, rtol=1e-12)
    assert nnx.BatchNorm(5, rngs=nnx.Rngs(0)).momentum == 0.99
    model = build("flax-builtin", canonical_weights(0))[1]
    for layer in BATCH_NORM_LAYERS:
        bn = getattr(model, layer)
        assert (bn.momentum, bn.epsilon, bn.use_fast_variance) == (flax_bn.MOMENTUM, flax_bn.EPS, False)


def test_linen_momentum_weighs_the_old_statistics_with_default_0_99():
    mean, _, _ = batch_statistics(BATCH_2D)
    layer = linen.BatchNorm(momentum=0.25, use_fast_variance=False, param_dtype=jnp.float64)
    variables = {"params": {"scale": jnp.ones(5), "bias": jnp.zeros(5)},
                 "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}
    _, changed = layer.apply(variables, jnp.asarray(BATCH_2D), use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(changed["batch_stats"]["mean"]), 0.75 * mean, rtol=1e-12)
    assert linen.BatchNorm().momentum == 0.99
    model = build("linen-builtin", canonical_weights(0))[1]
    for layer in BATCH_NORM_LAYERS:
        bn = getattr(model.module.bind(model.variables), layer)
        assert (bn.momentum, bn.epsilon, bn.use_fast_variance) == (flax_bn.MOMENTUM, flax_bn.EPS, False)


# --- PyTorch's unbiased running variance --------------------------------------------------------

@pytest.mark.parametrize("X", [BATCH_2D, BATCH_4D], ids=["2-D", "4-D"])
def test_pytorch_running_variance_is_unbiased_by_exactly_n_over_n_minus_1(X):
    _, var, n = batch_statistics(X)
    _, torch_builtin_var = moving_stats_after_one_update("torch-builtin", X)
    _, scratch_var = moving_stats_after_one_update("torch-scratch", X)
    np.testing.assert_allclose((torch_builtin_var - 0.9) / (scratch_var - 0.9), n / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(scratch_var, 0.9 + 0.1 * var, rtol=1e-12)


def test_n_over_n_minus_1_relation_holds_after_training(trajectories_float64):
    """After K steps from variance 1: torch-builtin's (var - 0.9^K) is n/(n-1) times the others'.

    n is the number of values per channel in a batch of B: B*24*24 for bn1, B*8*8 for bn2, B for
    bn3 and bn4 (every step of the trajectory has a full batch)."""
    decay = 0.9 ** TRAJECTORY_STEPS
    batch = FLOAT64_TRAJECTORY_BATCH
    values_per_channel = {"bn1": batch * 24 * 24, "bn2": batch * 8 * 8, "bn3": batch, "bn4": batch}
    unbiased = trajectories_float64["torch-builtin"][1][-1]
    for name in ("torch-scratch", "flax-scratch", "flax-builtin", "linen-scratch", "linen-builtin"):
        biased = trajectories_float64[name][1][-1]
        for layer, n in values_per_channel.items():
            ratio = (unbiased[f"{layer}.moving_var"] - decay) / (biased[f"{layer}.moving_var"] - decay)
            np.testing.assert_allclose(ratio, n / (n - 1), rtol=1e-9,
                                       err_msg=f"{layer}: torch-builtin vs {name} moving variance ratio")


# --- Flax's fast variance ----------------------------------------------------------------------

def flax_builtin_variance(X, use_fast_variance, dtype):
    layer = nnx.BatchNorm(X.shape[-1], momentum=0.0, use_fast_variance=use_fast_variance,
                          dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    layer.var.set_value(jnp.zeros(X.shape[-1], dtype))
    layer(jnp.asarray(X, dtype))
    return np.asarray(layer.var[...], np.float64)  # momentum 0: the batch variance itself


def test_flax_fast_variance_loses_precision_where_two_pass_does_not():
    """E[x^2] - E[x]^2 cancels catastrophically when the mean is large against the spread."""
    X = 1000.0 + RNG.standard_normal((256, 8))
    exact = X.var(axis=0)
    two_pass = flax_builtin_variance(X, use_fast_variance=False, dtype=jnp.float32)
    fast = flax_builtin_variance(X, use_fast_variance=True, dtype=jnp.float32)
    assert np.max(np.abs(two_pass - exact) / exact) < 1e-4
    # float32 keeps ~7 digits of x^2 ~ 1e6: the variance (~1) comes out wrong by ~10%, or worse.
    assert np.max(np.abs(fast - exact) / exact) > 1e-2
    assert nnx.BatchNorm(8, rngs=nnx.Rngs(0)).use_fast_variance is True  # the default


def test_flax_fast_variance_is_harmless_on_lenet_activations(first_batch):
    """How large the difference is where this project uses batch norm: LeNet's first conv output.

    Measured on the CPU: 1e-6 relative with YNNPACK's float32 reductions (impls/flax/__init__.py
    keeps them, and tests/test_cpu_conv.py checks that it does), 1.1e-4 with XLA:CPU's own."""
    images, labels = first_batch
    module, model, device = build("flax-builtin", canonical_weights(0))
    X, _ = inputs(module, device, images, labels, np.float32)
    activations = np.asarray(model.conv1(X), np.float64)
    two_pass = flax_builtin_variance(activations, False, jnp.float32)
    fast = flax_builtin_variance(activations, True, jnp.float32)
    relative = np.max(np.abs(fast - two_pass) / two_pass)
    assert 0 < relative < 1e-4, f"fast vs two-pass variance on conv1 output: {relative:.2e} relative"


# --- layout and the flatten order ------------------------------------------------------------

def test_flatten_order_needs_fc1_permuted(first_batch):
    """NHWC flattens (h, w, c), NCHW (c, h, w): fc1 must be permuted at the boundary."""
    images, labels = first_batch
    weights = canonical_weights(0, np.float64)
    logits = {}
    for name in ("torch-scratch", "flax-scratch"):
        module, model, device = build(name, weights)
        model.train()
        logits[name] = module.loss_and_gradients(model, *inputs(module, device, images, labels, np.float64))[1]
    assert_close("logits", "torch-scratch", logits["torch-scratch"], "flax-scratch", logits["flax-scratch"],
                 FLOAT64_PASS)
    # The naive conversion, a plain transpose, reads the features in the wrong order.
    module, model, device = build("flax-scratch", weights)
    model.fc1.kernel.set_value(jnp.asarray(weights["fc1.weight"].T))
    model.train()
    wrong = module.loss_and_gradients(model, *inputs(module, device, images, labels, np.float64))[1]
    assert np.max(np.abs(wrong - logits["torch-scratch"])) > 1e-2


def test_layout_conversions_are_the_known_permutations():
    weights = canonical_weights(0, np.float64)
    conv = flax_lenet.to_flax_layout("conv2.weight", weights["conv2.weight"])
    assert conv.shape == (5, 5, 6, 16)  # OIHW -> HWIO
    assert conv[1, 2, 3, 4] == weights["conv2.weight"][4, 3, 1, 2]
    fc1 = flax_lenet.to_flax_layout("fc1.weight", weights["fc1.weight"])
    # Input feature (h=1, w=2, c=3) of NHWC is feature c*16 + h*4 + w of NCHW.
    assert fc1[1 * 64 + 2 * 16 + 3, 7] == weights["fc1.weight"][7, 3 * 16 + 1 * 4 + 2]


# --- channel statistics on NHWC --------------------------------------------------------------

def test_nhwc_channel_statistics_gather_over_batch_and_space():
    """Regression: the JAX edition of the chapter reduces NHWC data over axes (0, 2, 3)."""
    X = 5.0 * np.arange(1, 4).reshape(1, 3, 1, 1) + RNG.standard_normal((8, 3, 6, 6))  # distinct channel means
    X_nhwc = jnp.asarray(to_nhwc(X))
    gamma, beta = jnp.ones(3, jnp.float64), jnp.zeros(3, jnp.float64)
    Y, moving_mean, _ = flax_bn.batch_norm(X_nhwc, gamma, beta, jnp.zeros(3), jnp.ones(3), 1e-5, 0.9, training=True)
    np.testing.assert_allclose(np.asarray(Y).mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(Y).var(axis=(0, 1, 2)), 1, atol=1e-3)
    np.testing.assert_allclose(np.asarray(moving_mean), 0.1 * X.mean(axis=(0, 2, 3)), rtol=1e-12)
    # The mistake, reproduced: over (0, 2, 3) of NHWC, the statistics are per image row, and
    # the channels, which differ by 5 here, are left far from centred.
    wrong_mean = X_nhwc.mean(axis=(0, 2, 3), keepdims=True)
    wrong_std = jnp.sqrt(((X_nhwc - wrong_mean) ** 2).mean(axis=(0, 2, 3), keepdims=True) + 1e-5)
    wrongly_normalised = np.asarray((X_nhwc - wrong_mean) / wrong_std)
    assert np.max(np.abs(wrongly_normalised.mean(axis=(0, 1, 2)))) > 0.5


# --- training versus inference ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch-scratch", "torch-builtin", "flax-scratch", "flax-builtin", "linen-scratch",
                                  "linen-builtin"])
def test_train_and_eval_switch_the_statistics(name, first_batch):
    """train(): batch statistics, so an example's output depends on its batch mates.
    eval(): moving statistics, so it does not; and eval() leaves the moving statistics alone."""
    images, labels = first_batch
    module, model, device = build(name, canonical_weights(0, np.float64))
    whole, part = inputs(module, device, images, labels, np.float64)[0], inputs(module, device, images[:16], labels[:16], np.float64)[0]
    model.eval()
    before = module.export_weights(model)
    np.testing.assert_allclose(module.to_numpy(module.predict(model, part)),
                               module.to_numpy(module.predict(model, whole))[:16], atol=FLOAT64_PASS)
    assert all(np.array_equal(before[key], value) for key, value in module.export_weights(model).items())
    model.train()
    in_batch = module.to_numpy(module.predict(model, whole))[:16]
    assert np.max(np.abs(module.to_numpy(module.predict(model, part)) - in_batch)) > 1e-3


def test_pytorch_scratch_layer_follows_train_mode_not_grad_mode():
    """The chapter switched on torch.is_grad_enabled(); here no_grad in train mode still trains."""
    layer = torch_bn.BatchNorm(5, num_dims=2).double()
    layer.train()
    with torch.no_grad():
        Y = layer(torch.from_numpy(BATCH_2D))
    np.testing.assert_allclose(Y.numpy().mean(axis=0), 0, atol=1e-12)
    assert torch.all(layer.moving_mean != 0)


# --- defaults this project overrides ---------------------------------------------------------

def test_default_initialisations_differ_and_are_overridden():
    """PyTorch: kaiming-uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in)); Flax, NNX and Linen alike:
    lecun-normal, std 1/sqrt(fan_in), unbounded. build_lenet replaces them with the canonical weights."""
    torch_weight = torch.nn.Linear(256, 120).weight.detach().numpy()
    flax_kernels = {"nnx": np.asarray(nnx.Linear(256, 120, rngs=nnx.Rngs(0)).kernel[...]),
                    "linen": np.asarray(linen.Dense(120).init(jax.random.key(0), jnp.ones((1, 256)))["params"]["kernel"])}
    assert np.max(np.abs(torch_weight)) <= 1 / 16
    for kernel in flax_kernels.values():
        assert kernel.shape == (256, 120)
        assert np.max(np.abs(kernel)) > 1 / 16  # a normal's tails pass the uniform's bound
        assert abs(kernel.std() - 1 / 16) < 0.1 / 16
    weights = canonical_weights(0)
    for name in ("flax-builtin", "linen-builtin"):
        module, model, _ = build(name, weights)
        np.testing.assert_array_equal(module.export_weights(model)["fc1.weight"], weights["fc1.weight"])


def test_flax_builtin_keeps_running_statistics_in_float32_whatever_param_dtype():
    """nnx.BatchNorm creates mean and var as float32; build_lenet replaces them for float64 runs."""
    layer = nnx.BatchNorm(4, param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert layer.scale[...].dtype == jnp.float64 and layer.mean[...].dtype == jnp.float32
    model = build("flax-builtin", canonical_weights(0, np.float64))[1]
    assert model.bn1.mean[...].dtype == jnp.float64


def test_linen_builtin_creates_running_statistics_in_float32_unless_told_otherwise():
    """linen.BatchNorm's init makes mean and var float32 whatever param_dtype says, unless
    force_float32_reductions=False; build_lenet brings the run's own (float64 here)."""
    example = jnp.ones((2, 4), jnp.float64)
    variables = linen.BatchNorm(param_dtype=jnp.float64, dtype=jnp.float64).init(jax.random.key(0), example,
                                                                               use_running_average=False)
    assert variables["params"]["scale"].dtype == jnp.float64 and variables["batch_stats"]["mean"].dtype == jnp.float32
    variables = linen.BatchNorm(param_dtype=jnp.float64, force_float32_reductions=False).init(
        jax.random.key(0), example, use_running_average=False)
    assert variables["batch_stats"]["mean"].dtype == jnp.float64
    model = build("linen-builtin", canonical_weights(0, np.float64))[1]
    assert model.variables["batch_stats"]["bn1"]["mean"].dtype == jnp.float64


def test_nnx_batch_norm_rounds_scale_bias_and_running_statistics_to_its_dtype():
    """Under mixed precision (dtype=bfloat16, param_dtype=float32), nnx.BatchNorm's default
    promote_dtype (flax 0.12.1 and later) casts its input, scale, bias and running statistics to
    bfloat16 before it normalises: in inference its output is the same whether they hold their
    values or those values rounded to bfloat16. linen.BatchNorm uses them in float32
    (force_float32_reductions), and so does nnx.BatchNorm given the project's promote_input_only;
    those two agree bitwise, and see the rounding."""
    X = jnp.asarray(3.0 + 2.0 * RNG.standard_normal((16, 4)), jnp.bfloat16)
    # Values that bfloat16 cannot hold: 1 + 2^-10 rounds to 1, and so on.
    variables = {"scale": np.full(4, 1 + 2 ** -10), "bias": np.full(4, 0.1), "mean": np.full(4, 3.01),
                 "var": np.full(4, 4.02)}
    rounded = {key: np.asarray(jnp.asarray(value, jnp.bfloat16), np.float32) for key, value in variables.items()}

    def nnx_output(values, **options):
        layer = nnx.BatchNorm(4, dtype=jnp.bfloat16, param_dtype=jnp.float32, use_running_average=True,
                              rngs=nnx.Rngs(0), **options)
        for key, value in values.items():
            getattr(layer, key).set_value(jnp.asarray(value, jnp.float32))
        return np.asarray(layer(X), np.float32)

    def linen_output(values):
        layer = linen.BatchNorm(dtype=jnp.bfloat16, param_dtype=jnp.float32, use_running_average=True)
        return np.asarray(layer.apply({"params": {"scale": jnp.asarray(values["scale"], jnp.float32),
                                                  "bias": jnp.asarray(values["bias"], jnp.float32)},
                                       "batch_stats": {"mean": jnp.asarray(values["mean"], jnp.float32),
                                                       "var": jnp.asarray(values["var"], jnp.float32)}}, X), np.float32)

    np.testing.assert_array_equal(nnx_output(variables), nnx_output(rounded))
    ours = nnx_output(variables, promote_dtype=flax_lenet.promote_input_only)
    np.testing.assert_array_equal(ours, linen_output(variables))
    assert not np.array_equal(ours, nnx_output(rounded, promote_dtype=flax_lenet.promote_input_only))
    assert not np.array_equal(ours, nnx_output(variables))


@pytest.mark.parametrize("name", ["linen-scratch", "linen-builtin"])
def test_linen_training_needs_batch_stats_marked_mutable(name, first_batch):
    """Linen's training mode writes the moving statistics into the 'batch_stats' collection, which
    apply() refuses unless told it is mutable; inference reads them and needs nothing."""
    images, labels = first_batch
    module, model, device = build(name, canonical_weights(0, np.float64))
    X, _ = inputs(module, device, images, labels, np.float64)
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
        model.module.apply(model.variables, X, train=True)
    logits = model.module.apply(model.variables, X, train=False)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(
        model.module.apply(model.variables, X, train=False, mutable=["batch_stats"])[0]))


def test_reference_matches_pytorch_semantics_table():
    """The NumPy reference's unbiased switch reproduces nn.BatchNorm exactly; biased the rest."""
    X = BATCH_4D
    gamma, beta, cotangent = np.ones(3), np.zeros(3), np.zeros_like(X)
    for name, unbiased in (("torch-builtin", True), ("flax-builtin", False)):
        reference = numpy_batch_norm([X], gamma, beta, cotangent, unbiased_running_var=unbiased)
        np.testing.assert_allclose(moving_stats_after_one_update(name, X)[1], reference[3], rtol=1e-12)


def test_jax_is_in_64_bit_mode_for_the_float64_suite():
    assert jax.config.jax_enable_x64


# --- float32 arithmetic on NVIDIA GPUs ---------------------------------------------------------
# TensorFloat-32 keeps 10 of float32's 23 mantissa bits in convolutions and matrix products.
# The frameworks' defaults differ; compare.py sets both alike (allow_tf32), IEEE float32 unless --tf32.

def default_torch_precisions():
    """(cuDNN convolutions, matrix products, matrix products' TF32 switch) in a fresh interpreter,
    untouched by any test."""
    code = ("import torch; print(torch.backends.cudnn.conv.fp32_precision, "
            "torch.backends.cuda.matmul.fp32_precision, torch.backends.cuda.matmul.allow_tf32)")
    return tuple(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())


@pytest.fixture
def restore_float32_precision():
    saved_jax = jax.config.jax_default_matmul_precision
    saved_torch = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision,
                   torch.backends.cuda.matmul.fp32_precision)
    yield
    jax.config.update("jax_default_matmul_precision", saved_jax)
    (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cuda.matmul.fp32_precision) = saved_torch


# Forward and backward: 2 + 3 convolutions (conv1 needs no input gradient), 3 + 6 matrix products.
STEP_OPERATIONS = {"convolution": 5, "dot_general": 9}


def flax_step_precisions_for_cuda():
    """({operation: count}, {precision}): how many convolutions and matrix products Flax's float32
    training step has as lowered for a CUDA GPU (lowering needs no GPU), and the precisions they
    carry, operands of all of them together."""
    module, model, _ = build("flax-builtin", canonical_weights(0, np.float32))
    optimizer = module.make_optimizer(model, 1.0)
    graphdef, state = nnx.split((model, optimizer))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    images, labels = jax.ShapeDtypeStruct((512, 28, 28, 1), jnp.float32), jax.ShapeDtypeStruct((512,), jnp.int32)
    indices = jax.ShapeDtypeStruct((256,), jnp.int32)
    text = flax_train.train_on_batch.trace(graphdef, shapes, images, labels, indices).lower(
        lowering_platforms=("cuda",)).as_text()
    counts, precisions = dict.fromkeys(STEP_OPERATIONS, 0), set()
    for line in text.splitlines():
        operation = re.search(r"stablehlo\.(convolution|dot_general)", line)
        if operation:
            counts[operation.group(1)] += 1
            # dot_general prints `precision = [A, B]`, convolution `precision_config = [#stablehlo<precision A>, ...]`.
            precision = re.search(r"precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)>?, "
                                  r"(?:#stablehlo<precision )?(\w+)", line)
            precisions.update(precision.groups() if precision else ["DEFAULT"])
    return counts, precisions


def test_pytorch_default_is_tf32_in_convolutions_only():
    # "none" defers to the older switch, allow_tf32, which is off for matrix products.
    assert default_torch_precisions() == ("tf32", "none", "False")


def test_jax_default_leaves_precision_to_the_gpu_which_means_tf32(restore_float32_precision):
    jax.config.update("jax_default_matmul_precision", None)
    counts, precisions = flax_step_precisions_for_cuda()
    assert counts == STEP_OPERATIONS
    # DEFAULT is "the fastest the hardware offers": TF32 on NVIDIA's Ampere and later (JAX's docs).
    assert precisions == {"DEFAULT"}


@pytest.mark.parametrize("tf32, torch_precision, jax_precision",
                         [(False, "ieee", "HIGHEST"), (True, "tf32", "HIGH")], ids=["ieee", "tf32"])
def test_allow_tf32_sets_both_frameworks_alike(tf32, torch_precision, jax_precision, restore_float32_precision):
    torch_train.allow_tf32(tf32)
    flax_train.allow_tf32(tf32)
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == (
        torch_precision, torch_precision)
    # HIGHEST is float32; HIGH is TF32 on NVIDIA GPUs (bfloat16_3x on TPUs).
    counts, precisions = flax_step_precisions_for_cuda()
    assert counts == STEP_OPERATIONS
    assert precisions == {jax_precision}
