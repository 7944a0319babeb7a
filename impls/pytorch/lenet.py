"""LeNet with batch normalization, as in the chapter, PyTorch edition. Mirror: impls/flax/lenet.py.

`build_lenet` loads the canonical weights (common/init.py); `export_weights` gives them back.
PyTorch's layout is the canonical one, so both are plain copies.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.init import BATCH_NORM_LAYERS, WEIGHT_NAMES
from impls.pytorch.batch_norm import EPS, MOMENTUM, BatchNorm, builtin_momentum

NORMS = ("scratch", "builtin")
# A LeNet for inference whose batch norm was folded into the layers before it (deploy.py).
FOLDED = "folded"


def make_batch_norm(norm, num_features, num_dims, dtype, process_group=None, eps=EPS):
    """The chapter's scratch layer, or PyTorch's own set to the same momentum and eps; with a
    process group, each normalises over the batches of all its workers together. FOLDED: what is
    left of a layer folded into the one before it, its input as it is."""
    if norm == FOLDED:
        return nn.Identity()
    if norm == "scratch":
        return BatchNorm(num_features, num_dims, process_group, eps=eps).to(dtype)
    # Synchronised statistics take another class (the layer nn.SyncBatchNorm.convert_sync_batchnorm
    # would put in its place), for 2-D and 4-D input alike.
    builtin = nn.BatchNorm2d if num_dims == 4 else nn.BatchNorm1d
    extra = {}
    if process_group is not None:
        builtin, extra = nn.SyncBatchNorm, {"process_group": process_group}
    # PyTorch's momentum weighs the new batch: builtin_momentum gives 1 - 0.9 for the chapter's 0.9.
    return builtin(num_features, eps=eps, momentum=builtin_momentum(MOMENTUM), dtype=dtype, **extra)



def check_batch(X, training):
    """One example cannot be normalised over the batch: its features have no variance.

    PyTorch's nn.BatchNorm1d raises; Flax's built-ins and the scratch code would divide by
    sqrt(0 + eps) without a word. All six implementations raise, here, with one message.
    """
    if training and X.shape[0] < 2:
        raise ValueError(f"training needs at least 2 examples per batch for batch norm, got shape {tuple(X.shape)}")


class LeNet(nn.Module):
    def __init__(self, norm="scratch", dtype=torch.float32, process_group=None, autocast_dtype=None, eps=EPS):
        super().__init__()
        if norm not in (*NORMS, FOLDED):
            raise ValueError(f"norm must be one of {(*NORMS, FOLDED)}, got {norm!r}")
        self.norm = norm
        # Mixed precision, PyTorch's way: the parameters stay in `dtype`, and torch.autocast runs
        # each operation on its lists in autocast_dtype (convolutions, matrix products) or float32,
        # the rest in its inputs' type. None: everything in `dtype`.
        self.autocast_dtype = autocast_dtype
        bn_options = dict(dtype=dtype, process_group=process_group, eps=eps)
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, dtype=dtype)
        self.bn1 = make_batch_norm(norm, 6, num_dims=4, **bn_options)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, dtype=dtype)
        self.bn2 = make_batch_norm(norm, 16, num_dims=4, **bn_options)
        self.fc1 = nn.Linear(16 * 4 * 4, 120, dtype=dtype)
        self.bn3 = make_batch_norm(norm, 120, num_dims=2, **bn_options)
        self.fc2 = nn.Linear(120, 84, dtype=dtype)
        self.bn4 = make_batch_norm(norm, 84, num_dims=2, **bn_options)
        self.fc3 = nn.Linear(84, 10, dtype=dtype)

    def forward(self, X):
        """X: images (batch, 1, 28, 28), NCHW. Returns logits (batch, 10), in the parameters' dtype."""
        check_batch(X, training=self.training)
        # Around the forward pass, as PyTorch's recipe places it (autograd's backward pass runs
        # each operation in the type its forward pass chose).
        with torch.autocast(X.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            X = F.avg_pool2d(torch.sigmoid(self.bn1(self.conv1(X))), kernel_size=2, stride=2)
            X = F.avg_pool2d(torch.sigmoid(self.bn2(self.conv2(X))), kernel_size=2, stride=2)
            # NCHW flattens in (channel, height, width) order: the canonical order.
            X = X.flatten(start_dim=1)
            X = torch.sigmoid(self.bn3(self.fc1(X)))
            X = torch.sigmoid(self.bn4(self.fc2(X)))
            logits = self.fc3(X)
        # The loss and the comparisons of logits in the parameters' type, under mixed precision too.
        return logits.to(self.fc3.weight.dtype)


# Canonical field name -> attribute of the layer, for each kind of batch-norm layer.
BATCH_NORM_FIELDS = {
    "scratch": {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_var": "moving_var"},
    "builtin": {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"},
}


def state_dict_key(canonical_key, norm):
    """'bn1.gamma' -> 'bn1.weight' for nn.BatchNorm; every other name is already PyTorch's."""
    layer, field = canonical_key.split(".")
    if layer in BATCH_NORM_LAYERS:
        field = BATCH_NORM_FIELDS[norm][field]
    return f"{layer}.{field}"


def build_lenet(weights, norm="scratch", device="cpu", process_group=None, compute_dtype=None, eps=EPS):
    """A LeNet holding the canonical weights, in their dtype, on `device`; with a process group,
    its batch norm normalises over the batches of all the group's workers together. compute_dtype
    'bfloat16': mixed precision (torch.autocast); None: everything in the weights' dtype."""
    dtype = torch.from_numpy(weights["conv1.weight"]).dtype
    autocast_dtype = None if compute_dtype is None else getattr(torch, compute_dtype)
    model = LeNet(norm, dtype=dtype, process_group=process_group, autocast_dtype=autocast_dtype, eps=eps)
    state = {state_dict_key(key, norm): torch.from_numpy(np.array(weights[key])) for key in WEIGHT_NAMES}
    if norm == "builtin":
        # nn.BatchNorm also counts the batches it has seen; unused with a fixed momentum.
        state.update({f"{layer}.num_batches_tracked": torch.tensor(0) for layer in BATCH_NORM_LAYERS})
    model.load_state_dict(state)
    return model.to(device)


def export_weights(model):
    """The model's parameters and moving statistics in the canonical layout, as numpy arrays."""
    state = model.state_dict()
    return {key: state[state_dict_key(key, model.norm)].detach().cpu().numpy().copy() for key in WEIGHT_NAMES}
