"""Mixed precision (--dtype bf16-mixed): bfloat16 convolutions and matrix products, float32
parameters, optimizer state and batch-norm statistics, in each framework's own idiom
(torch.autocast; Flax's dtype and param_dtype).

Which operation runs in which type is read from the frameworks themselves: PyTorch's operations as
autocast dispatched them (a TorchDispatchMode sees every aten operation of the forward and the
backward pass with its inputs), JAX's from the lowered program (StableHLO). What the suite expects
is one table for all six implementations.
"""

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common.init import SHAPING_PARAMETER_NAMES, WEIGHT_NAMES, canonical_weights
from tests.support import NAMES, build, max_difference, trajectory
from tests.tolerances import BF16_FIRST_STEP, BF16_TRAJECTORY_LOSS, assert_close

# Each batch-norm layer's number of features: an operation over a tensor with that many channels
# and over every other axis is a batch-norm statistic.
BATCH_NORM_FEATURES = {6, 16, 120, 84}

# What every implementation computes in which type under bf16-mixed (training step, batch 256).
EXPECTED_FORWARD = {"convolution": {"bfloat16"}, "matrix product": {"bfloat16"}, "sigmoid": {"bfloat16"},
                    "pooling": {"bfloat16"}, "batch-norm statistics": {"float32"}}
EXPECTED_BACKWARD = {"convolution": {"bfloat16"}, "matrix product": {"bfloat16"}}

BF16_STEPS = 5


# --- PyTorch: the operations as dispatched -------------------------------------------------------

class RecordOperations(TorchDispatchMode):
    """Every aten operation that runs, with its tensor inputs and outputs (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        outputs = function(*args, **(kwargs or {}))
        tensors = [value for value in tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
        results = [value for value in tree_leaves(outputs) if isinstance(value, torch.Tensor)]
        self.operations.append((function.__name__, tensors, results, args))
        return outputs


def pytorch_kind(name, inputs, outputs, args):
    """(kind, dtype) of one recorded aten operation, or None for the others."""
    floating = [tensor.dtype for tensor in inputs if tensor.is_floating_point()]
    base = name.split(".")[0]
    if base in ("convolution", "convolution_backward"):
        return "convolution", floating
    if base in ("addmm", "mm"):
        return "matrix product", floating
    if base in ("sigmoid", "sigmoid_backward"):
        return "sigmoid", floating
    if base.startswith("avg_pool2d"):
        return "pooling", floating
    if "batch_norm" in base and len(outputs) >= 3:
        # nn.BatchNorm's kernel computes the statistics inside; it returns the batch's mean and
        # inverse standard deviation (for the backward pass) in the type it computed them in.
        return "batch-norm statistics", [outputs[1].dtype, outputs[2].dtype]
    if base == "sum" and inputs and inputs[0].ndim in (2, 4) and inputs[0].shape[1] in BATCH_NORM_FEATURES:
        dims = sorted(int(axis) % inputs[0].ndim for axis in args[1])
        if dims == [axis for axis in range(inputs[0].ndim) if axis != 1]:
            return "batch-norm statistics", floating + [outputs[0].dtype]
    return None


def pytorch_operation_types(model, images, labels):
    """({kind: dtypes} of the forward pass, {kind: dtypes} of the backward pass) of one training step."""
    model.train()
    phases = []
    with RecordOperations() as forward:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    with RecordOperations() as backward:
        loss.backward()
    for recorder in (forward, backward):
        kinds = {}
        for operation in recorder.operations:
            found = pytorch_kind(*operation)
            if found:
                kind, dtypes = found
                kinds.setdefault(kind, set()).update(str(dtype).removeprefix("torch.") for dtype in dtypes)
        phases.append(kinds)
    return tuple(phases)


# --- JAX: the lowered program --------------------------------------------------------------------

MLIR_TYPES = {"bf16": "bfloat16", "f32": "float32", "f64": "float64"}


def operations(operation):
    for region in operation.regions:
        for block in region.blocks:
            for inner in block.operations:
                yield inner.operation
                yield from operations(inner.operation)


def element_type(value):
    return MLIR_TYPES.get(str(value.type.element_type), str(value.type.element_type))


def types_downstream(value, largest):
    """The types of `value` and of every value computed from it while the values stay per-channel
    vectors (at most `largest` elements): the types a statistic is kept in until it meets the
    batch. (jnp.sum and jnp.mean sum bfloat16 in float32 and round the result back to bfloat16.)"""
    types, frontier = set(), [value]
    while frontier:
        value = frontier.pop()
        types.add(element_type(value))
        for use in value.uses:
            frontier.extend(result for result in use.owner.results
                            if hasattr(result.type, "shape") and int(np.prod(result.type.shape)) <= largest)
    return types


def jax_kinds(lowered):
    """{kind: dtypes} over the operations of a lowered JAX program."""
    kinds = {}
    for operation in operations(lowered.compiler_ir("stablehlo").operation):
        kind, name = None, operation.name
        if name == "stablehlo.convolution":
            kind = "convolution"
        elif name == "stablehlo.dot_general":
            kind = "matrix product"
        elif name in ("stablehlo.logistic", "stablehlo.exponential"):
            kind = "sigmoid"  # the forward pass's only exponentials are its sigmoids' (jax.nn.sigmoid)
        elif name == "stablehlo.reduce_window":
            kind = "pooling"
        elif name == "stablehlo.reduce":
            shape = operation.operands[0].type.shape
            dims = sorted(operation.attributes["dimensions"])
            if len(shape) in (2, 4) and shape[-1] in BATCH_NORM_FEATURES and dims == list(range(len(shape) - 1)):
                kind = "batch-norm statistics"
        if kind == "sigmoid" and operation.operands[0].type.shape[-1] == 10:
            continue  # the loss's own exponential (log-softmax, in float32) is not the model's
        if kind == "batch-norm statistics":
            # Summed in the input's type, and kept in the type the sum goes on in.
            features = operation.operands[0].type.shape[-1]
            kinds.setdefault(kind, set()).update({element_type(operation.operands[0])}
                                                 | types_downstream(operation.results[0], features))
        elif kind:
            kinds.setdefault(kind, set()).add(element_type(operation.operands[0]))
    return kinds


def jax_operation_types(module, model, images, labels):
    """({kind: dtypes} of the forward pass in training mode, {kind: dtypes} of the whole training
    step, as JAX lowers them (the fast path's compiled step: the same sgd_step as the eager one's)."""
    import jax  # noqa: PLC0415
    X, y = module.to_device(images, labels, None, np.float32)
    trainer = module.FastTrainer(model, module.make_optimizer(model, 1.0), X, y, use_scan=False)
    indices = jax.numpy.arange(len(labels), dtype=jax.numpy.int32)
    step = trainer.train_on_batch.lower(*trainer.static_arguments, trainer.state, X, y, indices)
    if module.FRAMEWORK == "linen":
        forward = jax.jit(lambda variables, X: model.module.apply(variables, X, train=True, mutable=["batch_stats"]))
        forward = forward.lower(model.variables, X)
    else:
        from flax import nnx  # noqa: PLC0415
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, X: nnx.merge(graphdef, state)(X)).lower(state, X)
    return jax_kinds(forward), jax_kinds(step)


def operation_types(name, first_batch):
    module, model, _ = build(name, canonical_weights(0, np.float32), "bfloat16")
    images, labels = first_batch
    if module.FRAMEWORK == "pytorch":
        return pytorch_operation_types(model, *module.to_device(images, labels, "cpu", np.float32))
    from common.data import to_layout  # noqa: PLC0415
    return jax_operation_types(module, model, to_layout(images, module.LAYOUT), labels)


@pytest.mark.parametrize("name", NAMES)
def test_which_operations_run_in_bfloat16(name, first_batch):
    """Convolutions and matrix products (forward and backward), the sigmoids and the pooling in
    bfloat16; the batch-norm statistics in float32: the same table for all six, read from autocast's
    dispatch (PyTorch) and the lowered program (JAX). Leaving one framework's convolutions in
    float32, or computing one implementation's statistics in bfloat16, changes its table."""
    forward, whole_step = operation_types(name, first_batch)
    assert forward == EXPECTED_FORWARD, f"{name}, forward pass: {forward}"
    backward = {kind: whole_step[kind] for kind in EXPECTED_BACKWARD}
    assert backward == EXPECTED_BACKWARD, f"{name}, training step: {whole_step}"


def test_float32_runs_every_operation_in_float32(first_batch):
    """The same reading of a float32 model finds no bfloat16: the tables above come from the
    precision setting, not from the way they are read."""
    for name in ("torch-builtin", "flax-scratch"):
        module, model, _ = build(name, canonical_weights(0, np.float32))
        images, labels = first_batch
        if module.FRAMEWORK == "pytorch":
            forward, backward = pytorch_operation_types(model, *module.to_device(images, labels, "cpu", np.float32))
        else:
            from common.data import to_layout  # noqa: PLC0415
            forward, backward = jax_operation_types(module, model, to_layout(images, module.LAYOUT), labels)
        assert set().union(*forward.values(), *backward.values()) == {"float32"}, (name, forward, backward)


# --- state: parameters, optimizer, moving statistics -----------------------------------------------

def model_state_dtypes(module, model, optimizer):
    """The dtypes of every array the model and its optimizer keep between steps."""
    if module.FRAMEWORK == "pytorch":
        arrays = list(model.state_dict().values()) + tree_leaves(optimizer.state_dict()["state"])
        return {str(array.dtype).removeprefix("torch.") for array in arrays if array.is_floating_point()}
    import jax  # noqa: PLC0415
    if module.FRAMEWORK == "linen":
        leaves = jax.tree.leaves(optimizer.state)
    else:
        from flax import nnx  # noqa: PLC0415
        leaves = jax.tree.leaves(nnx.state((model, optimizer)))
    return {str(leaf.dtype) for leaf in leaves if np.issubdtype(leaf.dtype, np.floating) or "float" in str(leaf.dtype)}


@pytest.mark.parametrize("name", NAMES)
def test_parameters_optimizer_and_moving_statistics_stay_float32(name, trajectories_bf16):
    """After bf16-mixed training steps, everything a model and its optimizer keep is float32."""
    module, model, optimizer = trajectories_bf16[name][2]
    assert model_state_dtypes(module, model, optimizer) == {"float32"}
    weights = module.export_weights(model)
    assert {str(weights[key].dtype) for key in WEIGHT_NAMES} == {"float32"}


# --- what the chapter's statistics in the input's type lose ---------------------------------------

def conv1_output(first_batch):
    """LeNet's first convolution on the first batch, in bfloat16 as autocast computes it: the
    input of the first batch-norm layer under mixed precision (256 x 6 x 24 x 24, NCHW)."""
    weights = canonical_weights(0, np.float32)
    images = torch.from_numpy(np.array(first_batch[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.nn.functional.conv2d(images, torch.from_numpy(weights["conv1.weight"]),
                                          torch.from_numpy(weights["conv1.bias"]))


def batch_statistics_reference(X):
    """The batch's mean, biased variance and normalised values (eps 1e-5) in float64, NCHW."""
    X64 = X.to(torch.float64).numpy()
    mean, var = X64.mean((0, 2, 3)), X64.var((0, 2, 3))
    return mean, var, (X64 - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + 1e-5)


def errors(reference, mean, var, Y):
    """(worst relative error of the mean, of the variance; worst abs error of the normalised output)."""
    mean64, var64, Y64 = reference
    return (float(np.max(np.abs(mean - mean64) / np.abs(mean64))), float(np.max(np.abs(var - var64) / var64)),
            float(np.max(np.abs(Y - Y64))))


def test_statistics_in_bfloat16_lose_what_float32_keeps(first_batch):
    """The chapter's code computes the statistics in its input's type: bfloat16 under autocast.
    The scratch layers compute them in their moving statistics' type (float32); handed bfloat16
    moving statistics, they compute them in bfloat16 as the chapter's code would. Measured on the
    input of LeNet's first batch-norm layer (147,456 values per channel), the same in PyTorch and JAX:
    in float32, mean and variance within 5e-7 of float64 (PyTorch; 7e-8 in JAX, whose reductions are
    YNNPACK's); in bfloat16, 3.2e-3 and 3.6e-3, for both sum in float32 inside and round the result:
    8 significant bits. The normalised output, itself rounded to bfloat16 (1.6e-2 on values near 4),
    is then off by 4.6e-2 instead of that 1.6e-2: three times the rounding of its own type."""
    import jax.numpy as jnp  # noqa: PLC0415

    from impls.flax.batch_norm import batch_norm as flax_batch_norm  # noqa: PLC0415
    from impls.pytorch.batch_norm import batch_norm as torch_batch_norm  # noqa: PLC0415
    X = conv1_output(first_batch)
    assert X.dtype == torch.bfloat16
    reference = batch_statistics_reference(X)
    X_flax = jnp.asarray(X.to(torch.float32).numpy().transpose(0, 2, 3, 1), jnp.bfloat16)  # NHWC
    measured = {}
    for statistics in ("float32", "bfloat16"):
        # The first training step with momentum 0: the new moving statistics are the batch's own.
        state = [np.ones(6), np.zeros(6), np.zeros(6), np.ones(6)]  # gamma, beta, moving mean, moving var
        options = dict(eps=1e-5, momentum=0.0, training=True)
        Y, mean, var = torch_batch_norm(X, *(torch.tensor(value, dtype=getattr(torch, statistics)) for value in state),
                                        **options)
        measured["pytorch", statistics] = errors(reference, mean.double().numpy(), var.double().numpy(),
                                                 Y.double().numpy())
        Y, mean, var = flax_batch_norm(X_flax, *(jnp.asarray(value, statistics) for value in state), **options)
        measured["flax", statistics] = errors(reference, np.asarray(mean, np.float64), np.asarray(var, np.float64),
                                              np.asarray(Y, np.float64).transpose(0, 3, 1, 2))
    for framework in ("pytorch", "flax"):
        float32, bfloat16 = measured[framework, "float32"], measured[framework, "bfloat16"]
        print(f"\n{framework}: mean, variance (relative), output (abs): float32 {float32}, bfloat16 {bfloat16}")
        assert float32[0] < 1e-5 and float32[1] < 1e-5, (framework, float32)
        assert bfloat16[0] > 100 * float32[0] and bfloat16[1] > 100 * float32[1], (framework, float32, bfloat16)
        assert bfloat16[2] > 2 * float32[2], (framework, float32, bfloat16)


# --- parity in bfloat16 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectories_bf16(fashion_mnist):
    """BF16_STEPS steps (lr 1.0, batch 256, the shared order) of every implementation under bf16-mixed:
    {name: (per-step losses, weights after each step, (module, model, optimizer))}."""
    train_images, train_labels, _, _ = fashion_mnist
    weights = canonical_weights(0, np.float32)
    return {name: trajectory(name, weights, train_images, train_labels, BF16_STEPS, compute_dtype="bfloat16")
            for name in NAMES}


def test_linen_computes_what_nnx_computes_in_bfloat16(trajectories_bf16):
    """Bitwise, as in float32: both Flax APIs hand XLA the same program. (With nnx.BatchNorm's
    default promote_dtype, which rounds its scale and bias to bfloat16, flax-builtin's gradients
    of them differed from linen-builtin's by 6e-5 at the first step: impls/flax/lenet.py.)"""
    for nnx_name, linen_name in (("flax-scratch", "linen-scratch"), ("flax-builtin", "linen-builtin")):
        nnx_losses, nnx_weights, _ = trajectories_bf16[nnx_name]
        linen_losses, linen_weights, _ = trajectories_bf16[linen_name]
        assert np.array_equal(nnx_losses, linen_losses)
        assert max_difference(nnx_weights[-1], linen_weights[-1], WEIGHT_NAMES)[0] == 0.0


@pytest.mark.parametrize("a, b", list(itertools.combinations(NAMES, 2)))
def test_bfloat16_trajectories_stay_within_their_bound(trajectories_bf16, a, b):
    losses_a, weights_a, _ = trajectories_bf16[a]
    losses_b, weights_b, _ = trajectories_bf16[b]
    assert_close(f"per-step loss, bf16-mixed, {BF16_STEPS} steps", a, losses_a, b, losses_b, BF16_TRAJECTORY_LOSS)
    first_step = max_difference(weights_a[0], weights_b[0], SHAPING_PARAMETER_NAMES)[0]
    assert first_step <= BF16_FIRST_STEP, f"parameters after one bf16 step: {a} vs {b} differ by {first_step:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_stays_near_float32(trajectories_bf16, trajectories_float32, name):
    """Each implementation against its own float32 run on the same batches."""
    losses, weights, _ = trajectories_bf16[name]
    float32_losses, float32_weights, _ = trajectories_float32[name]
    assert_close(f"per-step loss, bf16-mixed against float32, {BF16_STEPS} steps", name, losses, "float32",
                 float32_losses[:BF16_STEPS], BF16_TRAJECTORY_LOSS)
    first_step = max_difference(weights[0], float32_weights[0], SHAPING_PARAMETER_NAMES)[0]
    assert first_step <= BF16_FIRST_STEP, f"{name}: parameters after one step, bf16 vs float32: {first_step:.2e}"
