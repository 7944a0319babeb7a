"""impls/flax/cpu_conv.py and the XLA flag impls/flax/__init__.py sets: the space-to-depth CPU
convolution, its gradients and its derivative must be XLA's own up to rounding, and must be what
LeNet runs on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import impls.flax
from impls.flax.cpu_conv import NHWC, block_size, conv_general_dilated
from impls.flax.lenet import LeNet
from tests.tolerances import FLOAT32_PASS, FLOAT64_PASS, assert_close, magnitude


@pytest.fixture(autouse=True)
def on_the_cpu():
    """What is tested here is what XLA:CPU runs, whatever JAX's default device."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


# (images, kernel) shapes, each blocked: LeNet's two convolutions (blocks of 4 and 2), a
# non-square kernel on a non-square image (2), and a 1x1 kernel (4).
SHAPES = [((16, 28, 28, 1), (5, 5, 1, 6)), ((16, 12, 12, 6), (5, 5, 6, 16)),
          ((3, 8, 12, 2), (3, 5, 2, 5)), ((2, 8, 8, 1), (1, 1, 1, 4))]


def random_problem(images_shape, kernel_shape, dtype):
    """Images, a kernel, and weights for a sum of the output: different at every position, so
    that a misplaced contribution cannot cancel out."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal(images_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), dtype)
    output_shape = (images_shape[0], images_shape[1] - kernel_shape[0] + 1, images_shape[2] - kernel_shape[1] + 1,
                    kernel_shape[3])
    return images, kernel, jnp.asarray(rng.standard_normal(output_shape), dtype)


def value_and_gradients(conv, images, kernel, output_weights):
    """The convolution and the gradients of a weighted sum of its output."""
    def weighted_sum(images, kernel):
        output = conv(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
        return jnp.sum(output * output_weights), output
    (_, output), (images_gradient, kernel_gradient) = jax.value_and_grad(
        weighted_sum, argnums=(0, 1), has_aux=True)(images, kernel)
    return output, images_gradient, kernel_gradient


def derivative(conv, images, kernel):
    """Forward mode: how the output moves along a direction in both images and kernel."""
    def output(images, kernel):
        return conv(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
    return jax.jvp(output, (images, kernel), (jnp.cos(images), jnp.sin(kernel)))[1]


DTYPES = pytest.mark.parametrize("dtype, bound", [(np.float64, FLOAT64_PASS), (np.float32, FLOAT32_PASS)],
                                 ids=["float64", "float32"])
SHAPE_CASES = pytest.mark.parametrize("images_shape, kernel_shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))


@SHAPE_CASES
@DTYPES
def test_value_and_both_gradients_are_xlas(images_shape, kernel_shape, dtype, bound):
    assert block_size(images_shape, kernel_shape) > 1
    problem = random_problem(images_shape, kernel_shape, dtype)
    ours = jax.jit(lambda *a: value_and_gradients(conv_general_dilated, *a))(*problem)
    xlas = jax.jit(lambda *a: value_and_gradients(lax.conv_general_dilated, *a))(*problem)
    for quantity, mine, theirs in zip(["output", "input gradient", "kernel gradient"], ours, xlas):
        assert mine.dtype == theirs.dtype == dtype
        # The kernel gradient sums over every output position of the batch (9,216 in conv1's
        # case): it is of order 100, and its rounding with it.
        assert_close(quantity, "space_to_depth_conv", mine, "lax.conv_general_dilated", theirs,
                     bound * magnitude(theirs))


@SHAPE_CASES
@DTYPES
def test_forward_mode_derivative_is_xlas(images_shape, kernel_shape, dtype, bound):
    images, kernel, _ = random_problem(images_shape, kernel_shape, dtype)
    ours = jax.jit(lambda *a: derivative(conv_general_dilated, *a))(images, kernel)
    xlas = jax.jit(lambda *a: derivative(lax.conv_general_dilated, *a))(images, kernel)
    assert_close("derivative", "space_to_depth_conv", ours, "lax.conv_general_dilated", xlas, bound)


def test_block_sizes():
    # LeNet: conv1's single channel becomes 16 in blocks of 4, conv2's 6 become 24 in blocks of 2.
    assert block_size((256, 28, 28, 1), (5, 5, 1, 6)) == 4
    assert block_size((256, 12, 12, 6), (5, 5, 6, 16)) == 2
    assert block_size((8, 8, 12, 2), (3, 5, 2, 5)) == 2  # blocks of 4 would not tile the 6x8 output
    assert block_size((8, 16, 16, 16), (5, 5, 16, 8)) == 1  # channels enough already
    assert block_size((8, 9, 7, 2), (2, 4, 2, 5)) == 1  # no block size tiles 9x7
    assert block_size((8, 4, 4, 1), (9, 9, 1, 2)) == 1  # a kernel larger than the images: lax's case


def count_platform_choices(function, *arguments):
    """How many convolutions the jaxpr chooses per platform (the CPU's being space_to_depth_conv)."""
    return str(jax.make_jaxpr(function)(*arguments)).count("platform_index")


def convolutions_for_the_cpu(function, *arguments):
    """The convolutions that XLA:CPU is given for `function`, as 'lhs * rhs -> output' shapes."""
    text = nnx.jit(function).lower(*arguments).as_text()
    tensor = r"tensor<([0-9x]+)xf32>"
    return sorted("{} * {} -> {}".format(*shapes) for shapes in re.findall(
        rf"stablehlo.convolution.*?: \({tensor}, {tensor}\) -> {tensor}", text))


def test_lenet_runs_space_to_depth_on_the_cpu_and_other_arguments_run_lax():
    images, kernel = jnp.ones((2, 12, 12, 6), jnp.float32), jnp.ones((5, 5, 6, 16), jnp.float32)
    model = LeNet("scratch")
    model.eval()  # a traced training pass would update the moving statistics from inside the trace
    assert count_platform_choices(lambda X: model(X).sum(), jnp.ones((4, 28, 28, 1), jnp.float32)) == 2  # conv1 and conv2
    # The gradient of the parameters runs no convolution but blocked ones: conv1 in blocks of 4
    # (7x7x16 -> 6x6x96, and its kernel gradient), conv2 in blocks of 2 (6x6x24 -> 4x4x64, and
    # its kernel and input gradients).
    gradient = nnx.grad(lambda model, X: model(X).sum())
    assert convolutions_for_the_cpu(gradient, model, jnp.ones((4, 28, 28, 1), jnp.float32)) == [
        "4x4x4x64 * 3x3x24x64 -> 4x6x6x24", "4x6x6x24 * 3x3x24x64 -> 4x4x4x64", "4x6x6x24 * 4x4x4x64 -> 3x3x24x64",
        "4x7x7x16 * 2x2x16x96 -> 4x6x6x96", "4x7x7x16 * 4x6x6x96 -> 2x2x16x96"]
    # Arguments LeNet does not use go to lax.conv_general_dilated untouched; so does float64, for
    # which XLA:CPU's own convolution is the faster.
    for options in [dict(window_strides=(2, 2)), dict(padding="SAME"), dict(padding=((1, 1), (1, 1))),
                    dict(rhs_dilation=(2, 2)), dict(dimension_numbers=("NCHW", "HWIO", "NCHW")), dict(dtype=jnp.float64)]:
        dtype = options.pop("dtype", jnp.float32)
        arguments = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=NHWC) | options
        lhs = images.transpose(0, 3, 1, 2) if arguments["dimension_numbers"][0] == "NCHW" else images
        lhs, rhs = lhs.astype(dtype), kernel.astype(dtype)
        assert count_platform_choices(lambda lhs, rhs: conv_general_dilated(lhs, rhs, **arguments), lhs, rhs) == 0
        np.testing.assert_array_equal(conv_general_dilated(lhs, rhs, **arguments),
                                      lax.conv_general_dilated(lhs, rhs, **arguments))
    # The spellings of LeNet's case that lax accepts are all blocked.
    for padding in ["VALID", "valid", [(0, 0), (0, 0)]]:
        assert count_platform_choices(lambda lhs, rhs: conv_general_dilated(
            lhs, rhs, (1, 1), padding, rhs_dilation=np.array([1, 1]), dimension_numbers=NHWC), images, kernel) == 1


def test_ynnpack_runs_the_reductions_and_not_the_kernel_gradients():
    """The flag took: XLA:CPU compiles a convolution's kernel gradient with its own code, and a
    batch-norm mean with YNNPACK's."""
    def compiled(function, *shapes):
        return jax.jit(function).lower(*(jnp.ones(shape, jnp.float32) for shape in shapes)).compile().as_text()
    kernel_gradient = jax.grad(lambda kernel, images: jnp.sum(
        lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC) ** 2))
    # conv1's, blocked as LeNet runs it (space_to_depth_conv), and as XLA's own.
    assert "__ynn_fusion" not in compiled(kernel_gradient, (2, 2, 16, 96), (8, 7, 7, 16))
    assert "__ynn_fusion" not in compiled(kernel_gradient, (5, 5, 1, 6), (8, 28, 28, 1))
    assert "__ynn_fusion" in compiled(lambda X: X.mean(axis=(0, 1, 2)), (256, 24, 24, 6))


def test_the_ynnpack_flag_respects_the_users_setting_and_old_jaxlib():
    flag = "--xla_cpu_experimental_ynn_fusion_type="
    assert impls.flax.ynnpack_for_reductions_only("", (0, 10)) == f"{flag}reduce"
    assert impls.flax.ynnpack_for_reductions_only("--xla_dump_to=/tmp/x", (0, 11)) == f"--xla_dump_to=/tmp/x {flag}reduce"
    assert impls.flax.ynnpack_for_reductions_only(f"{flag}individual_dot", (0, 10)) == f"{flag}individual_dot"
    assert impls.flax.ynnpack_for_reductions_only("", (0, 9)) == ""
