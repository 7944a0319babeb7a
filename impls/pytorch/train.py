"""Training step and evaluation, PyTorch edition (eager, as the chapter). Mirror: impls/flax/train.py.

The same small interface in both frameworks lets compare.py and the tests drive either
without knowing which: select_device, to_device, build_lenet, make_optimizer, train_step,
predict, loss_and_gradients, synchronize, to_numpy, export_weights.
"""

import numpy as np
import torch
from torch import nn

from common.init import PARAMETER_NAMES
from impls.pytorch.lenet import build_lenet, export_weights, state_dict_key  # noqa: F401 (interface)

FRAMEWORK = "pytorch"
LAYOUT = "NCHW"


def select_device(request="auto", dtype=np.float32):
    """'auto' takes the first CUDA GPU when there is one; raises RuntimeError if 'cuda' is not usable."""
    if request == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no usable CUDA GPU (torch.cuda.is_available() is False)")
    if request in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def device_description(device):
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def to_device(images, labels, device, dtype):
    """numpy batch -> tensors on `device`; images in the model's dtype, labels int64."""
    return (torch.from_numpy(np.asarray(images, dtype)).to(device, non_blocking=True),
            torch.from_numpy(labels).to(device, non_blocking=True))


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


loss_function = nn.CrossEntropyLoss()  # mean over the batch, as d2l's train_ch6


def train_step(model, optimizer, images, labels):
    """One SGD step in training mode. Returns (summed loss, number correct) as device scalars."""
    logits = model(images)
    loss = loss_function(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # Summed rather than mean, so that a partial last batch weighs what it holds (as d2l counts).
    return loss.detach() * labels.shape[0], (logits.argmax(dim=1) == labels).sum()


@torch.no_grad()
def predict(model, images):
    """Logits in whatever mode the model is in (model.eval() for inference)."""
    return model(images)


def loss_and_gradients(model, images, labels):
    """(loss, logits, {canonical name: gradient}) for one batch, without an update; numpy out."""
    model.zero_grad()
    logits = model(images)
    loss = loss_function(logits, labels)
    loss.backward()
    gradients = {key: to_numpy(model.get_parameter(state_dict_key(key, model.norm)).grad)
                 for key in PARAMETER_NAMES}
    return to_numpy(loss), to_numpy(logits), gradients


def synchronize(model):
    """Wait until the model's state is computed, so that a clock read next measures the work."""
    # On the CPU, eager PyTorch has finished each operation when it returns.
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_numpy(value):
    return value.detach().cpu().numpy()
