"""Training step and evaluation, Flax Linen edition (a jitted step on a train state). Mirror:
impls/flax/train.py (NNX).

The members that the driving code and the tests use, the same in every framework (impls/interface.py,
TrainingPart), let one loop drive each without knowing which.

Linen runs on JAX as NNX does: devices, precision and transfers are the NNX edition's functions.
"""

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import optax
from flax.training import train_state

from common.init import PARAMETER_NAMES
from impls.flax.train import (LAYOUT, allow_tf32, device_description, put_dataset, select_device,  # noqa: F401 (interface)
                              to_device, to_numpy)
from impls.flax import train as flax_train
from impls.linen.lenet import Model, build_lenet, export_weights  # noqa: F401 (interface)

FRAMEWORK = "linen"


class TrainState(train_state.TrainState):
    """Linen's train state (the step count, the parameters, the optax state), with the moving
    statistics beside them: what a Linen training step takes, and returns anew."""
    batch_stats: Any


@dataclass
class Optimizer:
    """The train state of a model in training. Linen's is immutable, so each step returns a new
    one, kept here; nnx.Optimizer and torch.optim update theirs in place."""
    state: TrainState


def make_optimizer(model, lr):
    state = TrainState.create(apply_fn=model.module.apply, params=model.variables["params"],
                              batch_stats=model.variables["batch_stats"], tx=optax.sgd(lr))
    # Place the optax state where the model is: left uncommitted, it would be committed by the
    # first step's output, and the second step would trace and compile all over again.
    placement = jax.tree.leaves(model.variables)[0].sharding
    return Optimizer(jax.device_put(state, placement))


def loss_function(params, batch_stats, apply_fn, images, labels, training=True):
    """The mean loss, and (logits, moving statistics after the pass). In training, apply() may
    change the 'batch_stats' collection only where told it is mutable, and returns it changed."""
    variables = {"params": params, "batch_stats": batch_stats}
    if training:
        logits, changed = apply_fn(variables, images, train=True, mutable=["batch_stats"])
        batch_stats = changed["batch_stats"]
    else:
        logits = apply_fn(variables, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, batch_stats)


# Gradients with respect to the parameters, the first argument: the moving statistics get none.
loss_value_and_gradients = jax.value_and_grad(loss_function, has_aux=True)


def sgd_step(state, images, labels):
    """One SGD step in training mode: the new train state, (summed loss, number correct)."""
    (loss, (logits, batch_stats)), gradients = loss_value_and_gradients(
        state.params, state.batch_stats, state.apply_fn, images, labels)
    # The new moving statistics come back from apply(), not from the module: threading them into
    # the state is the step's job, or the next step would start from the old ones.
    state = state.apply_gradients(grads=gradients, batch_stats=batch_stats)
    # Summed rather than mean, so that a partial last batch weighs what it holds (as d2l counts).
    return state, loss * labels.shape[0], (logits.argmax(axis=1) == labels).sum()


# The per-step path (--mode eager): one compiled step per batch, as Linen's examples write it.
jitted_sgd_step = jax.jit(sgd_step)


def state_for_step(model, optimizer):
    """The train state a step takes: the optimizer's, carrying the model's variables, which are
    the truth (an evaluation in training mode may have moved its statistics, as in the other
    frameworks)."""
    return optimizer.state.replace(params=model.variables["params"], batch_stats=model.variables["batch_stats"])


def keep_state(model, optimizer, state):
    """A step's new train state: the optimizer keeps it, the model its variables."""
    optimizer.state = state
    model.variables = {"params": state.params, "batch_stats": state.batch_stats}


def train_step(model, optimizer, images, labels):
    """One SGD step in training mode. Returns (summed loss, number correct) as device scalars."""
    state, loss_sum, correct = jitted_sgd_step(state_for_step(model, optimizer), images, labels)
    keep_state(model, optimizer, state)
    return loss_sum, correct


def bound_train_step(model, optimizer):
    """train_step(model, optimizer, ...) as a function of the batch alone, for a loop over many
    batches. Puts the model in training mode; after an evaluation (model.eval()), bind again."""
    # Nothing to save here: the step is a function of arrays, with no object graph to walk.
    # The NNX twin binds to save NNX's walk over the model at every call.
    model.train()
    return partial(train_step, model, optimizer)


@partial(jax.jit, static_argnums=(0, 3))
def logits_and_statistics(module, variables, images, training):
    if training:
        logits, changed = module.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, changed["batch_stats"]
    return module.apply(variables, images, train=False), variables["batch_stats"]


def predict(model, images):
    """Logits in whatever mode the model is in (model.eval() for inference)."""
    logits, model.variables["batch_stats"] = logits_and_statistics(model.module, model.variables, images,
                                                                  model.training)
    return logits


# Compiled as a whole, as the step is: op by op, JAX would compile each operation on its own.
jitted_loss_value_and_gradients = jax.jit(loss_value_and_gradients, static_argnums=(2, 5))


def loss_and_gradients(model, images, labels):
    """(loss, logits, {canonical name: gradient}) for one batch, without an update; numpy out."""
    (loss, (logits, batch_stats)), gradients = jitted_loss_value_and_gradients(
        model.variables["params"], model.variables["batch_stats"], model.module.apply, images, labels,
        model.training)
    model.variables["batch_stats"] = batch_stats
    # The gradients have the parameters' structure and layout: a model made of them exports
    # them to the canonical layout just as export_weights exports the parameters.
    gradient_model = Model(model.module, {"params": gradients, "batch_stats": batch_stats})
    gradients = {key: value for key, value in export_weights(gradient_model).items() if key in PARAMETER_NAMES}
    return to_numpy(loss), to_numpy(logits), gradients


def synchronize(model):
    """Wait until the model's state is computed, so that a clock read next measures the work."""
    # JAX dispatches asynchronously on every backend, the CPU included.
    jax.block_until_ready(model.variables)


# --- the fast path (--mode compiled): the dataset on the device, an epoch per call -------------

def functional_train_step(state, images, labels, indices):
    """sgd_step on the batch gathered on the device from the shared indices."""
    return sgd_step(state, images[indices], labels[indices])


@partial(jax.jit, donate_argnums=0)
def train_on_batches(state, images, labels, batch_indices):
    """Every batch of batch_indices (steps, batch) in one lax.scan: one call, one compilation.
    The state is donated, so XLA updates the parameters in place."""
    def one_step(state, indices):
        state, loss_sum, correct = functional_train_step(state, images, labels, indices)
        return state, (loss_sum, correct)
    return jax.lax.scan(one_step, state, batch_indices)


@partial(jax.jit, donate_argnums=0)
def train_on_batch(state, images, labels, indices):
    """One batch, for the CPU (see FastTrainer): the state is donated here too."""
    return functional_train_step(state, images, labels, indices)


class FastTrainer(flax_train.FastTrainer):
    """An epoch as one jitted scan over the full batches, and one more call for a partial last
    batch; on the CPU, a compiled step per batch (see the NNX twin, whose epoch loop this is).
    What Linen changes: its compiled functions, and the train state they take as it is."""

    train_on_batches, train_on_batch = staticmethod(train_on_batches), staticmethod(train_on_batch)

    def split(self, model, optimizer):
        """(no static arguments, the train state): no object graph to split."""
        return (), state_for_step(model, optimizer)

    def finish(self):
        """Hand the trained state back to the model and optimizer (for evaluation and export)."""
        keep_state(self.model, self.optimizer, self.state)
