"""Layer level: each scratch batch_norm and both built-in layers against a plain NumPy reference.

Outputs, moving statistics after one and after several updates, and gradients with respect to
input, gamma and beta, in float64 and float32, for 2-D and 4-D input, over random shapes, scales
and offsets (hypothesis). PyTorch's built-in is compared with its unbiased running variance
written into the reference; tests/test_semantics.py pins that difference on its own.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.layers import LAYERS, numpy_batch_norm
from tests.tolerances import LAYER_RELATIVE, OFFSET_RANGE, magnitude, max_abs_difference


@st.composite
def layer_inputs(draw):
    """A few batches of one shape, with a scale and an offset per channel, and the layer's weights."""
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    batch = draw(st.integers(2, 64))
    channels = draw(st.integers(1, 32))
    if draw(st.booleans()):
        shape = (batch, channels)
    else:
        shape = (batch, channels, draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    scale = 10.0 ** draw(st.floats(-3, 3))
    offset = scale * draw(st.floats(-OFFSET_RANGE, OFFSET_RANGE))
    num_updates = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    per_channel = (1, -1) if len(shape) == 2 else (1, -1, 1, 1)
    channel_scale = scale * rng.uniform(0.5, 2.0, channels).reshape(per_channel)
    batches = [(offset + channel_scale * rng.standard_normal(shape)).astype(dtype) for _ in range(num_updates)]
    gamma = rng.uniform(0.5, 2.0, channels).astype(dtype)
    beta = rng.normal(size=channels).astype(dtype)
    cotangent = rng.standard_normal(shape).astype(dtype)
    return batches, gamma, beta, cotangent


def relative_difference(actual, expected):
    """Max abs difference, relative to the largest magnitude in the expected value (at least 1)."""
    return max_abs_difference(actual, expected) / magnitude(expected)


def check_against_reference(name, batches, gamma, beta, cotangent):
    reference = numpy_batch_norm(batches, gamma, beta, cotangent,
                                 unbiased_running_var=(name == "torch-builtin"))
    Y, gradients, moving_mean, moving_var = LAYERS[name](batches, gamma, beta, cotangent)
    bound = LAYER_RELATIVE[gamma.dtype]
    shape = f"{len(batches)} batches of {batches[0].shape} {gamma.dtype}"
    for quantity, actual, expected in (
            ("output", Y, reference[0]),
            ("gradient wrt input", gradients["X"], reference[1]["X"]),
            ("gradient wrt gamma", gradients["gamma"], reference[1]["gamma"]),
            ("gradient wrt beta", gradients["beta"], reference[1]["beta"]),
            ("moving mean", moving_mean, reference[2]),
            ("moving variance", moving_var, reference[3])):
        assert actual.dtype == gamma.dtype, f"{quantity}: {name} returned {actual.dtype} for {gamma.dtype} input"
        difference = relative_difference(actual, expected)
        assert difference <= bound, (
            f"{quantity}: {name} vs NumPy reference differ by {difference:.3e} relative "
            f"(bound {bound:.1e}), {shape}")


@pytest.mark.parametrize("name", list(LAYERS))
@settings(max_examples=8, deadline=None, derandomize=True)
@given(inputs=layer_inputs())
def test_layer_matches_numpy_reference(name, inputs):
    check_against_reference(name, *inputs)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("shape", [(256, 84), (256, 6, 24, 24)], ids=["2-D", "4-D"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_matches_numpy_reference_at_lenet_shapes(name, shape, dtype):
    """The shapes LeNet uses, three updates: a fixed case beside the random ones."""
    rng = np.random.default_rng(0)
    batches = [(3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype) for _ in range(3)]
    gamma = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    beta = rng.normal(size=shape[1]).astype(dtype)
    check_against_reference(name, batches, gamma, beta, rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 5)], ids=["2-D", "4-D"])
def test_scratch_functions_and_builtins_agree_with_each_other(name, shape):
    """The six layers side by side on one input: outputs within a float64 rounding of each other."""
    rng = np.random.default_rng(1)
    batches = [(1e3 + 1e2 * rng.standard_normal(shape)) for _ in range(2)]
    gamma, beta = rng.uniform(0.5, 2.0, shape[1]), rng.normal(size=shape[1])
    cotangent = rng.standard_normal(shape)
    Y, gradients, moving_mean, _ = LAYERS[name](batches, gamma, beta, cotangent)
    Y_ref, gradients_ref, moving_mean_ref, _ = LAYERS["torch-scratch"](batches, gamma, beta, cotangent)
    for quantity, a, b in (("output", Y, Y_ref), ("gradient wrt input", gradients["X"], gradients_ref["X"]),
                           ("moving mean", moving_mean, moving_mean_ref)):
        difference = relative_difference(a, b)
        assert difference <= LAYER_RELATIVE[np.dtype(np.float64)], (
            f"{quantity}: {name} vs torch-scratch differ by {difference:.3e} relative")


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_pass_variance_survives_a_large_offset_in_float32(name):
    """float32 input far from zero (1e3 + N(0, 1)): E[x^2] - E[x]^2 would lose the variance to
    cancellation (x^2 ~ 1e6 keeps ~0.1 absolute), the two-pass formula keeps it to ~1e-4."""
    rng = np.random.default_rng(2)
    shape = (256, 6, 4, 4)
    batches = [(1e3 + rng.standard_normal(shape)).astype(np.float32)]
    gamma, beta = np.ones(6, np.float32), np.zeros(6, np.float32)
    cotangent = rng.standard_normal(shape).astype(np.float32)
    reference = numpy_batch_norm(batches, gamma, beta, cotangent, unbiased_running_var=(name == "torch-builtin"))
    Y, _, _, moving_var = LAYERS[name](batches, gamma, beta, cotangent)
    assert relative_difference(Y, reference[0]) < 1e-3, f"output: {name} vs NumPy reference"
    assert relative_difference(moving_var, reference[3]) < 1e-3, f"moving variance: {name} vs NumPy reference"
