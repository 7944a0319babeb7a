"""LeNet's convolutions, rewritten for XLA:CPU as space-to-depth convolutions. Flax only:
PyTorch's CPU convolutions, forward and backward, are oneDNN's.

Profiling the Flax step on the CPU (docs/performance.md, where its time goes) showed XLA:CPU's own
convolutions to be most of its cost, and the first one worst of all: with one input channel
and six output channels, its forward pass took 2.5 ms of a 9.5 ms step (this project's 2-core
machine, float32, batch 256), where oneDNN takes 0.7 ms. XLA's convolution is fast when it has
channels to work with, so `space_to_depth_conv` gives it some. Cutting the images into square
blocks and stacking each block's pixels as channels turns

    28x28 images, 1 channel, 5x5 kernel, 6 outputs      (conv1; 24x24 outputs)

into the same sum, taken in another order, over

    7x7 images, 16 channels, 2x2 kernel, 96 outputs     (blocks of 4x4; 6x6 blocks of outputs)

whose outputs, put back in place, are conv1's. The blocked convolution does 2.6x the
multiplications (the 2x2 kernel of 4x4 blocks covers more than 5x5 pixels, and the rest is
multiplied by zero) and still takes 0.45 ms. JAX differentiates it like any other code, and
XLA's gradients of the blocked convolution are faster as well. Over the whole step (both
convolutions: blocks of 4 for conv1, of 2 for conv2's 6 channels) the Flax step went from 9.5 to
7.7 ms. The technique is known as space-to-depth (or polyphase) convolution.

`conv_general_dilated` takes the place of `jax.lax.conv_general_dilated` in nnx.Conv. On the
CPU, for the case LeNet uses (float32, stride 1, no padding, no dilation, NHWC input, HWIO
kernel, no groups, sizes that the blocks divide), it is space_to_depth_conv; anywhere else (GPUs,
float64, other arguments) it is exactly `jax.lax.conv_general_dilated`. In float64 the blocks do
not pay: XLA:CPU's float64 convolutions gain nothing from more channels, and the 2.6x
multiplications show (30 float64 steps at batch 256 took 11.1 s blocked, 7.4 s with XLA's own
convolutions, flax-builtin). For finite inputs the two differ only by float rounding, as the sums
run in another order: tests/test_cpu_conv.py holds the value, both gradients and the
forward-mode derivative to XLA's, and the model-level tests hold LeNet to PyTorch's, within the
parity tolerances.
"""

from functools import partial

import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")

# Block sizes tried, smallest first, and the number of channels that makes XLA:CPU's
# convolution efficient: the smallest block size that reaches it is used, or, where none does,
# the largest that fits. Measured over the whole step on the 2-core machine: blocks of 4 for conv1
# (1 -> 16 channels) and 2 for conv2 (6 -> 24) ran 7.7 ms; 2 for both 7.8, 4 for both 8.2, XLA's
# own convolutions 9.5.
BLOCK_SIZES = (2, 4)
CHANNELS_WANTED = 16


def xla_conv(images, kernel):
    """A valid, stride-1 convolution of NHWC images with an HWIO kernel: XLA's own."""
    return lax.conv_general_dilated(images, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


def block_size(images_shape, kernel_shape):
    """The block size space_to_depth_conv uses for these shapes; 1 where blocking does not apply
    (the blocks would not tile images and outputs) or would not help (channels enough already)."""
    _, height, width, in_channels = images_shape
    kernel_height, kernel_width = kernel_shape[:2]
    if in_channels >= CHANNELS_WANTED or kernel_height > height or kernel_width > width:
        return 1
    # The blocks must tile the images and the outputs (which are kernel_size - 1 smaller).
    fitting = [block for block in BLOCK_SIZES
               if all(size % block == 0 for size in (height, width, kernel_height - 1, kernel_width - 1))]
    if not fitting:
        return 1
    enough = [block for block in fitting if block * block * in_channels >= CHANNELS_WANTED]
    return enough[0] if enough else fitting[-1]


def tap_selector(kernel_size, block):
    """S[tap, offset, input_phase, output_phase] = 1 where the kernel's tap links that phase of
    the input block `offset` blocks on to that phase of the output block; 0 elsewhere.

    An output at position block*p + output_phase reads the input at block*p + output_phase + tap,
    which lies in block p + offset at input_phase when
    tap = block*offset + input_phase - output_phase. Needs (kernel_size - 1) % block == 0, as
    block_size ensures: then the offsets 0 .. (kernel_size - 1) // block cover every tap.
    """
    offsets = (kernel_size - 1) // block + 1
    selector = np.zeros((kernel_size, offsets, block, block))
    for offset in range(offsets):
        for input_phase in range(block):
            for output_phase in range(block):
                tap = block * offset + input_phase - output_phase
                if 0 <= tap < kernel_size:
                    selector[tap, offset, input_phase, output_phase] = 1
    return selector


def space_to_depth_conv(images, kernel, block):
    """xla_conv(images, kernel), computed on block x block tiles of pixels stacked as channels.
    For shapes where block_size(images.shape, kernel.shape) == block."""
    batch, height, width, in_channels = images.shape
    kernel_height, kernel_width, _, out_channels = kernel.shape
    out_height, out_width = height - kernel_height + 1, width - kernel_width + 1
    # (batch, row block, row phase, column block, column phase, channel) -> phases as channels.
    blocked_images = (images.reshape(batch, height // block, block, width // block, block, in_channels)
                      .transpose(0, 1, 3, 2, 4, 5)
                      .reshape(batch, height // block, width // block, block * block * in_channels))
    rows = tap_selector(kernel_height, block).astype(kernel.dtype)
    columns = tap_selector(kernel_width, block).astype(kernel.dtype)
    # Letters: i, j kernel taps; I, J block offsets; u, v input phases; s, t output phases;
    # c, o input and output channels. Each (input phase, output phase) pair at each block offset
    # gets the kernel tap that links them, or 0: a rearranged copy of the kernel, through which
    # gradients reach it. (Multiplying by the 0s makes no rounding, but turns an infinite kernel
    # entry, or an infinite pixel, into NaNs that XLA's convolution would not give.)
    blocked_kernel = jnp.einsum("iIus,jJvt,ijco->IJuvcsto", rows, columns, kernel).reshape(
        rows.shape[1], columns.shape[1], block * block * in_channels, block * block * out_channels)
    blocked_outputs = xla_conv(blocked_images, blocked_kernel)
    # (batch, row block, column block, row phase, column phase, channel) -> pixels in place.
    return (blocked_outputs.reshape(batch, out_height // block, out_width // block, block, block, out_channels)
            .transpose(0, 1, 3, 2, 4, 5).reshape(batch, out_height, out_width, out_channels))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **options):
    """jax.lax.conv_general_dilated; on the CPU, for LeNet's case, space_to_depth_conv."""
    def lax_conv(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, **options)

    def is_unit(dilation):
        return dilation is None or tuple(dilation) == (1, 1)

    no_padding = (padding.upper() == "VALID" if isinstance(padding, str)
                  else tuple(map(tuple, padding)) == ((0, 0), (0, 0)))
    lenets_case = (lhs.ndim == 4 and lhs.dtype == jnp.float32 and rhs.dtype == lhs.dtype
                   and tuple(window_strides) == (1, 1) and no_padding
                   and is_unit(lhs_dilation) and is_unit(rhs_dilation) and feature_group_count == 1
                   and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                   == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
                   and all(value is None for value in options.values()))
    block = block_size(lhs.shape, rhs.shape) if lenets_case else 1
    if block == 1:
        return lax_conv(lhs, rhs)
    # Chosen when the computation is lowered for a platform: GPUs keep XLA's (cuDNN's) convolution.
    return lax.platform_dependent(lhs, rhs, cpu=partial(space_to_depth_conv, block=block), default=lax_conv)
