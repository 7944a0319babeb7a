"""What every framework package under impls/ provides: its parts, each a module, and each module's
members, one line each. The driving code (common/drivers/) and the tests use a framework through
these names alone, so that one loop trains, times, evaluates and saves PyTorch, Flax NNX and Flax
Linen alike; impls/registry.py says which frameworks there are and hands out their parts.

Written as typing.Protocols, as a module satisfies one (PEP 544): tests/test_layout.py checks every
member of every part of every framework against these lines (present; a function takes the
parameters written here; a class has the methods of the protocol it names). Beyond them, a package
is free: what differs between the frameworks lives there, mirrored file by file.

Types: `Model` is the framework's model (an nn.Module, an nnx.Module, Linen's module with its
variables); `Device` a torch.device or a jax.Device; `Array` a tensor or an array on a device;
`Weights` the canonical {name: numpy array} of common/init.py.
"""

from typing import Any, Protocol

Model = Device = Array = Optimizer = Any
Weights = dict


class BatchNormPart(Protocol):
    """impls/<framework>/batch_norm.py: the chapter's layer, from scratch."""
    EPS: float                                                # eps of every batch-norm layer, the chapter's 1e-5
    MOMENTUM: float                                           # the chapter's momentum: the old statistics' weight

    def builtin_momentum(self, momentum): ...                 # the chapter's momentum as the built-in layer takes it
    def batch_norm(self, X, gamma, beta, moving_mean, moving_var, eps, momentum, training): ...  # the mathematics


class ModelPart(Protocol):
    """impls/<framework>/lenet.py: LeNet with batch norm, and the canonical weights in and out."""
    NORMS: tuple                                              # ('scratch', 'builtin'): the two batch norms
    BATCH_NORM_FIELDS: dict                                   # norm -> canonical field -> where the layer keeps it
    LeNet: type                                               # the model, as the chapter builds it

    def build_lenet(self, weights, norm="scratch", device=None): ...  # a LeNet holding canonical weights
    def export_weights(self, model): ...                      # the model's canonical weights, numpy


class Trainer(Protocol):
    """What the fast path's trainer does (FastTrainer(model, optimizer, images, labels))."""
    def train(self, batch_indices): ...                       # (steps, batch) -> losses, counts, compile s, examples
    def synchronize(self): ...                                # wait until the trained state is computed
    def finish(self): ...                                     # the trained state back into the model and optimizer


class TrainingPart(Protocol):
    """impls/<framework>/train.py: devices, the training step, inference, the fast path."""
    FRAMEWORK: str                                            # its package's name under impls/
    LAYOUT: str                                               # 'NCHW' or 'NHWC': the images its models take
    FastTrainer: type[Trainer]                                # --mode compiled: the dataset on the device

    def select_device(self, request="auto", dtype=None): ...  # 'auto', 'cpu' or 'cuda' -> a Device; RuntimeError
    def allow_tf32(self, enabled): ...                        # TF32 in float32 convolutions and products on GPUs
    def device_description(self, device): ...                 # 'cpu', 'cuda:0 (NVIDIA H200)'
    def to_device(self, images, labels, device, dtype): ...   # a numpy batch on the device
    def put_dataset(self, images, labels, device, dtype): ... # the whole training set on the device, in LAYOUT
    def build_lenet(self, weights, norm="scratch", device=None): ...  # lenet.build_lenet
    def export_weights(self, model): ...                      # lenet.export_weights
    def make_optimizer(self, model, lr): ...                  # SGD at learning rate lr
    def train_step(self, model, optimizer, images, labels): ...  # one SGD step: (summed loss, number correct)
    def bound_train_step(self, model, optimizer): ...         # train_step as a function of the batch alone
    def predict(self, model, images): ...                     # logits, in the mode the model is in
    def loss_and_gradients(self, model, images, labels): ...  # (loss, logits, {canonical name: gradient}), numpy
    def synchronize(self, model): ...                         # wait until the model's state is computed
    def to_numpy(self, value): ...                            # a device value as numpy


class Workers(Protocol):
    """The workers of a data-parallel run as one process sees them (start_workers' result)."""
    count: int                                                # how many workers
    process_index: int                                        # this process's index: 0 evaluates and reports
    device: Device                                            # this process's (first) worker's device
    devices: list                                             # every worker's device, described
    description: str                                          # the engine, as the report names it


class ParallelTrainer(Protocol):
    """What DataParallelTrainer(model, optimizer, workers) does."""
    def step(self, images, labels): ...                       # one step on a global batch, each worker on its shard
    def synchronize(self): ...                                # wait until every worker's step is computed
    def finish(self): ...                                     # worker 0's state into the model, for evaluation


class DataParallelPart(Protocol):
    """impls/<framework>/data_parallel.py: several workers sharing each batch."""
    ENGINE: str                                               # 'torch.distributed', 'jax.sharding'
    Workers: type[Workers]                                    # what start_workers returns
    DataParallelTrainer: type[ParallelTrainer]                # trains a model over the workers

    def start_workers(self, request, count, timeout): ...     # join `count` workers; DataParallelError if not
    def stop_workers(self, workers): ...                      # leave them
    def build_lenet(self, weights, norm, workers, bn_stats, compute_dtype=None): ...  # each worker's replica


class MeshDataParallelPart(DataParallelPart, Protocol):
    """A JAX framework's data_parallel.py (registry.FRAMEWORKS[...].runtime == 'jax'): its workers
    are the devices of a mesh in this process, where PyTorch's are processes."""
    def use_host_devices(self, count): ...                    # `count` CPU devices, set before JAX starts


class CheckpointPart(Protocol):
    """impls/<framework>/checkpoint.py: the framework's own format, beside the canonical file."""
    NATIVE_SUFFIX: str                                        # '.pt', '.orbax'
    RUNNING_VARIANCE: dict                                    # norm -> 'biased' or 'unbiased': what it keeps

    def save_native(self, model, path, metadata): ...         # the model as its users save one; the path
    def is_native(self, path): ...                            # whether `path` is in this format
    def load_native(self, path): ...                          # -> (canonical weights, metadata); CheckpointError


class DeployPart(Protocol):
    """impls/<framework>/deploy.py: batch norm folded, the inference program exported and loaded."""
    PROGRAM: str                                              # 'torch.export', 'jax.export'
    PROGRAM_SUFFIX: str                                       # '.pt2', '.jaxexport'
    BATCH_NORM_OPERATIONS: frozenset                          # what batch norm leaves in a program, in inference
    BATCH_STATISTICS_OPERATIONS: frozenset                    # what a training-mode batch norm leaves

    def fold_batch_norm(self, model): ...                     # an inference model without batch norm; ValueError
    def export_program(self, model, path, example): ...       # the inference program, batch dynamic; ValueError
    def load_program(self, path, device): ...                 # -> a function of a numpy batch to numpy logits
    def program_operations(self, path): ...                   # {operation: count} of a saved program


class OnnxDeployPart(DeployPart, Protocol):
    """PyTorch's deploy.py (registry.FRAMEWORKS[...].runtime == 'torch'): JAX has no ONNX exporter
    of its own (docs/deploying.md)."""
    def export_onnx(self, model, path, example): ...          # an ONNX file, batch dynamic; ValueError
