"""LeNet's convolutions with a faster input gradient on XLA:CPU. Flax only: PyTorch's CPU
convolutions, forward and backward, are oneDNN's.

Profiling the Flax step on the CPU (README, "Where the time goes") showed XLA:CPU's own
convolutions to be most of its cost. The largest single item was the gradient of the second
convolution with respect to its input, which XLA computes as a convolution of the zero-padded
output gradient with the flipped kernel: about 2.7 ms of a 13.5 ms step (this project's 2-core
machine, float32, batch 256). Written as one matrix product of the output gradient with the
kernel, followed by adding each of the kernel's 25 partial images back at its offset (col2im),
it takes about 1.2 ms: XLA's matrix product is fast, and it fuses the 25 shifted additions into
one loop.

`conv_general_dilated` takes the place of `jax.lax.conv_general_dilated` in nnx.Conv. Its value
and its gradient with respect to the kernel are XLA's own. On the CPU, for the case LeNet uses
(float32 or float64, stride 1, no padding, no dilation, NHWC input, HWIO kernel, no groups), its
gradient with respect to the input is the col2im above; anywhere else (GPUs, other arguments)
it is exactly `jax.lax.conv_general_dilated`. The col2im gradient differs from XLA's only by
float rounding (the sums run in another order): tests/test_cpu_conv.py holds it to XLA's, and
the model-level tests to PyTorch's, within the parity tolerances. A custom gradient has a price:
on the CPU, forward-mode differentiation (jax.jvp, jax.jacfwd) through LeNet is refused.
"""

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def xla_conv(images, kernel):
    """A valid, stride-1 convolution of NHWC images with an HWIO kernel: XLA's own."""
    return lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


def col2im_input_gradient(output_gradient, kernel, input_shape):
    """The gradient of xla_conv with respect to its images, given that of its output."""
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = output_gradient.shape[1:3]
    # (batch, height, width, kernel_height, kernel_width, in_channels): what each output
    # position sends back to each input position under its window.
    partial_images = jnp.einsum("bhwo,ijco->bhwijc", output_gradient, kernel)
    return sum(jnp.pad(partial_images[:, :, :, i, j, :],
                       ((0, 0), (i, input_shape[1] - height - i), (j, input_shape[2] - width - j), (0, 0)))
               for i in range(kernel_height) for j in range(kernel_width))


@jax.custom_vjp
def cpu_conv(images, kernel):
    return xla_conv(images, kernel)


def cpu_conv_forward(images, kernel):
    return xla_conv(images, kernel), (images, kernel)


def cpu_conv_backward(residuals, output_gradient):
    images, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda kernel: xla_conv(images, kernel), kernel)
    (kernel_gradient,) = kernel_vjp(output_gradient)
    # Under jit, an input gradient nobody uses (the first layer's: images are not trained)
    # is removed before it runs.
    return col2im_input_gradient(output_gradient, kernel, images.shape), kernel_gradient


cpu_conv.defvjp(cpu_conv_forward, cpu_conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **options):
    """jax.lax.conv_general_dilated; on the CPU, for LeNet's case, with cpu_conv's input gradient."""
    def lax_conv(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, **options)

    def is_unit(dilation):
        return dilation is None or tuple(dilation) == (1, 1)

    no_padding = (padding.upper() == "VALID" if isinstance(padding, str)
                  else tuple(map(tuple, padding)) == ((0, 0), (0, 0)))
    lenets_case = (lhs.ndim == 4 and lhs.dtype in (jnp.float32, jnp.float64) and rhs.dtype == lhs.dtype
                   and tuple(window_strides) == (1, 1) and no_padding
                   and is_unit(lhs_dilation) and is_unit(rhs_dilation) and feature_group_count == 1
                   and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                   == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
                   and all(value is None for value in options.values()))
    if not lenets_case:
        return lax_conv(lhs, rhs)
    # Chosen when the computation is lowered for a platform: GPUs keep XLA's (cuDNN's) gradient.
    return lax.platform_dependent(lhs, rhs, cpu=cpu_conv, default=lax_conv)
