"""impls/flax/cpu_conv.py and the XLA flag impls/flax/__init__.py sets: the faster CPU convolution
gradient must be XLA's own up to rounding, and must be what LeNet runs on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import impls.flax
from impls.flax.cpu_conv import NHWC, conv_general_dilated
from impls.flax.lenet import LeNet
from tests.tolerances import FLOAT32_PASS, FLOAT64_PASS, assert_close


@pytest.fixture(autouse=True)
def on_the_cpu():
    """What is tested here is what XLA:CPU runs, whatever JAX's default device."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


# (images, kernel) shapes: LeNet's two convolutions, a non-square kernel on a non-square image,
# and a 1x1 kernel (no shifting at all).
SHAPES = [((16, 28, 28, 1), (5, 5, 1, 6)), ((16, 12, 12, 6), (5, 5, 6, 16)),
          ((3, 9, 7, 2), (2, 4, 2, 5)), ((2, 4, 4, 3), (1, 1, 3, 4))]


def value_and_gradients(conv, images, kernel, output_weights, **options):
    """The convolution and the gradients of a weighted sum of its output (a cotangent that
    differs at every position, so that a misplaced contribution cannot cancel out)."""
    def weighted_sum(images, kernel):
        output = conv(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC, **options)
        return jnp.sum(output * output_weights), output
    (_, output), (images_gradient, kernel_gradient) = jax.value_and_grad(
        weighted_sum, argnums=(0, 1), has_aux=True)(images, kernel)
    return output, images_gradient, kernel_gradient


@pytest.mark.parametrize("images_shape, kernel_shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("dtype, bound", [(np.float64, FLOAT64_PASS), (np.float32, FLOAT32_PASS)], ids=["float64", "float32"])
def test_value_and_both_gradients_are_xlas(images_shape, kernel_shape, dtype, bound):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal(images_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), dtype)
    output_shape = (images_shape[0], images_shape[1] - kernel_shape[0] + 1, images_shape[2] - kernel_shape[1] + 1,
                    kernel_shape[3])
    output_weights = jnp.asarray(rng.standard_normal(output_shape), dtype)
    ours = jax.jit(lambda *a: value_and_gradients(conv_general_dilated, *a))(images, kernel, output_weights)
    xlas = jax.jit(lambda *a: value_and_gradients(lax.conv_general_dilated, *a))(images, kernel, output_weights)
    for quantity, mine, theirs in zip(["output", "input gradient", "kernel gradient"], ours, xlas):
        assert mine.dtype == theirs.dtype == dtype
        assert_close(quantity, "cpu_conv", mine, "lax.conv_general_dilated", theirs, bound)


def count_custom_gradients(function, *arguments):
    return str(jax.make_jaxpr(function)(*arguments)).count("custom_vjp_call")


def test_lenet_runs_the_cpu_gradient_and_other_arguments_run_lax():
    images, kernel = jnp.ones((2, 12, 12, 6)), jnp.ones((5, 5, 6, 16))
    model = LeNet("scratch")
    model.eval()  # a traced training pass would update the moving statistics from inside the trace
    assert count_custom_gradients(lambda X: model(X).sum(), jnp.ones((4, 28, 28, 1))) == 2  # conv1 and conv2
    # Arguments LeNet does not use go to lax.conv_general_dilated untouched.
    for options in [dict(window_strides=(2, 2)), dict(padding="SAME"), dict(padding=((1, 1), (1, 1))),
                    dict(rhs_dilation=(2, 2)), dict(dimension_numbers=("NCHW", "HWIO", "NCHW"))]:
        arguments = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=NHWC) | options
        lhs = images.transpose(0, 3, 1, 2) if arguments["dimension_numbers"][0] == "NCHW" else images
        assert count_custom_gradients(lambda lhs, rhs: conv_general_dilated(lhs, rhs, **arguments), lhs, kernel) == 0
        np.testing.assert_array_equal(conv_general_dilated(lhs, kernel, **arguments),
                                      lax.conv_general_dilated(lhs, kernel, **arguments))
    # The spellings of LeNet's case that lax accepts all take the CPU gradient.
    for padding in ["VALID", "valid", [(0, 0), (0, 0)]]:
        assert count_custom_gradients(lambda lhs, rhs: conv_general_dilated(
            lhs, rhs, (1, 1), padding, rhs_dilation=np.array([1, 1]), dimension_numbers=NHWC), images, kernel) == 1


def test_ynnpack_runs_the_reductions_and_not_the_kernel_gradients():
    """The flag took: XLA:CPU compiles a convolution's kernel gradient with its own code, and a
    batch-norm mean with YNNPACK's."""
    def compiled(function, *shapes):
        return jax.jit(function).lower(*(jnp.ones(shape, jnp.float32) for shape in shapes)).compile().as_text()
    kernel_gradient = jax.grad(lambda kernel, images: jnp.sum(
        lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC) ** 2))
    assert "__ynn_fusion" not in compiled(kernel_gradient, (5, 5, 1, 6), (8, 28, 28, 1))
    assert "__ynn_fusion" in compiled(lambda X: X.mean(axis=(0, 1, 2)), (256, 24, 24, 6))


def test_the_ynnpack_flag_respects_the_users_setting_and_old_jaxlib():
    flag = "--xla_cpu_experimental_ynn_fusion_type="
    assert impls.flax.ynnpack_for_reductions_only("", (0, 10)) == f"{flag}reduce"
    assert impls.flax.ynnpack_for_reductions_only("--xla_dump_to=/tmp/x", (0, 11)) == f"--xla_dump_to=/tmp/x {flag}reduce"
    assert impls.flax.ynnpack_for_reductions_only(f"{flag}individual_dot", (0, 10)) == f"{flag}individual_dot"
    assert impls.flax.ynnpack_for_reductions_only("", (0, 9)) == ""
