"""Canonical initial weights: one set of numpy arrays that every implementation starts from.

The canonical layout is PyTorch's: conv kernels (out, in, height, width), linear weights
(out, in), and the first Linear layer reading features flattened in (channel, height, width)
order. Flax converts to and from this layout once, at its boundary (impls/flax/lenet.py).

Initialisation follows the chapter: d2l's `train_ch6` re-initialises every Conv2d and Linear
weight with `nn.init.xavier_uniform_`; biases keep PyTorch's default
(uniform in +-1/sqrt(fan_in)); batch norm starts at gamma 1, beta 0, moving mean 0,
moving variance 1.
"""

import numpy as np

# (name, kind, shape) in the order of the forward pass. Batch-norm shapes are the feature count.
LAYERS = (
    ("conv1", "conv", (6, 1, 5, 5)),
    ("bn1", "batch_norm", (6,)),
    ("conv2", "conv", (16, 6, 5, 5)),
    ("bn2", "batch_norm", (16,)),
    ("fc1", "linear", (120, 16 * 4 * 4)),
    ("bn3", "batch_norm", (120,)),
    ("fc2", "linear", (84, 120)),
    ("bn4", "batch_norm", (84,)),
    ("fc3", "linear", (10, 84)),
)
BATCH_NORM_LAYERS = tuple(name for name, kind, _ in LAYERS if kind == "batch_norm")
# The batch-norm layer after each convolution or Linear layer that has one: in inference, an affine
# map per channel, which folds into the layer before it (impls/*/deploy.py).
BATCH_NORM_AFTER = {name: next_name for (name, _, _), (next_name, next_kind, _) in zip(LAYERS, LAYERS[1:])
                    if next_kind == "batch_norm"}

# Trainable parameters versus state that moves with the model but is not trained.
PARAMETER_NAMES = tuple(
    f"{name}.{field}"
    for name, kind, _ in LAYERS
    for field in (("gamma", "beta") if kind == "batch_norm" else ("weight", "bias"))
)
# The biases of the layers that feed a batch-norm layer: it subtracts their batch's mean, and with it
# the bias, so their exact gradient is 0. What they receive is rounding noise (small in float32; in
# bfloat16, enough for lr 1.0 to walk them far), and they change no output.
BIASES_BEFORE_BATCH_NORM = tuple(
    f"{name}.bias" for (name, _, _), (_, next_kind, _) in zip(LAYERS, LAYERS[1:]) if next_kind == "batch_norm"
)
# The parameters that shape the outputs: all but those biases.
SHAPING_PARAMETER_NAMES = tuple(name for name in PARAMETER_NAMES if name not in BIASES_BEFORE_BATCH_NORM)
# The values each example adds to one channel's batch statistics: the height x width of the feature
# map the layer normalises (conv1: 28 - 5 + 1 = 24; conv2 after 2x2 pooling: 12 - 5 + 1 = 8), one
# after a Linear layer. A batch of B gives n = B x this per channel, the n of PyTorch's n/(n-1).
VALUES_PER_EXAMPLE = {"bn1": 24 * 24, "bn2": 8 * 8, "bn3": 1, "bn4": 1}
MOVING_STAT_NAMES = tuple(
    f"{name}.{field}" for name in BATCH_NORM_LAYERS for field in ("moving_mean", "moving_var")
)
# Every key of canonical_weights(), in the order of the forward pass.
WEIGHT_NAMES = tuple(
    f"{name}.{field}"
    for name, kind, _ in LAYERS
    for field in (
        ("gamma", "beta", "moving_mean", "moving_var") if kind == "batch_norm" else ("weight", "bias")
    )
)


def xavier_uniform(rng, shape):
    """Glorot & Bengio (2010), as torch.nn.init.xavier_uniform_ computes the fans."""
    receptive_field = int(np.prod(shape[2:]))  # 1 for linear layers
    fan_in, fan_out = shape[1] * receptive_field, shape[0] * receptive_field
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def default_bias(rng, weight_shape):
    """PyTorch's default Conv2d/Linear bias: uniform in +-1/sqrt(fan_in)."""
    fan_in = int(np.prod(weight_shape[1:]))
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=weight_shape[0])


def canonical_weights(seed=0, dtype=np.float32):
    """All parameters and moving statistics of LeNet, keyed 'layer.field', in PyTorch's layout.

    Drawn in float64 from numpy's Generator and then cast, so that a float32 and a float64 run
    with the same seed start from the same weights, rounded.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, kind, shape in LAYERS:
        if kind == "batch_norm":
            weights[f"{name}.gamma"] = np.ones(shape)
            weights[f"{name}.beta"] = np.zeros(shape)
            weights[f"{name}.moving_mean"] = np.zeros(shape)
            weights[f"{name}.moving_var"] = np.ones(shape)
        else:
            weights[f"{name}.weight"] = xavier_uniform(rng, shape)
            weights[f"{name}.bias"] = default_bias(rng, shape)
    return {key: value.astype(dtype) for key, value in weights.items()}
