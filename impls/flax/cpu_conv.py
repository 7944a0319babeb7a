"""LeNet's convolutions, rewritten for XLA:CPU as space-to-depth convolutions. Flax only:
PyTorch's CPU convolutions, forward and backward, are oneDNN's.

Profiling the Flax step on the CPU (README, "Where the time goes") showed XLA:CPU's own
convolutions to be most of its cost, and the first one worst of all: with one input channel
and six output channels, its forward pass took 2.5 ms of a 9.5 ms step (this project's 2-core
machine, float32, batch 256), where oneDNN takes 0.7 ms. XLA's convolution is fast when it has
channels to work with, so `space_to_depth_conv` gives it some. Cutting the images into f x f
blocks and stacking each block's pixels as channels turns

    28x28 images, 1 channel, 5x5 kernel, 6 outputs      (conv1; 24x24 outputs)

into the same sum, taken in another order, over

    7x7 images, 16 channels, 2x2 kernel, 96 outputs     (f = 4; 6x6 blocks of 4x4 outputs)

whose outputs, put back in place, are conv1's. The blocked convolution does 2.6x the
multiplications (the 2x2 kernel of 4x4 blocks covers more than 5x5 pixels, and the rest is
multiplied by zero) and still takes 0.45 ms. JAX differentiates it like any other code, and
XLA's gradients of the blocked convolution are faster as well. Over the whole step (both
convolutions, f = 4 for conv1 and f = 2 for conv2's 6 channels) the Flax step went from 9.5 to
7.7 ms. The technique is known as space-to-depth (or polyphase) convolution.

`conv_general_dilated` takes the place of `jax.lax.conv_general_dilated` in nnx.Conv. On the
CPU, for the case LeNet uses (float32 or float64, stride 1, no padding, no dilation, NHWC input,
HWIO kernel, no groups, sizes that the blocks divide), it is space_to_depth_conv; anywhere else
(GPUs, other arguments) it is exactly `jax.lax.conv_general_dilated`. The two differ only by
float rounding, as the sums run in another order: tests/test_cpu_conv.py holds the value and
both gradients to XLA's, and the model-level tests hold LeNet to PyTorch's, within the parity
tolerances.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

# Block sizes tried, smallest first, and the number of channels that makes XLA:CPU's
# convolution efficient: the smallest block size that reaches it is used. Measured over the
# whole step on the 2-core machine: f = 4 for conv1 (1 -> 16 channels), f = 2 for conv2
# (6 -> 24) ran 7.7 ms; f = 2 for both 7.8, f = 4 for both 8.2, XLA's convolutions 9.5.
BLOCK_SIZES = (2, 4)
CHANNELS_WANTED = 16


def xla_conv(images, kernel):
    """A valid, stride-1 convolution of NHWC images with an HWIO kernel: XLA's own."""
    return lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


def block_size(images_shape, kernel_shape):
    """The f of space_to_depth_conv for these shapes; 1 where blocking does not apply or help."""
    _, height, width, in_channels = images_shape
    kernel_height, kernel_width = kernel_shape[:2]
    if in_channels >= CHANNELS_WANTED:
        return 1
    # The blocks must tile the images and the outputs (which are kernel_size - 1 smaller).
    fitting = [f for f in BLOCK_SIZES
               if all(size % f == 0 for size in (height, width, kernel_height - 1, kernel_width - 1))]
    if not fitting:
        return 1
    enough = [f for f in fitting if f * f * in_channels >= CHANNELS_WANTED]
    return enough[0] if enough else fitting[-1]


def tap_selector(kernel_size, f):
    """S[i, I, u, s] = 1 where the kernel's tap i links input phase u in the output's block
    offset by I to output phase s; 0 elsewhere.

    An output at position f*p + s (block p, phase s within it) reads the input at f*p + s + i,
    which lies in block p + I at phase u when s + i = f*I + u; so tap i = f*I + u - s.
    """
    blocks = (kernel_size - 1) // f + 1
    selector = np.zeros((kernel_size, blocks, f, f))
    for I in range(blocks):
        for u in range(f):
            for s in range(f):
                if 0 <= f * I + u - s < kernel_size:
                    selector[f * I + u - s, I, u, s] = 1
    return selector


def space_to_depth_conv(images, kernel, f):
    """xla_conv(images, kernel), computed on f x f blocks of pixels stacked as channels."""
    batch, height, width, in_channels = images.shape
    kernel_height, kernel_width, _, out_channels = kernel.shape
    out_height, out_width = height - kernel_height + 1, width - kernel_width + 1
    # (batch, row block, row phase, column block, column phase, channel) -> phases as channels.
    blocked_images = (images.reshape(batch, height // f, f, width // f, f, in_channels)
                      .transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // f, width // f, f * f * in_channels))
    rows = tap_selector(kernel_height, f).astype(kernel.dtype)
    columns = tap_selector(kernel_width, f).astype(kernel.dtype)
    # Each (input phase, output phase) pair of each block offset gets the kernel tap that links
    # them, or 0: the blocked kernel is a rearranged copy of the kernel, so gradients reach it.
    blocked_kernel = jnp.einsum("iIus,jJvt,ijco->IJuvcsto", rows, columns, kernel)
    blocked_kernel = blocked_kernel.reshape(rows.shape[1], columns.shape[1], f * f * in_channels, f * f * out_channels)
    blocked_outputs = xla_conv(blocked_images, blocked_kernel)
    # (batch, row block, column block, row phase, column phase, channel) -> pixels in place.
    return (blocked_outputs.reshape(batch, out_height // f, out_width // f, f, f, out_channels)
            .transpose(0, 1, 3, 2, 4, 5).reshape(batch, out_height, out_width, out_channels))


def cpu_conv(images, kernel):
    """xla_conv, as space_to_depth_conv where block_size finds a block size that helps."""
    f = block_size(images.shape, kernel.shape)
    return space_to_depth_conv(images, kernel, f) if f > 1 else xla_conv(images, kernel)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **options):
    """jax.lax.conv_general_dilated; on the CPU, for LeNet's case, cpu_conv."""
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
                   and all(value is None for value in options.values())
                   and block_size(lhs.shape, rhs.shape) > 1)
    if not lenets_case:
        return lax_conv(lhs, rhs)
    # Chosen when the computation is lowered for a platform: GPUs keep XLA's (cuDNN's) convolution.
    return lax.platform_dependent(lhs, rhs, cpu=cpu_conv, default=lax_conv)
