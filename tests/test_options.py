"""Batch-norm options across frameworks: every row of README.md's table of that name, pinned.

Where an option of PyTorch's nn.BatchNorm has a Flax spelling (nnx.BatchNorm, linen.BatchNorm), the
spellings train one batch-norm layer side by side in float64, STEPS SGD steps on random batches
(loss sum(Y * cotangent)), and must give the same output, input and parameter gradients and moving
statistics after every step, and the same inference output after them. Where a framework has no
counterpart, the test pins what it does, as measured, and the lines with which this project gets
the same numbers there. Each test is named in its row of the table.

nn.BatchNorm keeps an unbiased running variance, Flax a biased one (tests/test_semantics.py pins
that): Flax's moving variances are compared with PyTorch's through that known factor, and its
inference runs on PyTorch's running variance, as a port copies it.

Over workers, PyTorch's are 4 processes over gloo, launched once for the module
(tests/parallel_workers.py); JAX's are 4 host devices of this process (tests/conftest.py).
"""

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen, nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from common.init import canonical_weights
from common.drivers.workers import launch_local_workers
from impls.flax import batch_norm as flax_bn
from impls.flax.data_parallel import AXIS
from impls.flax.lenet import promote_input_only
from impls.pytorch import batch_norm as torch_bn
from tests import parallel_workers
from tests.layers import to_nchw, to_nhwc, torch_scratch
from tests.support import build
from tests.tolerances import FLOAT64_PASS, magnitude, max_abs_difference

STEPS = 3
LR = 0.5
# The project's settings of the built-ins (make_batch_norm in impls/*/lenet.py), which every test
# starts from and then changes the one option it is about.
TORCH_SETTINGS = {"momentum": torch_bn.builtin_momentum(torch_bn.MOMENTUM)}
FLAX_SETTINGS = {"momentum": flax_bn.builtin_momentum(flax_bn.MOMENTUM), "use_fast_variance": False}
CHAPTER_MOMENTA = [torch_bn.MOMENTUM] * STEPS


# --- one layer, trained in each framework ------------------------------------------------------

@dataclass
class Batches:
    """STEPS training batches (NCHW, or (N, C), or (N, C, L)), their cotangents, the batch inference
    sees, and the layer's starting gamma and beta."""
    train: list
    cotangents: list
    test: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray

    @property
    def channels(self):
        return self.train[0].shape[1]

    @property
    def values_per_channel(self):
        return self.train[0].size // self.channels

    def rows(self, selected):
        """The same batches, `selected` rows of each training batch only (inference sees all)."""
        return Batches([X[selected] for X in self.train], [c[selected] for c in self.cotangents], self.test,
                       self.gamma, self.beta)


def random_batches(seed, dims=4, offset=3.0):
    """A random shape (3-8 examples, 2-5 channels, 1-4 x 1-4 pixels for 4-D, 2-4 for 3-D) and random
    values, each channel with its own mean (within +-offset) and spread."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(3, 9)), int(rng.integers(2, 6)), *(int(v) for v in rng.integers(1, 5, dims - 2)))
    per_channel = (1, -1) + (1,) * (dims - 2)
    means = rng.uniform(-offset, offset, shape[1]).reshape(per_channel)
    spreads = rng.uniform(0.5, 2.0, shape[1]).reshape(per_channel)

    def draw():
        return means + spreads * rng.standard_normal(shape)

    return Batches([draw() for _ in range(STEPS)], [rng.standard_normal(shape) for _ in range(STEPS)], draw(),
                   rng.uniform(0.5, 2.0, shape[1]), rng.normal(size=shape[1]))


@dataclass
class Trace:
    """What one spelling computed: after each step its output, gradients and moving statistics (None
    where it keeps none); then its inference output, and `infer` for inference on other statistics."""
    outputs: list = field(default_factory=list)
    input_gradients: list = field(default_factory=list)
    parameter_gradients: list = field(default_factory=list)  # [{"scale": ..., "bias": ...}], those it has
    means: list = field(default_factory=list)
    variances: list = field(default_factory=list)
    inference: np.ndarray | None = None
    infer: object = None
    state: object = None  # Linen's variables after training

    def add(self, output, input_gradient, parameter_gradients, mean, var):
        def array(value):
            return None if value is None else np.asarray(value).copy()
        self.outputs.append(array(output))
        self.input_gradients.append(array(input_gradient))
        self.parameter_gradients.append({name: array(value) for name, value in parameter_gradients.items()})
        self.means.append(array(mean))
        self.variances.append(array(var))

    def rows(self, selected):
        """This trace's outputs and input gradients for `selected` rows only."""
        return Trace([Y[selected] for Y in self.outputs], [g[selected] for g in self.input_gradients],
                     self.parameter_gradients, self.means, self.variances, self.inference, self.infer)


TORCH_PARAMETER_NAMES = {"weight": "scale", "bias": "bias"}


def torch_layer(batches, set_parameters=True, **options):
    """nn.BatchNorm1d or 2d for the batches, in float64, holding their gamma and beta."""
    layer_class = torch.nn.BatchNorm2d if batches.train[0].ndim == 4 else torch.nn.BatchNorm1d
    layer = layer_class(batches.channels, dtype=torch.float64, **{**TORCH_SETTINGS, **options})
    if set_parameters and layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(batches.gamma))
            layer.bias.copy_(torch.from_numpy(batches.beta))
    return layer


def train_torch(layer, batches, training=True, before_step=None):
    """STEPS SGD steps of `layer` in training mode (or, training=False, in inference mode), then inference."""
    parameters = {TORCH_PARAMETER_NAMES[name]: value for name, value in layer.named_parameters()}
    optimizer = torch.optim.SGD(parameters.values(), lr=LR) if parameters else None
    trace = Trace()
    for step, (X, cotangent) in enumerate(zip(batches.train, batches.cotangents)):
        if before_step:
            before_step(layer, step)
        layer.train(training)
        X = torch.tensor(X, requires_grad=True)
        Y = layer(X)
        (Y * torch.from_numpy(cotangent)).sum().backward()
        trace.add(Y.detach(), X.grad, {name: value.grad for name, value in parameters.items()},
                  layer.running_mean, layer.running_var)
        if optimizer:
            optimizer.step()
            optimizer.zero_grad()
    layer.eval()
    with torch.no_grad():
        trace.inference = layer(torch.from_numpy(batches.test)).numpy()
    return trace


def nnx_layer(batches, set_parameters=True, **options):
    """nnx.BatchNorm in float64, moving statistics included, holding the batches' gamma and beta."""
    layer = nnx.BatchNorm(batches.channels, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0),
                          **{**FLAX_SETTINGS, **options})
    # nnx.BatchNorm creates its running statistics in float32 whatever param_dtype says.
    layer.mean.set_value(jnp.zeros(batches.channels, jnp.float64))
    layer.var.set_value(jnp.ones(batches.channels, jnp.float64))
    for variable, value in ((layer.scale, batches.gamma), (layer.bias, batches.beta)):
        if set_parameters and variable is not None:
            variable[...] = jnp.asarray(value)
    return layer


# One optimizer and module-level jitted steps: a layer of the same options and shapes trained twice
# is compiled once.
SGD = optax.sgd(LR)


@partial(nnx.jit, static_argnames="use_running_average")
def nnx_sgd_step(layer, optimizer, X, cotangent, mask, use_running_average):
    def loss(layer, X):
        Y = layer(X, use_running_average, mask=mask)
        return jnp.sum(Y * cotangent), Y
    (_, Y), (parameter_gradients, X_gradient) = nnx.value_and_grad(
        loss, argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True)(layer, X)
    optimizer.update(layer, parameter_gradients)
    return Y, X_gradient, nnx.to_pure_dict(parameter_gradients)


@partial(nnx.jit, static_argnames="use_running_average")
def nnx_inference(layer, X, use_running_average):
    return layer(X, use_running_average)


def train_nnx(layer, batches, layout=to_nhwc, before_step=None, use_running_average=None, mask=None,
              batch_statistics_at_inference=False):
    """STEPS SGD steps of an nnx.BatchNorm in training mode (use_running_average: its call's argument,
    None: the mode's; mask: its call's), then inference (in eval() mode; with batch statistics if
    asked). layout: NCHW to the layer's input layout."""
    optimizer = nnx.Optimizer(layer, SGD, wrt=nnx.Param)
    trace = Trace()
    for step, (X, cotangent) in enumerate(zip(batches.train, batches.cotangents)):
        if before_step:
            before_step(layer, step)
        layer.train()
        Y, X_gradient, parameter_gradients = nnx_sgd_step(layer, optimizer, jnp.asarray(layout(X)),
                                                          jnp.asarray(layout(cotangent)), mask, use_running_average)
        trace.add(to_nchw_from(layout, Y), to_nchw_from(layout, X_gradient), parameter_gradients,
                  layer.mean[...], layer.var[...])
    layer.eval()

    def infer(variance=None):
        if variance is not None:
            layer.var[...] = jnp.asarray(variance)
        running_average = None if not batch_statistics_at_inference else False
        return to_nchw_from(layout, nnx_inference(layer, jnp.asarray(layout(batches.test)), running_average))

    trace.inference, trace.infer = infer(), infer
    return trace


def to_nchw_from(layout, value):
    return to_nchw(np.asarray(value)) if layout is to_nhwc else np.asarray(value)


def linen_module(**options):
    return linen.BatchNorm(dtype=jnp.float64, param_dtype=jnp.float64, **{**FLAX_SETTINGS, **options})


@partial(jax.jit, static_argnames=("module", "use_running_average"))
def linen_sgd_step(module, params, optimizer_state, batch_stats, X, cotangent, mask, use_running_average):
    def loss(params, X):
        Y, changed = module.apply({"params": params, "batch_stats": batch_stats}, X, mutable=["batch_stats"],
                                  use_running_average=use_running_average, mask=mask)
        return jnp.sum(Y * cotangent), (Y, changed["batch_stats"])
    (_, (Y, batch_stats)), (parameter_gradients, X_gradient) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, X)
    updates, optimizer_state = SGD.update(parameter_gradients, optimizer_state)
    return optax.apply_updates(params, updates), optimizer_state, batch_stats, Y, X_gradient, parameter_gradients


@partial(jax.jit, static_argnames=("module", "use_running_average"))
def linen_inference(module, variables, X, use_running_average):
    # With batch statistics (use_running_average=False) Linen writes them: allowed here, and dropped.
    return module.apply(variables, X, use_running_average=use_running_average, mutable=["batch_stats"])[0]


def train_linen(module, batches, layout=to_nhwc, module_at=None, use_running_average=False, mask=None,
                batch_statistics_at_inference=False, set_parameters=True, variables=None):
    """STEPS SGD steps of a linen.BatchNorm (module_at(step): the module of each step, where it
    changes), its 'batch_stats' collection threaded from one apply to the next, then inference."""
    if variables is None:
        variables = module.init(jax.random.key(0), jnp.asarray(layout(batches.train[0])), use_running_average=False)
        # float64, as the run's (Linen creates its running statistics in float32 whatever param_dtype says).
        variables = jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), dict(variables))
        if set_parameters:
            variables["params"] = {name: jnp.asarray(value) for name, value in (("scale", batches.gamma),
                                   ("bias", batches.beta)) if name in variables.get("params", {})}
    params, batch_stats = variables.get("params", {}), variables["batch_stats"]
    optimizer_state = SGD.init(params)
    trace = Trace()
    for step, (X, cotangent) in enumerate(zip(batches.train, batches.cotangents)):
        params, optimizer_state, batch_stats, Y, X_gradient, parameter_gradients = linen_sgd_step(
            module_at(step) if module_at else module, params, optimizer_state, batch_stats, jnp.asarray(layout(X)),
            jnp.asarray(layout(cotangent)), mask, use_running_average)
        trace.add(to_nchw_from(layout, Y), to_nchw_from(layout, X_gradient), parameter_gradients,
                  batch_stats["mean"], batch_stats["var"])
    trace.state = {"params": params, "batch_stats": batch_stats}

    def infer(variance=None):
        stats = batch_stats if variance is None else {**batch_stats, "var": jnp.asarray(variance)}
        return to_nchw_from(layout, linen_inference(module, {"params": params, "batch_stats": stats},
                                                    jnp.asarray(layout(batches.test)),
                                                    not batch_statistics_at_inference))

    trace.inference, trace.infer = infer(), infer
    return trace


def flax_traces(batches, nnx_options=None, linen_options=None, **options):
    """Both Flax built-ins given the same options, trained on the batches: {label: Trace}."""
    return {"nnx.BatchNorm": train_nnx(nnx_layer(batches, **options), batches, **(nnx_options or {})),
            "linen.BatchNorm": train_linen(linen_module(**options), batches, **(linen_options or {}))}


def pytorch_variances(variances, momenta, values_per_channel, start=1.0):
    """Moving variances of biased batch variances (Flax's) as nn.BatchNorm keeps its own: the batch
    variances in them times n/(n-1), the start's share (the product of the momenta so far, in the
    chapter's convention) left as it is."""
    n = values_per_channel
    shares = np.cumprod(momenta)
    return [share * start + n / (n - 1) * (np.asarray(variance) - share * start)
            for share, variance in zip(shares, variances)]


def assert_same_numbers(label_a, a, label_b, b, scale=1.0, momenta=None, values_per_channel=None, statistics=True):
    """Every step's output, gradients and (unless statistics=False) moving statistics, and the
    inference output. momenta: a is nn.BatchNorm and b a Flax layer, whose moving variances are
    compared through pytorch_variances and whose inference runs on a's final running variance."""
    def check(quantity, x, y):
        assert (x is None) == (y is None), f"{quantity}: {label_a} has {x is not None}, {label_b} {y is not None}"
        if x is not None:
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == y.shape, f"{quantity}: {label_a} has shape {x.shape}, {label_b} {y.shape}"
            bound = FLOAT64_PASS * scale * magnitude(x)
            difference = max_abs_difference(x, y)
            assert difference <= bound, (
                f"{quantity}: {label_a} vs {label_b} differ by up to {difference:.3e} (bound {bound:.1e})")

    b_variances = b.variances
    if momenta is not None:
        b_variances = pytorch_variances(b.variances, momenta, values_per_channel)
    for step in range(len(a.outputs)):
        after = f"after step {step + 1}"
        check(f"output {after}", a.outputs[step], b.outputs[step])
        check(f"gradient wrt input {after}", a.input_gradients[step], b.input_gradients[step])
        assert sorted(a.parameter_gradients[step]) == sorted(b.parameter_gradients[step]), (
            f"parameters: {label_a} has {sorted(a.parameter_gradients[step])}, {label_b} "
            f"{sorted(b.parameter_gradients[step])}")
        for name in a.parameter_gradients[step]:
            check(f"gradient wrt {name} {after}", a.parameter_gradients[step][name], b.parameter_gradients[step][name])
        if statistics:
            check(f"moving mean {after}", a.means[step], b.means[step])
            check(f"moving variance {after}", a.variances[step], b_variances[step])
    inference = b.inference if momenta is None else b.infer(a.variances[-1])
    check("inference output", a.inference, inference)


def assert_flax_spellings_are_pytorchs(label, torch_trace, traces, batches, momenta=CHAPTER_MOMENTA, **options):
    for api, trace in traces.items():
        assert_same_numbers(label, torch_trace, api, trace, momenta=momenta,
                            values_per_channel=batches.values_per_channel, **options)


def channel_means(X):
    return X.mean(axis=tuple(axis for axis in range(X.ndim) if axis != 1))


# --- eps and momentum --------------------------------------------------------------------------

@settings(max_examples=2, deadline=None, derandomize=True)
@given(eps=st.floats(1e-3, 10.0), seed=st.integers(0, 2**32 - 1))
def test_pytorch_eps_is_flax_epsilon(eps, seed):
    batches = random_batches(seed)
    torch_trace = train_torch(torch_layer(batches, eps=eps), batches)
    assert_flax_spellings_are_pytorchs(f"nn.BatchNorm(eps={eps:.3g})", torch_trace,
                                       flax_traces(batches, epsilon=eps), batches)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(momentum=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_pytorch_momentum_is_one_minus_flax_momentum(momentum, seed):
    """`momentum` is the chapter's (the old statistics' weight); builtin_momentum spells it for each."""
    batches = random_batches(seed, dims=2)
    torch_trace = train_torch(torch_layer(batches, momentum=torch_bn.builtin_momentum(momentum)), batches)
    assert torch_bn.builtin_momentum(momentum) == pytest.approx(1 - momentum)
    assert_flax_spellings_are_pytorchs(
        f"nn.BatchNorm(momentum={1 - momentum:.3g})", torch_trace,
        flax_traces(batches, momentum=flax_bn.builtin_momentum(momentum)), batches, momenta=[momentum] * STEPS)


def test_pytorch_momentum_none_is_a_cumulative_average():
    """nn.BatchNorm(momentum=None) keeps the plain average of every batch's statistics so far. Flax
    has no such option: the loop counts its steps and gives the layer cumulative_average_momentum
    before each one (and the scratch layers take it as their momentum)."""
    batches = random_batches(11)
    torch_trace = train_torch(torch_layer(batches, momentum=None), batches)
    averages = [np.mean([channel_means(X) for X in batches.train[:step + 1]], axis=0) for step in range(STEPS)]
    np.testing.assert_allclose(np.array(torch_trace.means), averages, rtol=1e-12)
    momenta = [flax_bn.cumulative_average_momentum(step) for step in range(STEPS)]
    assert momenta == [torch_bn.cumulative_average_momentum(step) for step in range(STEPS)]

    def set_momentum(layer, step):
        layer.momentum = flax_bn.cumulative_average_momentum(step)

    traces = {"nnx.BatchNorm, momentum set before each step": train_nnx(
                  nnx_layer(batches), batches, before_step=set_momentum),
              "linen.BatchNorm, momentum set before each step": train_linen(
                  linen_module(), batches,
                  module_at=lambda step: linen_module(momentum=flax_bn.cumulative_average_momentum(step)))}
    assert_flax_spellings_are_pytorchs("nn.BatchNorm(momentum=None)", torch_trace, traces, batches, momenta=momenta)
    # PyTorch's scratch layer, given the same momenta: the same moving means.
    moving_mean = torch.zeros(batches.channels, dtype=torch.float64)
    for step, X in enumerate(batches.train):
        _, moving_mean, _ = torch_bn.batch_norm(
            torch.from_numpy(X), torch.from_numpy(batches.gamma), torch.from_numpy(batches.beta), moving_mean,
            torch.ones_like(moving_mean), torch_bn.EPS, torch_bn.cumulative_average_momentum(step), training=True)
    np.testing.assert_allclose(moving_mean.numpy(), averages[-1], rtol=1e-12)


def test_freezing_the_statistics_is_momentum_0_in_pytorch_and_1_in_flax():
    """Train without moving the statistics: PyTorch momentum=0, Flax momentum=1.0 (builtin_momentum
    of the chapter's 1). Each framework's spelling in the other does the opposite (AlgoPerf,
    mlcommons/algorithmic-efficiency #783, #798): the statistics become the last batch's.
    use_running_average=True freezes them too, but also normalises with them: PyTorch's eval()."""
    batches = random_batches(12)
    frozen = {"torch": torch_bn.builtin_momentum(1.0), "flax": flax_bn.builtin_momentum(1.0)}
    assert frozen == {"torch": 0.0, "flax": 1.0}
    torch_trace = train_torch(torch_layer(batches, momentum=frozen["torch"]), batches)
    traces = flax_traces(batches, momentum=frozen["flax"])
    assert_flax_spellings_are_pytorchs("nn.BatchNorm(momentum=0)", torch_trace, traces, batches,
                                       momenta=[1.0] * STEPS)
    for trace in (torch_trace, *traces.values()):
        np.testing.assert_array_equal(np.array(trace.means), 0.0)
        np.testing.assert_array_equal(np.array(trace.variances), 1.0)
    # The other framework's spelling: statistics replaced by each batch's.
    last_batch_mean = channel_means(batches.train[-1])
    swapped = {"nn.BatchNorm(momentum=1.0)": train_torch(torch_layer(batches, momentum=1.0), batches),
               **flax_traces(batches, momentum=0.0)}
    for label, trace in swapped.items():
        np.testing.assert_allclose(trace.means[-1], last_batch_mean, rtol=1e-12, err_msg=label)
    # use_running_average=True during training: PyTorch's layer in eval() mode during training.
    in_eval = train_torch(torch_layer(batches, momentum=frozen["torch"]), batches, training=False)
    running = {"nnx.BatchNorm(use_running_average=True)": train_nnx(
                   nnx_layer(batches), batches, use_running_average=True),
               "linen.BatchNorm(use_running_average=True)": train_linen(
                   linen_module(), batches, use_running_average=True)}
    assert_flax_spellings_are_pytorchs("nn.BatchNorm in eval() while training", in_eval, running, batches,
                                       momenta=[1.0] * STEPS)
    assert max_abs_difference(in_eval.outputs[0], torch_trace.outputs[0]) > 1e-2


# --- parameters: affine, initialisers -------------------------------------------------------------

def test_affine_false_is_use_scale_and_use_bias_false():
    batches = random_batches(13)
    torch_layer_without = torch_layer(batches, affine=False)
    assert torch_layer_without.weight is None and torch_layer_without.bias is None
    torch_trace = train_torch(torch_layer_without, batches)
    traces = flax_traces(batches, use_scale=False, use_bias=False)
    assert traces["linen.BatchNorm"].state["params"] == {}
    assert_flax_spellings_are_pytorchs("nn.BatchNorm(affine=False)", torch_trace, traces, batches)


def test_zero_initialised_scale_is_scale_init_zeros():
    """PyTorch has no initialiser arguments: nn.init on the layer's weight and bias after it is built;
    Flax: scale_init and bias_init. A zero scale (as ResNets start a block's last layer) makes the
    first output the bias and the first input gradient zero; SGD moves the scale away from zero."""
    batches = random_batches(14)
    layer = torch_layer(batches, set_parameters=False)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.constant_(layer.bias, 0.25)
    torch_trace = train_torch(layer, batches)
    np.testing.assert_array_equal(torch_trace.input_gradients[0], 0.0)
    np.testing.assert_array_equal(torch_trace.outputs[0], 0.25)
    traces = {"nnx.BatchNorm": train_nnx(nnx_layer(batches, set_parameters=False, scale_init=nnx.initializers.zeros,
                                                   bias_init=nnx.initializers.constant(0.25)), batches),
              "linen.BatchNorm": train_linen(linen_module(scale_init=linen.initializers.zeros,
                                                          bias_init=linen.initializers.constant(0.25)),
                                             batches, set_parameters=False)}
    assert_flax_spellings_are_pytorchs("nn.BatchNorm, nn.init.zeros_(weight)", torch_trace, traces, batches)
    assert np.max(np.abs(torch_trace.outputs[-1] - 0.25)) > 1e-2


# --- the moving statistics: kept or not, reset, counted --------------------------------------------

def test_track_running_stats_false_is_batch_statistics_at_inference():
    """nn.BatchNorm(track_running_stats=False) keeps no statistics and normalises with the batch's in
    eval() too. Flax has no such option: use_running_average=False at inference gives the same
    numbers, and its statistics still move (NNX; Linen's apply returns them, to be dropped)."""
    batches = random_batches(15)
    layer = torch_layer(batches, track_running_stats=False)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    torch_trace = train_torch(layer, batches)
    at_inference = {"batch_statistics_at_inference": True}
    traces = flax_traces(batches, nnx_options=at_inference, linen_options=at_inference)
    for api, trace in traces.items():
        assert_same_numbers("nn.BatchNorm(track_running_stats=False)", torch_trace, api, trace, statistics=False)
    # The scratch batch_norm's training mode at inference, its returned statistics dropped: the same.
    test = torch.from_numpy(batches.test)
    start = torch.zeros(batches.channels, dtype=torch.float64), torch.ones(batches.channels, dtype=torch.float64)
    Y, _, _ = torch_bn.batch_norm(test, layer.weight.detach(), layer.bias.detach(), *start, torch_bn.EPS,
                                  torch_bn.MOMENTUM, training=True)
    np.testing.assert_allclose(Y.numpy(), torch_trace.inference, atol=FLOAT64_PASS)
    # nnx.BatchNorm's statistics moved with the inference batch.
    nnx_batch_norm = nnx_layer(batches)
    nnx_batch_norm.eval()
    nnx_batch_norm(jnp.asarray(to_nhwc(batches.test)), use_running_average=False)
    np.testing.assert_allclose(np.asarray(nnx_batch_norm.mean[...]), 0.1 * channel_means(batches.test), rtol=1e-12)


def test_reset_running_stats_is_flax_statistics_set_to_0_and_1():
    """nn.BatchNorm.reset_running_stats(): means 0, variances 1, num_batches_tracked 0. Flax's layers
    have no such method: reset_running_stats (impls/flax/batch_norm.py) resets their statistics' tree.
    Trained, reset, trained again: the same numbers as PyTorch's after its own reset."""
    batches = random_batches(16)
    layer = torch_layer(batches)
    train_torch(layer, batches)
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0
    torch_trace = train_torch(layer, batches)
    nnx_batch_norm = nnx_layer(batches)
    train_nnx(nnx_batch_norm, batches)
    nnx.update(nnx_batch_norm, flax_bn.reset_running_stats(nnx.state(nnx_batch_norm, nnx.BatchStat)))
    trained = train_linen(linen_module(), batches).state
    reset = {**trained, "batch_stats": flax_bn.reset_running_stats(trained["batch_stats"])}
    traces = {"nnx.BatchNorm, reset": train_nnx(nnx_batch_norm, batches),
              "linen.BatchNorm, reset": train_linen(linen_module(), batches, variables=reset)}
    assert_flax_spellings_are_pytorchs("nn.BatchNorm, reset_running_stats()", torch_trace, traces, batches)
    # Every moving statistic of every model, by its name: both Flax APIs, both layers.
    for name in ("flax-scratch", "flax-builtin", "linen-scratch", "linen-builtin"):
        module, model, _ = build(name, canonical_weights(0))
        statistics = nnx.state(model, nnx.BatchStat) if name.startswith("flax") else model.variables["batch_stats"]
        for path, value in jax.tree_util.tree_leaves_with_path(flax_bn.reset_running_stats(statistics)):
            expected = 1.0 if any(getattr(key, "key", None) in ("var", "moving_var") for key in path) else 0.0
            np.testing.assert_array_equal(np.asarray(value), expected, err_msg=f"{name}: {path}")


def test_num_batches_tracked_counts_training_forward_passes():
    """nn.BatchNorm's num_batches_tracked counts forward passes in training mode, with or without
    gradients (not in eval()); with a fixed momentum no number depends on it, with momentum=None the
    next step's momentum is cumulative_average_momentum of it. It is in the state_dict; one without
    it loads, and the layer keeps its own count. Flax counts nothing: its statistics are a mean and
    a variance."""
    batches = random_batches(17, dims=2)
    layer = torch_layer(batches)
    trace = train_torch(layer, batches)
    assert int(layer.num_batches_tracked) == STEPS  # train_torch's inference in eval() did not count
    with torch.no_grad():
        layer.train()
        layer(torch.from_numpy(batches.test))
    assert int(layer.num_batches_tracked) == STEPS + 1 and "num_batches_tracked" in layer.state_dict()
    # A fixed momentum: the count changes nothing.
    counted = torch_layer(batches)
    counted.num_batches_tracked.fill_(1000)
    assert_same_numbers("nn.BatchNorm", trace, "nn.BatchNorm counting from 1000", train_torch(counted, batches))
    # momentum=None: a layer that has counted 5 batches gives the 6th the weight 1/6.
    cumulative = torch_layer(batches, momentum=None)
    cumulative.num_batches_tracked.fill_(5)
    with torch.no_grad():
        cumulative.running_mean.fill_(1.0)
        cumulative(torch.from_numpy(batches.train[0]))
    momentum = flax_bn.cumulative_average_momentum(5)
    np.testing.assert_allclose(cumulative.running_mean.numpy(),
                               momentum * 1.0 + (1 - momentum) * channel_means(batches.train[0]), rtol=1e-12)
    # A state_dict without it, as a converter from Flax writes it: it loads, the layer's count unchanged.
    loaded = torch_layer(batches)
    loaded.num_batches_tracked.fill_(7)
    state = {key: value for key, value in layer.state_dict().items() if key != "num_batches_tracked"}
    loaded.load_state_dict(state)
    assert int(loaded.num_batches_tracked) == 7
    assert sorted(nnx.to_pure_dict(nnx.state(nnx_layer(batches), nnx.BatchStat))) == ["mean", "var"]
    variables = linen_module().init(jax.random.key(0), jnp.asarray(batches.train[0]), use_running_average=False)
    assert sorted(variables["batch_stats"]) == ["mean", "var"]


# --- how the input is read --------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3, 4], ids=["(N, C)", "(N, C, L)", "(N, C, H, W)"])
def test_feature_axis_is_dim_1_in_pytorch_and_axis_in_flax(dims):
    """PyTorch's features are dim 1 (nn.BatchNorm1d takes (N, C) and (N, C, L)); Flax's are `axis`,
    -1 by default (channels last). axis=1 reads PyTorch's layout as it is."""
    batches = random_batches(18 + dims, dims=dims)
    torch_trace = train_torch(torch_layer(batches), batches)
    as_it_is = {"layout": lambda X: X}
    traces = flax_traces(batches, nnx_options=as_it_is, linen_options=as_it_is, axis=1)
    assert_flax_spellings_are_pytorchs("nn.BatchNorm", torch_trace, traces, batches)
    if dims > 2:
        # The default, on PyTorch's layout: statistics of the last axis (one per pixel column), no error.
        width = batches.train[0].shape[-1]
        default = nnx.BatchNorm(width, rngs=nnx.Rngs(0))
        default(jnp.asarray(batches.train[0], jnp.float32))
        assert default.mean[...].shape == (width,)


def test_use_fast_variance_false_is_pytorchs_two_pass_variance():
    """Flax's default variance, E[x^2] - E[x]^2, cancels where the mean is large against the spread
    (here up to 1e7 against 1, in float64); use_fast_variance=False is PyTorch's two passes."""
    batches = random_batches(22, offset=1e7)
    # float64 rounds a value of 1e7 by 1e7 * 1.1e-16: every result carries that much more rounding.
    scale = magnitude(batches.train)
    torch_trace = train_torch(torch_layer(batches), batches)
    assert_flax_spellings_are_pytorchs("nn.BatchNorm", torch_trace, flax_traces(batches, use_fast_variance=False),
                                       batches, scale=scale)
    for api, trace in flax_traces(batches, use_fast_variance=True).items():
        with pytest.raises(AssertionError, match="output after step 1"):
            assert_flax_spellings_are_pytorchs("nn.BatchNorm", torch_trace, {api: trace}, batches, scale=scale)


# --- reduced precision: where the statistics are computed, what the layer casts ------------------------

def bfloat16_batch(seed, shape=(64, 4, 6, 6)):
    """bfloat16 values around 3 (where bfloat16's spacing is 2^-6), and the same values in float64."""
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(3.0 + rng.standard_normal(shape)).to(torch.bfloat16)
    return X, X.double().numpy()


def test_linen_force_float32_reductions_is_pytorchs_float32_statistics():
    """bfloat16 input, float32 parameters (mixed precision): nn.BatchNorm computes the batch
    statistics in float32; so does linen.BatchNorm with force_float32_reductions (its default), and
    nnx.BatchNorm always. force_float32_reductions=False reduces in bfloat16."""
    X, exact = bfloat16_batch(23)
    expected = 0.1 * channel_means(exact)  # one update from 0, momentum 0.9
    layer = torch.nn.BatchNorm2d(exact.shape[1], momentum=torch_bn.builtin_momentum(flax_bn.MOMENTUM))
    layer(X)
    moving_means = {"nn.BatchNorm2d": layer.running_mean.numpy()}
    nhwc = jnp.asarray(to_nhwc(X.float().numpy()), jnp.bfloat16)
    for label, reductions in (("linen.BatchNorm", True), ("linen.BatchNorm(force_float32_reductions=False)", False)):
        module = linen.BatchNorm(**FLAX_SETTINGS, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                 force_float32_reductions=reductions)
        variables = module.init(jax.random.key(0), nhwc, use_running_average=False)
        _, changed = module.apply(variables, nhwc, use_running_average=False, mutable=["batch_stats"])
        moving_means[label] = np.asarray(changed["batch_stats"]["mean"], np.float64)
    nnx_batch_norm = nnx.BatchNorm(exact.shape[1], **FLAX_SETTINGS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx_batch_norm(nhwc)
    moving_means["nnx.BatchNorm"] = np.asarray(nnx_batch_norm.mean[...], np.float64)
    relative = {label: np.max(np.abs(mean - expected) / np.abs(expected)) for label, mean in moving_means.items()}
    for label in ("nn.BatchNorm2d", "linen.BatchNorm", "nnx.BatchNorm"):
        assert relative[label] < 1e-6, (label, relative)  # float32's rounding
    assert relative["linen.BatchNorm(force_float32_reductions=False)"] > 1e-4, relative  # bfloat16's


def test_nnx_promote_dtype_that_keeps_the_statistics_is_pytorchs():
    """bfloat16 input, float32 scale, bias and running statistics, in inference: nn.BatchNorm uses
    them as they are; nnx.BatchNorm's default promote_dtype rounds them to bfloat16 first (a running
    mean of 100.3 becomes 100.5, where bfloat16's spacing is 0.5), and the project's promote_input_only
    leaves them, as linen.BatchNorm does. Outputs compared within bfloat16's rounding of the output."""
    rng = np.random.default_rng(24)
    X = torch.from_numpy(100.0 + 0.5 * rng.standard_normal((32, 3))).to(torch.bfloat16)
    statistics = {"mean": np.float32(100.3), "var": np.float32(0.25), "scale": np.float32(1.5),
                  "bias": np.float32(0.1)}
    layer = torch.nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        layer.running_mean.fill_(float(statistics["mean"]))
        layer.running_var.fill_(float(statistics["var"]))
        layer.weight.fill_(float(statistics["scale"]))
        layer.bias.fill_(float(statistics["bias"]))
    reference = layer(X).detach().float().numpy()
    x = jnp.asarray(X.float().numpy(), jnp.bfloat16)

    def nnx_output(**options):
        batch_norm = nnx.BatchNorm(3, use_running_average=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **options)
        for name, value in statistics.items():
            getattr(batch_norm, name).set_value(jnp.full(3, value, jnp.float32))
        return np.asarray(batch_norm(x), np.float32)

    linen_variables = {"params": {"scale": jnp.full(3, statistics["scale"]), "bias": jnp.full(3, statistics["bias"])},
                       "batch_stats": {"mean": jnp.full(3, statistics["mean"]), "var": jnp.full(3, statistics["var"])}}
    outputs = {"nnx.BatchNorm(promote_dtype=promote_input_only)": nnx_output(promote_dtype=promote_input_only),
               "linen.BatchNorm": np.asarray(linen.BatchNorm(use_running_average=True, dtype=jnp.bfloat16).apply(
                   jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), linen_variables), x), np.float32)}
    rounding = 2.0 ** -8 * np.abs(reference)  # bfloat16 keeps 8 significant bits
    for label, output in outputs.items():
        assert np.all(np.abs(output - reference) <= rounding), label
    assert np.max(np.abs(nnx_output() - reference)) > 0.3  # (100.5 - 100.3) / 0.5 * 1.5


# --- Flax's mask -------------------------------------------------------------------------------

def test_flax_mask_is_pytorch_on_the_selected_rows():
    """Flax's mask= leaves rows out of the statistics (this project masks the padding of a shorter
    shard with it); PyTorch has no counterpart: the layer is given the selected rows alone. The rows
    left out still get an output; with no share of the loss (a zero cotangent), no gradient."""
    batches = random_batches(25)
    selected = np.zeros(len(batches.train[0]), bool)
    selected[[0, 2, len(selected) - 1]] = True
    for cotangent in batches.cotangents:
        cotangent[~selected] = 0.0
    torch_trace = train_torch(torch_layer(batches), batches.rows(selected))
    mask = jnp.asarray(selected.reshape(-1, 1, 1, 1))  # broadcast against NHWC
    with_mask = {"mask": mask}
    traces = flax_traces(batches, nnx_options=with_mask, linen_options=with_mask)
    for api, trace in traces.items():
        assert_same_numbers("nn.BatchNorm on the selected rows", torch_trace, f"{api}(mask=)", trace.rows(selected),
                            momenta=CHAPTER_MOMENTA, values_per_channel=batches.rows(selected).values_per_channel)
        np.testing.assert_array_equal(np.array(trace.input_gradients)[:, ~selected], 0.0)


# --- over several workers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def option_workers():
    """One launch of tests/parallel_workers.option_scenarios in OPTION_WORKERS processes."""
    return launch_local_workers(parallel_workers.option_scenarios, (), parallel_workers.OPTION_WORKERS)


def host_mesh(shape=(parallel_workers.OPTION_WORKERS,), names=(AXIS,)):
    return Mesh(np.array(jax.devices("cpu")[:parallel_workers.OPTION_WORKERS]).reshape(shape), names)


def flax_layer_on_workers(api, X, cotangent, gamma, beta, mesh, axes, check_vma=True, **options):
    """nnx.BatchNorm or linen.BatchNorm (api), or the scratch batch_norm ('scratch'), on each worker's
    rows of X under shard_map, gamma and beta each worker's own copy: per worker (Y, gradients of
    sum(Y * cotangent) wrt X, gamma and beta, moving mean and variance). X: (N, C)."""
    workers = mesh.devices.size
    channels = X.shape[1]

    def worker(X, cotangent, gamma, beta):
        gamma, beta = gamma[0], beta[0]
        zeros, ones = jnp.zeros(channels, X.dtype), jnp.ones(channels, X.dtype)

        def loss(X, gamma, beta):
            if api == "scratch":
                Y, mean, var = flax_bn.batch_norm(X, gamma, beta, zeros, ones, flax_bn.EPS, flax_bn.MOMENTUM, True,
                                                  axis_name=options.get("axis_name"))
            elif api == "linen":
                variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": zeros, "var": ones}}
                Y, changed = linen_module(**options).apply(variables, X, use_running_average=False,
                                                           mutable=["batch_stats"])
                mean, var = changed["batch_stats"]["mean"], changed["batch_stats"]["var"]
            else:
                layer = nnx.BatchNorm(channels, dtype=X.dtype, param_dtype=X.dtype, rngs=nnx.Rngs(0),
                                      **{**FLAX_SETTINGS, **options})
                layer.scale[...], layer.bias[...] = gamma, beta
                layer.mean.set_value(zeros)
                layer.var.set_value(ones)
                Y = layer(X)
                mean, var = layer.mean[...], layer.var[...]
            return jnp.sum(Y * cotangent), (Y, mean, var)
        (_, (Y, mean, var)), gradients = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(X, gamma, beta)
        return Y, gradients[0], gradients[1][None], gradients[2][None], mean[None], var[None]

    step = jax.jit(jax.shard_map(worker, mesh=mesh, in_specs=(P(axes),) * 4, out_specs=(P(axes),) * 6,
                                 check_vma=check_vma))
    per_worker = np.repeat(gamma[None], workers, axis=0), np.repeat(beta[None], workers, axis=0)
    Y, X_gradient, gamma_gradients, beta_gradients, means, variances = step(X, cotangent, *per_worker)
    rows = len(X) // workers
    return [{"Y": np.asarray(Y)[worker * rows:(worker + 1) * rows],
             "X": np.asarray(X_gradient)[worker * rows:(worker + 1) * rows],
             "gamma": np.asarray(gamma_gradients)[worker], "beta": np.asarray(beta_gradients)[worker],
             "moving_mean": np.asarray(means)[worker], "moving_var": np.asarray(variances)[worker]}
            for worker in range(workers)]


def assert_each_group_is_one_device_on_its_rows(label, per_worker):
    """Outputs, input gradients and moving statistics of every worker, and the parameters' gradients
    summed over its group, as one device's on the group's rows together."""
    batches, cotangents, gamma, beta = parallel_workers.option_inputs()
    X, cotangent = batches[0], cotangents[0]
    rows = len(X) // parallel_workers.OPTION_WORKERS
    for group in parallel_workers.GROUPS:
        taken = np.concatenate([np.arange(worker * rows, (worker + 1) * rows) for worker in group])
        Y, gradients, moving_mean, moving_var = torch_scratch([X[taken]], gamma, beta, cotangent[taken])
        for index, worker in enumerate(group):
            own = slice(index * rows, (index + 1) * rows)
            for quantity, actual, expected in (("output", per_worker[worker]["Y"], Y[own]),
                                               ("gradient wrt input", per_worker[worker]["X"], gradients["X"][own]),
                                               ("moving mean", per_worker[worker]["moving_mean"], moving_mean),
                                               ("moving variance", per_worker[worker]["moving_var"], moving_var)):
                difference = max_abs_difference(actual, expected)
                assert difference <= FLOAT64_PASS * magnitude(expected), (
                    f"{label}, worker {worker} of group {group}: {quantity} differs from one device on the group's "
                    f"rows by {difference:.3e}")
        for name in ("gamma", "beta"):
            summed = sum(per_worker[worker][name] for worker in group)
            assert max_abs_difference(summed, gradients[name]) <= FLOAT64_PASS * magnitude(gradients[name]), (
                label, group, name)


def test_grouped_statistics_are_process_group_and_axis_index_groups(option_workers):
    """4 workers, 2 rows each, in 2 groups ([0, 1] and [2, 3]) that normalise apart: PyTorch's scratch
    layer over each worker's subgroup (torch.distributed.new_subgroups_by_enumeration, as
    nn.SyncBatchNorm(process_group=...) takes it: that layer has no CPU kernels), and Flax's
    axis_index_groups. shard_map refuses axis_index_groups (NotImplementedError, google/jax#19709)
    unless check_vma=False, which is how jax.pmap runs it; a 2-D mesh whose inner axis is a group
    needs neither, and suits the scratch layer too."""
    assert_each_group_is_one_device_on_its_rows("torch-scratch over 4 processes, process_group",
                                                option_workers["grouped"])
    batches, cotangents, gamma, beta = parallel_workers.option_inputs()
    X, cotangent = jnp.asarray(batches[0]), jnp.asarray(cotangents[0])
    grouped = {"axis_name": AXIS, "axis_index_groups": parallel_workers.GROUPS}
    one_axis, two_axes = host_mesh(), host_mesh((2, 2), ("groups", AXIS))
    for api in ("nnx", "linen"):
        with pytest.raises(NotImplementedError):
            flax_layer_on_workers(api, X, cotangent, gamma, beta, one_axis, AXIS, **grouped)
        assert_each_group_is_one_device_on_its_rows(
            f"{api}.BatchNorm(axis_index_groups), check_vma=False",
            flax_layer_on_workers(api, X, cotangent, gamma, beta, one_axis, AXIS, check_vma=False, **grouped))
    for api in ("nnx", "scratch"):
        assert_each_group_is_one_device_on_its_rows(
            f"{api} on a (groups, {AXIS}) mesh, axis_name={AXIS!r}",
            flax_layer_on_workers(api, X, cotangent, gamma, beta, two_axes, ("groups", AXIS), axis_name=AXIS))


def test_sync_batch_norm_with_a_process_group_is_axis_index_groups(option_workers):
    """nn.SyncBatchNorm(process_group=...) itself, each group of 2 workers on its own statistics (all 4
    on one GPU, over gloo): the same output and moving mean as one device on the group's rows, and the
    unbiased moving variance with the group's count. Runs where PyTorch sees a CUDA GPU."""
    per_worker = option_workers["gpu grouped"]
    if per_worker is None:
        pytest.skip("needs a CUDA GPU: nn.SyncBatchNorm trains on GPUs only")
    batches, _, _, _ = parallel_workers.option_inputs()
    X = batches[0]
    rows = len(X) // parallel_workers.OPTION_WORKERS
    for group in parallel_workers.GROUPS:
        for worker in group:
            assert "error" not in per_worker[worker], per_worker[worker].get("error")
        group_rows = np.concatenate([X[worker * rows:(worker + 1) * rows] for worker in group])
        n = len(group_rows)
        mean, var = group_rows.mean(axis=0), group_rows.var(axis=0)
        expected = (group_rows - mean) / np.sqrt(var + 1e-5)
        np.testing.assert_allclose(np.concatenate([per_worker[worker]["Y"] for worker in group]), expected,
                                   atol=1e-12)
        for worker in group:
            np.testing.assert_allclose(per_worker[worker]["running_mean"], 0.1 * mean, rtol=1e-12)
            np.testing.assert_allclose(per_worker[worker]["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12)


def nn_batch_norm_on(X):
    """One training forward of nn.BatchNorm1d (the project's settings) on X: (output, running mean,
    running variance)."""
    layer = torch.nn.BatchNorm1d(X.shape[1], dtype=torch.float64, **TORCH_SETTINGS)
    Y = layer(torch.from_numpy(np.asarray(X))).detach().numpy()
    return Y, layer.running_mean.numpy(), layer.running_var.numpy()


def assert_is_nn_batch_norm_on(label, X, Y, mean, var):
    """Output and moving statistics of a Flax layer (variance biased) as nn.BatchNorm1d's on X."""
    expected = nn_batch_norm_on(X)
    np.testing.assert_allclose(np.asarray(Y), expected[0], atol=FLOAT64_PASS, err_msg=f"{label}: output")
    np.testing.assert_allclose(np.asarray(mean), expected[1], atol=FLOAT64_PASS, err_msg=f"{label}: moving mean")
    np.testing.assert_allclose(pytorch_variances([var], [flax_bn.MOMENTUM], len(X))[0], expected[2],
                               atol=FLOAT64_PASS, err_msg=f"{label}: moving variance")


def test_jit_over_a_sharded_batch_is_global_and_shard_map_per_device():
    """The same nnx.BatchNorm and linen.BatchNorm, without axis_name: under jax.jit over a batch
    sharded across 4 devices (the global view) their statistics are the whole batch's, as
    nn.SyncBatchNorm's; under shard_map (and pmap) each device's own, as each DDP replica's. Code
    moved from pmap to jit changes them without a word (AlgoPerf, commit 47beba15); shard_map with
    axis_name is the whole batch's again."""
    batches, cotangents, _, _ = parallel_workers.option_inputs()
    X, cotangent = batches[0], cotangents[0]
    channels = X.shape[1]
    mesh = host_mesh()
    sharded = jax.device_put(jnp.asarray(X), NamedSharding(mesh, P(AXIS)))
    layer = nnx.BatchNorm(channels, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **FLAX_SETTINGS)
    layer.mean.set_value(jnp.zeros(channels))
    layer.var.set_value(jnp.ones(channels))
    Y = nnx.jit(lambda layer, X: layer(X))(layer, sharded)
    assert_is_nn_batch_norm_on("nnx.BatchNorm under jax.jit", X, Y, layer.mean[...], layer.var[...])
    module = linen_module()
    variables = jax.tree.map(lambda value: jnp.asarray(value, jnp.float64),
                             dict(module.init(jax.random.key(0), X, use_running_average=False)))
    Y, changed = jax.jit(lambda variables, X: module.apply(variables, X, use_running_average=False,
                                                           mutable=["batch_stats"]))(variables, sharded)
    assert_is_nn_batch_norm_on("linen.BatchNorm under jax.jit", X, Y, changed["batch_stats"]["mean"],
                               changed["batch_stats"]["var"])
    ones, zeros = np.ones(channels), np.zeros(channels)
    for api in ("nnx", "linen"):
        per_device = flax_layer_on_workers(api, jnp.asarray(X), jnp.asarray(cotangent), ones, zeros, mesh, AXIS)
        rows = len(X) // len(per_device)
        for worker, result in enumerate(per_device):
            assert_is_nn_batch_norm_on(f"{api} under shard_map, worker {worker}", X[worker * rows:(worker + 1) * rows],
                                       result["Y"], result["moving_mean"], result["moving_var"])
        global_again = flax_layer_on_workers(api, jnp.asarray(X), jnp.asarray(cotangent), ones, zeros, mesh, AXIS,
                                             axis_name=AXIS)
        np.testing.assert_allclose(np.concatenate([result["Y"] for result in global_again]), nn_batch_norm_on(X)[0],
                                   atol=FLOAT64_PASS, err_msg=f"{api} under shard_map with axis_name")


def test_ddp_broadcast_buffers_false_is_jax_statistics_per_device(option_workers):
    """DistributedDataParallel(broadcast_buffers=False): each replica's running statistics follow its
    own shards, as each device's under shard_map (stacked along the mesh axis, as this project keeps
    them). The default, True, starts every forward pass after a training step from worker 0's
    (test_data_parallel.py pins when): in JAX, worker 0's row given to every worker before each step.
    Compared on the running means, which differ from worker to worker."""
    ddp = option_workers["ddp"]
    batches, _, _, _ = parallel_workers.option_inputs()
    workers = parallel_workers.OPTION_WORKERS
    momentum = 1.0 - parallel_workers.DDP_MOMENTUM  # the chapter's convention, Flax's

    @jax.jit
    @partial(jax.shard_map, mesh=host_mesh(), in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS))
    def statistics_step(means, X):
        layer = nnx.BatchNorm(X.shape[1], momentum=momentum, dtype=X.dtype, param_dtype=X.dtype, rngs=nnx.Rngs(0))
        layer.mean.set_value(means[0])
        layer.var.set_value(jnp.ones_like(means[0]))
        layer(X)
        return layer.mean[...][None]

    final = {}
    for broadcast in (False, True):
        means = jnp.zeros((workers, batches.shape[2]))
        for step, X in enumerate(batches):
            if broadcast:
                means = jnp.broadcast_to(means[:1], means.shape)
            means = statistics_step(means, jnp.asarray(X))
            for worker in range(workers):
                np.testing.assert_allclose(np.asarray(means[worker]), ddp[broadcast][worker][step][0], rtol=1e-12,
                                           err_msg=f"broadcast_buffers={broadcast}, worker {worker}, step {step + 1}")
        final[broadcast] = np.asarray(means)
    assert np.max(np.abs(final[False] - final[True])) > 1e-2
