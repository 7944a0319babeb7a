"""Training step and evaluation, PyTorch edition (eager, as the chapter). Mirror: impls/flax/train.py.

The members that the driving code and the tests use, the same in every framework (impls/interface.py,
TrainingPart), let one loop drive each without knowing which.
"""

import time
import warnings
from functools import partial

import numpy as np
import torch
from torch import nn

from common.data import to_layout
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


def allow_tf32(enabled):
    """Whether float32 convolutions and matrix products on NVIDIA GPUs may round their inputs to
    TensorFloat-32 (10-bit mantissa). No effect on the CPU.

    The frameworks' defaults differ: PyTorch lets cuDNN's convolutions use TF32 but keeps matrix
    products (nn.Linear) in IEEE float32; JAX uses TF32 for both. So compare.py decides for both
    frameworks alike: IEEE float32 unless --tf32."""
    precision = "tf32" if enabled else "ieee"
    # cuDNN's older switch too, set first: torch.export reads it, and it raises once the newer
    # setting says IEEE for convolutions while RNNs keep their default, TF32 (pytorch/pytorch#179445).
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = precision
    if not enabled:
        # A choice, made: TorchInductor's hint to turn TF32 on would only repeat --tf32's help.
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores", category=UserWarning)


def device_description(device):
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def to_device(images, labels, device, dtype):
    """numpy batch -> tensors on `device`; images in the model's dtype, labels int64."""
    return (torch.from_numpy(np.asarray(images, dtype)).to(device, non_blocking=True),
            torch.from_numpy(labels).to(device, non_blocking=True))


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


cross_entropy = nn.CrossEntropyLoss()  # mean over the batch, as d2l's train_ch6


def loss_function(model, images, labels):
    logits = model(images)
    loss = cross_entropy(logits, labels)
    return loss, logits


def loss_and_counts(model, images, labels):
    """The mean loss to differentiate, and the step's (summed loss, number correct)."""
    loss, logits = loss_function(model, images, labels)
    # Summed rather than mean, so that a partial last batch weighs what it holds (as d2l counts).
    return loss, loss.detach() * labels.shape[0], (logits.argmax(dim=1) == labels).sum()


def train_step(model, optimizer, images, labels, compute_loss=loss_and_counts):
    """One SGD step in training mode. Returns (summed loss, number correct) as device scalars.
    The fast path passes loss_and_counts compiled as compute_loss."""
    loss, loss_sum, correct = compute_loss(model, images, labels)
    # Autograd recorded the forward pass; backward() fills .grad of every nn.Parameter, and
    # buffers such as the moving statistics never receive one.
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss_sum, correct


def bound_train_step(model, optimizer):
    """train_step(model, optimizer, ...) as a function of the batch alone, for a loop over many
    batches. Puts the model in training mode; after an evaluation (model.eval()), bind again."""
    # Nothing to save here: the model is called directly, with no state to collect at each call.
    # The Flax twin binds to save NNX's walk over the model at every call.
    model.train()
    return partial(train_step, model, optimizer)


@torch.no_grad()
def predict(model, images):
    """Logits in whatever mode the model is in (model.eval() for inference)."""
    return model(images)


def loss_and_gradients(model, images, labels):
    """(loss, logits, {canonical name: gradient}) for one batch, without an update; numpy out."""
    model.zero_grad()
    loss, logits = loss_function(model, images, labels)
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


# --- the fast path (--mode compiled): the dataset on the device, compiled steps ---------------

def put_dataset(images, labels, device, dtype):
    """The whole training set on `device`, once, in this framework's layout."""
    # Copies: the loader's arrays are read-only, and torch.from_numpy wants to share memory.
    return to_device(np.array(to_layout(images, LAYOUT)), np.array(labels), device, dtype)


class FastTrainer:
    """Each step's forward pass, loss and backward pass compiled by torch.compile (TorchInductor
    fuses the element-wise work), on batches gathered on the device from the shared indices.

    On CUDA the whole step (gather, compiled forward and backward, SGD update) is also captured
    once per batch size as one CUDA graph and replayed for every batch: launching the compiled
    kernels and the update one by one from Python took about 1.2 ms a step on an H200, 3.5 times
    the GPU's own work (torch.profiler), and mode="reduce-overhead", which graphs the forward and
    backward passes but not the update or the gather, left it there."""

    def __init__(self, model, optimizer, images, labels):
        self.model, self.optimizer, self.images, self.labels = model, optimizer, images, labels
        # The loss compiled, not only the model: fusing cross-entropy and the counts into the
        # graph made the CPU step about 10% faster than compiling the model alone.
        self.compiled_loss_and_counts = torch.compile(loss_and_counts)
        self.seen_shapes = set()
        self.graphs = {}  # CUDA: batch size -> (graph, its index buffer, its (loss sum, correct))

    def step(self, indices):
        return train_step(self.model, self.optimizer, self.images[indices], self.labels[indices],
                          compute_loss=self.compiled_loss_and_counts)

    def capture(self, batch_size):
        """One training step as a CUDA graph reading its batch's indices from a fixed buffer.
        The model's parameters and moving statistics come out of this as they went in."""
        state = list(self.model.parameters()) + list(self.model.buffers())
        saved = [tensor.detach().clone() for tensor in state]
        indices = torch.arange(batch_size, device=self.images.device)
        # Warm-up steps first, on a side stream (PyTorch's recipe for capturing a whole step):
        # torch.compile compiles, cuBLAS and cuDNN set up, and .grad tensors exist, none of
        # which may happen during capture. They train the model: undone below.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(indices)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Records the kernels without running them; Python values such as the learning rate are
        # fixed in the graph from here on.
        with torch.cuda.graph(graph):
            outputs = self.step(indices)
        with torch.no_grad():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)  # in place: the graph reads and writes these very addresses
        return graph, indices, outputs

    def train(self, batch_indices):
        """Train on batches of equal size (steps, batch); returns (summed losses, correct counts,
        seconds spent compiling, examples trained while compiling)."""
        batch_indices = torch.from_numpy(batch_indices).to(self.images.device)
        if self.images.is_cuda:
            return self.train_with_graph(batch_indices)
        compile_seconds, compile_examples, loss_sums, corrects = 0.0, 0, [], []
        for indices in batch_indices:
            new_shape = tuple(indices.shape) not in self.seen_shapes
            if new_shape:
                # torch.compile traces and compiles on the first call for each shape.
                start = time.perf_counter()
            loss_sum, correct = self.step(indices)
            if new_shape:
                compile_seconds += time.perf_counter() - start
                compile_examples += len(indices)
                self.seen_shapes.add(tuple(indices.shape))
            loss_sums.append(loss_sum)
            corrects.append(correct)
        return torch.stack(loss_sums), torch.stack(corrects), compile_seconds, compile_examples

    def train_with_graph(self, batch_indices):
        batch_size = batch_indices.shape[1]
        compile_seconds = 0.0
        if batch_size not in self.graphs:
            # Compiled and captured apart from the run: no example is trained while compiling.
            self.synchronize()
            start = time.perf_counter()
            self.graphs[batch_size] = self.capture(batch_size)
            self.synchronize()
            compile_seconds = time.perf_counter() - start
        graph, graph_indices, (graph_loss_sum, graph_correct) = self.graphs[batch_size]
        loss_sums, corrects = [], []
        for indices in batch_indices:
            graph_indices.copy_(indices)
            graph.replay()
            # Copies: the next replay writes its outputs over this step's.
            loss_sums.append(graph_loss_sum.clone())
            corrects.append(graph_correct.clone())
        return torch.stack(loss_sums), torch.stack(corrects), compile_seconds, 0

    def synchronize(self):
        synchronize(self.model)

    def finish(self):
        """The compiled function and the graphs train self.model's own parameters and buffers:
        nothing to copy."""
