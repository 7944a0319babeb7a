"""Training step and evaluation, Flax NNX edition (a jitted step). Mirror: impls/pytorch/train.py.

The members that the driving code and the tests use, the same in every framework (impls/interface.py,
TrainingPart), let one loop drive each without knowing which.
"""

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common.data import to_layout
from common.init import PARAMETER_NAMES
from impls.flax.lenet import build_lenet, export_weights  # noqa: F401 (interface)

FRAMEWORK = "flax"
LAYOUT = "NHWC"


def select_device(request="auto", dtype=np.float32):
    """'auto' takes the first CUDA GPU when there is one; raises RuntimeError if 'cuda' is not usable."""
    # JAX computes in float32 unless 64-bit mode is on, whatever dtype it is handed.
    jax.config.update("jax_enable_x64", np.dtype(dtype) == np.float64 or jax.config.jax_enable_x64)
    gpus = jax.devices("gpu") if jax.default_backend() == "gpu" else []
    if request == "cuda" and not gpus:
        raise RuntimeError(f"JAX sees no usable CUDA GPU (its backend is {jax.default_backend()!r}; "
                           "pip install 'batchnorm-compare[cuda]' brings JAX's CUDA support)")
    if request in ("auto", "cuda") and gpus:
        return gpus[0]
    return jax.devices("cpu")[0]


def allow_tf32(enabled):
    """Whether float32 convolutions and matrix products on NVIDIA GPUs may round their inputs to
    TensorFloat-32 (10-bit mantissa). No effect on the CPU.

    JAX's default on GPUs is TF32 for both; PyTorch's is TF32 for convolutions only (see the
    PyTorch twin). compare.py decides for PyTorch and JAX alike: IEEE float32 unless --tf32."""
    # The default precision of every convolution and dot product traced from now on.
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if enabled else "float32")


def device_description(device):
    return f"cuda:{device.id} ({device.device_kind})" if device.platform == "gpu" else "cpu"


def to_device(images, labels, device, dtype):
    """numpy batch -> arrays on `device`; images in the model's dtype, labels int32."""
    # JAX's integers are 32-bit unless 64-bit mode is on; int32 holds the labels either way.
    return jax.device_put(np.asarray(images, dtype), device), jax.device_put(labels.astype(np.int32), device)


def make_optimizer(model, lr):
    # wrt=nnx.Param: SGD updates gamma and beta, never the nnx.BatchStat moving statistics.
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
    # Place the optimizer's state where the model is: left uncommitted, it would be committed
    # by the first step's output, and the second step would trace and compile all over again.
    placement = model.conv1.kernel[...].sharding
    nnx.update(optimizer, jax.device_put(nnx.state(optimizer), placement))
    return optimizer


def loss_function(model, images, labels):
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits


# Gradients with respect to nnx.Param only: the moving statistics (nnx.BatchStat) get none.
loss_value_and_gradients = nnx.value_and_grad(loss_function, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)


def sgd_step(model, optimizer, images, labels):
    """One SGD step in training mode. Returns (summed loss, number correct) as device scalars."""
    # The moving statistics are updated as a side effect of the forward pass; nnx.jit (or, on
    # the fast path, nnx.state after nnx.merge) carries them back out.
    (loss, logits), gradients = loss_value_and_gradients(model, images, labels)
    optimizer.update(model, gradients)
    # Summed rather than mean, so that a partial last batch weighs what it holds (as d2l counts).
    return loss * labels.shape[0], (logits.argmax(axis=1) == labels).sum()


# The per-step path (--mode eager): one compiled step per batch, as the NNX tutorials write it
# (the loops call it through bound_train_step).
train_step = nnx.jit(sgd_step)


def bound_train_step(model, optimizer):
    """train_step(model, optimizer, ...) as a function of the batch alone, for a loop over many
    batches. Puts the model in training mode; after an evaluation (model.eval()), bind again."""
    # At every call, nnx.jit walks the model's object graph to find its state: about 0.7 ms of an
    # 8.7 ms step (flax-builtin on the 2-core CPU, timed both ways). cached_partial walks it once
    # (Flax's performance guide) and trains a copy of the model that shares its Variables; the
    # copy keeps the mode the model was in when bound. It needs NNX's graph mode, the default.
    model.train()
    return nnx.cached_partial(train_step, model, optimizer)


@nnx.jit
def predict(model, images):
    """Logits in whatever mode the model is in (model.eval() for inference)."""
    return model(images)


def loss_and_gradients(model, images, labels):
    """(loss, logits, {canonical name: gradient}) for one batch, without an update; numpy out."""
    # Compiled as a whole, as train_step is: op by op, JAX would compile each operation on its own.
    (loss, logits), gradients = nnx.jit(loss_value_and_gradients)(model, images, labels)
    # The gradients have the parameters' structure and layout: a model made of them exports
    # them to the canonical layout just as export_weights exports the parameters.
    gradient_model = nnx.merge(nnx.graphdef(model), gradients, nnx.state(model, nnx.Not(nnx.Param)))
    gradients = {key: value for key, value in export_weights(gradient_model).items() if key in PARAMETER_NAMES}
    return to_numpy(loss), to_numpy(logits), gradients


def synchronize(model):
    """Wait until the model's state is computed, so that a clock read next measures the work."""
    # JAX dispatches asynchronously on every backend, the CPU included.
    jax.block_until_ready(nnx.state(model))


def to_numpy(value):
    return np.asarray(value)


# --- the fast path (--mode compiled): the dataset on the device, an epoch per call -------------

def put_dataset(images, labels, device, dtype):
    """The whole training set on `device`, once, in this framework's layout."""
    return to_device(to_layout(images, LAYOUT), labels, device, dtype)


def functional_train_step(graphdef, state, images, labels, indices):
    """train_step on plain arrays: the batch is gathered on the device from the shared indices."""
    model, optimizer = nnx.merge(graphdef, state)
    loss_sum, correct = sgd_step(model, optimizer, images[indices], labels[indices])
    return nnx.state((model, optimizer)), loss_sum, correct


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_on_batches(graphdef, state, images, labels, batch_indices):
    """Every batch of batch_indices (steps, batch) in one lax.scan: one call, one compilation.
    The state is donated, so XLA updates the parameters in place."""
    def one_step(state, indices):
        state, loss_sum, correct = functional_train_step(graphdef, state, images, labels, indices)
        return state, (loss_sum, correct)
    return jax.lax.scan(one_step, state, batch_indices)


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_on_batch(graphdef, state, images, labels, indices):
    """One batch, for the CPU (see FastTrainer): the state is donated here too."""
    return functional_train_step(graphdef, state, images, labels, indices)


class FastTrainer:
    """An epoch as one jitted scan over the full batches, and one more call for a partial last
    batch (another shape, so another compilation, made once).

    On the CPU, XLA runs the body of the loop that lax.scan compiles many times slower than the same
    step compiled on its own (measured on this project's 2-core machine, float32, batch 256, with
    cpu_conv.py's convolutions: 18x slower; unrolling the scan restores the speed). There the fast
    path calls a compiled step per batch instead, still on device-resident data, with the state
    donated and NNX kept out of the loop.
    """

    # The compiled epoch and step; Linen's trainer (impls/linen/train.py) brings its own.
    train_on_batches, train_on_batch = staticmethod(train_on_batches), staticmethod(train_on_batch)

    def __init__(self, model, optimizer, images, labels, use_scan=None):
        self.model, self.optimizer, self.images, self.labels = model, optimizer, images, labels
        self.use_scan = next(iter(images.devices())).platform != "cpu" if use_scan is None else use_scan
        self.static_arguments, self.state = self.split(model, optimizer)
        self.executables = {}  # shape of the batch indices -> compiled scan or step

    def split(self, model, optimizer):
        """(the compiled functions' static arguments, the state they train). NNX's graph
        bookkeeping happens here, once, instead of at every step."""
        graphdef, state = nnx.split((model, optimizer))
        return (graphdef,), state

    def train(self, batch_indices):
        """Train on batches of equal size (steps, batch); returns (summed losses, correct counts,
        seconds spent compiling, examples trained while compiling)."""
        batch_indices = jax.device_put(batch_indices.astype(np.int32), self.images.sharding)
        function, arguments = ((self.train_on_batches, batch_indices) if self.use_scan
                               else (self.train_on_batch, batch_indices[0]))
        compile_seconds = 0.0
        if arguments.shape not in self.executables:
            # Compiled ahead of time, apart from the run: no example is trained while compiling.
            start = time.perf_counter()
            self.executables[arguments.shape] = function.lower(
                *self.static_arguments, self.state, self.images, self.labels, arguments).compile()
            compile_seconds = time.perf_counter() - start
        executable = self.executables[arguments.shape]
        if self.use_scan:
            self.state, (loss_sums, corrects) = executable(self.state, self.images, self.labels, batch_indices)
            return loss_sums, corrects, compile_seconds, 0
        loss_sums, corrects = [], []
        for indices in batch_indices:
            self.state, loss_sum, correct = executable(self.state, self.images, self.labels, indices)
            loss_sums.append(loss_sum)
            corrects.append(correct)
        return jnp.stack(loss_sums), jnp.stack(corrects), compile_seconds, 0

    def synchronize(self):
        jax.block_until_ready(self.state)

    def finish(self):
        """Hand the trained state back to the model and optimizer (for evaluation and export)."""
        nnx.update((self.model, self.optimizer), self.state)
