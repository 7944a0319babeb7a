"""Trained models moved between the six implementations through checkpoint files (common/checkpoint.py
and each framework's impls/<framework>/checkpoint.py), and what a move does to the predictions and to
the training steps after it.

The trained models are the session-scoped trajectory fixtures (tests/conftest.py: every implementation
100 SGD steps at lr 1.0 on the shared batch order; float64 on batches of 64, float32 on the chapter's
256).
Each is moved through the canonical file (written, then read back). Logits are compared on the first
TEST_IMAGES images of the test set: float64 inference of JAX on this CPU costs about half a second per
thousand images and model, and 36 pairs over the whole test set would take minutes. (compare.py
--evaluate evaluates whole test sets, in tests/test_compare.py.)
"""

import copy
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from torch import nn

from common import checkpoint
from common.checkpoint import CheckpointError
from common.drivers import checkpoints
from common.data import train_batches
from impls import registry
from impls.registry import IMPLEMENTATIONS
from common.init import (BATCH_NORM_LAYERS, MOVING_STAT_NAMES, PARAMETER_NAMES, VALUES_PER_EXAMPLE, WEIGHT_NAMES,
                         canonical_weights)
from tests.conftest import FLOAT32_TRAJECTORY_BATCH, FLOAT64_TRAJECTORY_BATCH, TRAJECTORY_STEPS
from tests.support import NAMES, build, inputs, predict
from tests.tolerances import FLOAT32_PORTED_LOGITS, FLOAT64_PASS, FLOAT64_TRAJECTORY, assert_close, magnitude

TEST_IMAGES = 500
STEPS_AFTER = 3  # training steps after a move, on the first batches of epoch 2
MOVING_MEANS = tuple(key for key in MOVING_STAT_NAMES if key.endswith("moving_mean"))
BATCHES = {"float64": FLOAT64_TRAJECTORY_BATCH, "float32": FLOAT32_TRAJECTORY_BATCH}


@pytest.fixture(scope="module")
def test_images(fashion_mnist):
    # A copy: the loader's arrays are read-only, and torch.from_numpy warns of a view of one.
    return fashion_mnist[2][:TEST_IMAGES].copy()


def own_logits(trajectories, name, images):
    """The trained model's inference-mode logits, in the implementation it was trained in."""
    module, model, _ = trajectories[name][2]
    dtype = trajectories[name][1][-1]["conv1.weight"].dtype
    model.eval()
    try:
        X, _ = inputs(module, module.select_device("cpu", dtype), images, np.zeros(len(images), np.int64), dtype)
        return module.to_numpy(module.predict(model, X))
    finally:
        model.train()  # as the trajectory left it


def moved(trajectories, dtype, folder):
    """{name: its trained model, written into a canonical file and read back}."""
    ported = {}
    for name in NAMES:
        weights = trajectories[name][1][-1]
        metadata = checkpoints.metadata_for(name, weights, TRAJECTORY_STEPS, BATCHES[dtype], 1.0, 0, float("nan"))
        ported[name] = checkpoints.read(checkpoint.save(weights, folder / f"{name}.safetensors", metadata))
    return ported


@pytest.fixture(scope="module")
def moved_float64(trajectories_float64, tmp_path_factory):
    return moved(trajectories_float64, "float64", tmp_path_factory.mktemp("float64"))


@pytest.fixture(scope="module")
def moved_float32(trajectories_float32, tmp_path_factory):
    return moved(trajectories_float32, "float32", tmp_path_factory.mktemp("float32"))


# ---------------------------------------------------------------------------
# Predictions after a move
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", NAMES)
def test_float64_a_moved_model_predicts_what_it_predicted_where_it_was_trained(
        trajectories_float64, moved_float64, test_images, source):
    """Every (trained in, evaluated in) pair: the logits within 1e-12 of the trained model's own,
    relative to their largest magnitude. torch-builtin's unbiased running variance included: the
    stored value is what inference uses, wherever it is loaded."""
    reference = own_logits(trajectories_float64, source, test_images)
    ported = moved_float64[source]
    assert ported.source == source and ported.metadata["running_var"] == checkpoints.running_variance_of(source)
    for target in NAMES:
        assert_close(f"test logits of the model trained in {source}", source, reference, f"it in {target}",
                     predict(target, ported.weights, test_images), FLOAT64_PASS * magnitude(reference))


@pytest.mark.parametrize("source", NAMES)
def test_float32_a_moved_model_predicts_within_float32_rounding(trajectories_float32, moved_float32, test_images,
                                                                source):
    reference = own_logits(trajectories_float32, source, test_images)
    for target in NAMES:
        assert_close(f"float32 test logits of the model trained in {source}", source, reference, f"it in {target}",
                     predict(target, moved_float32[source].weights, test_images),
                     FLOAT32_PORTED_LOGITS * magnitude(reference))


# ---------------------------------------------------------------------------
# Every format and framework, and back
# ---------------------------------------------------------------------------


# From PyTorch's state_dict through the canonical file, NNX's Orbax folder and Linen's, and back: each
# chain passes both of a framework's batch-norm layers between them, so that the six formats are all used.
CHAINS = {"torch-builtin first": ("torch-builtin", "flax-scratch", "linen-builtin", "torch-builtin"),
          "torch-scratch first": ("torch-scratch", "flax-builtin", "linen-scratch", "torch-scratch")}


def assert_same_arrays(weights, expected, where):
    for key in WEIGHT_NAMES:
        assert (weights[key].dtype, weights[key].shape) == (expected[key].dtype, expected[key].shape), (where, key)
        assert weights[key].tobytes() == expected[key].tobytes(), f"{where}: {key} changed"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chain", CHAINS)
def test_a_round_trip_through_every_format_returns_the_same_arrays(request, tmp_path, chain, dtype):
    """state_dict -> canonical -> NNX's Orbax -> canonical -> Linen's Orbax -> canonical -> state_dict:
    the same bytes at every stop, and at the end the state_dict PyTorch started from, nn.BatchNorm's
    num_batches_tracked included (the canonical file carries it as the metadata's steps)."""
    trajectories = request.getfixturevalue(f"trajectories_{dtype}")
    first, *others = CHAINS[chain]
    _, model, _ = trajectories[first][2]
    started = {key: value.clone() for key, value in model.state_dict().items()}
    expected = trajectories[first][1][-1]
    ported = checkpoints.read(registry.checkpoint("pytorch").save_native(model, tmp_path / "0.pt", {}))
    assert_same_arrays(ported.weights, expected, "state_dict")
    for index, name in enumerate(others, start=1):
        ported = checkpoints.read(checkpoint.save(ported.weights, tmp_path / f"{index}.safetensors", ported.metadata))
        assert_same_arrays(ported.weights, expected, f"canonical file {index}")
        framework = IMPLEMENTATIONS[name][0]
        _, model, _ = build(name, ported.weights)
        native = registry.checkpoint(framework)
        path = native.save_native(model, tmp_path / f"{index}{native.NATIVE_SUFFIX}", ported.metadata)
        ported = checkpoints.read(path)
        assert ported.format == framework
        assert_same_arrays(ported.weights, expected, f"{name}'s {native.NATIVE_SUFFIX}")
    ended = torch.load(path, weights_only=True)
    assert list(ended) == list(started)
    for key, value in started.items():
        assert ended[key].dtype == value.dtype and torch.equal(ended[key], value), key
    if IMPLEMENTATIONS[first][1] == "builtin":
        assert int(ended["bn1.num_batches_tracked"]) == TRAJECTORY_STEPS


def test_flax_guides_restore_rounds_float64_statistics_to_float32_where_load_native_keeps_them(tmp_path):
    """Flax's guide restores into the state of a model built as shapes (nnx.eval_shape): Orbax casts
    each array to that target's dtype, and nnx.BatchNorm makes its running statistics float32 whatever
    param_dtype, so a float64 checkpoint's statistics come back rounded. load_native restores the
    stored dtypes (Orbax's own metadata as the target) and puts them in (nnx.replace_by_pure_dict)."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from impls.flax.checkpoint import checkpointer
    from impls.flax.lenet import LeNet
    weights = canonical_weights(0, np.float64)
    weights["bn1.moving_var"] = weights["bn1.moving_var"] / 3  # not a float32 number
    _, model, _ = build("flax-builtin", weights)
    path = registry.checkpoint("flax").save_native(model, tmp_path / "model.orbax", {})
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: LeNet("builtin", param_dtype=jnp.float64)))
    guides = nnx.merge(graphdef, checkpointer().restore(path, args=ocp.args.StandardRestore(abstract_state)))
    assert guides.bn1.var[...].dtype == np.float32 and guides.conv1.kernel[...].dtype == np.float64
    assert np.max(np.abs(np.asarray(guides.bn1.var[...], np.float64) - weights["bn1.moving_var"])) > 1e-9
    assert_same_arrays(checkpoints.read(path).weights, weights, "load_native")


# ---------------------------------------------------------------------------
# Training on after a move
# ---------------------------------------------------------------------------


def training_copy(trajectories, name):
    """A copy of `name`'s trained model and optimizer that trains with the step its trajectory
    compiled: JAX compiles a step anew for each new optax transformation or Linen module, about
    5 s each in float64 here, and a copy keeps the trajectory's."""
    module, model, optimizer = trajectories[name][2]
    if module.FRAMEWORK == "pytorch":
        model = copy.deepcopy(model)
        return module, model, module.make_optimizer(model, 1.0)
    if module.FRAMEWORK == "flax":
        # nnx.clone: new Variables (nnx.merge of nnx.split would hand back the same ones, to be trained).
        return (module, *nnx.clone((model, optimizer)))
    return module, type(model)(model.module, dict(model.variables)), type(optimizer)(optimizer.state)


def holding(copy_, weights):
    """The copy, its state replaced by that of a model its implementation built from `weights`
    (build_lenet: the move)."""
    module, model, _ = copy_
    built = module.build_lenet(weights, model.norm, module.select_device("cpu", np.float64))
    if module.FRAMEWORK == "pytorch":
        model.load_state_dict(built.state_dict())
    elif module.FRAMEWORK == "flax":
        nnx.update(model, nnx.state(built))
    else:
        model.variables = built.variables
    return copy_


def train_on(copy_, fashion_mnist, steps=STEPS_AFTER):
    """`steps` SGD steps (lr 1.0) on the first batches of epoch 2; the weights after them."""
    module, model, optimizer = copy_
    train_images, train_labels, _, _ = fashion_mnist
    step = module.bound_train_step(model, optimizer)
    device = module.select_device("cpu", np.float64)
    batches = train_batches(train_images, train_labels, FLOAT64_TRAJECTORY_BATCH, 0, epoch=2, layout=module.LAYOUT)
    for _, (images, labels) in zip(range(steps), batches):
        step(*module.to_device(images, labels, device, np.float64))
    return module.export_weights(model)


def values_per_channel(layer):
    """n of n/(n-1): the values per channel in one of the batches trained on after the move."""
    return FLOAT64_TRAJECTORY_BATCH * VALUES_PER_EXAMPLE[layer]


def in_other_convention(value, convention, moved_value, momentum, steps, n):
    """The moving variance the other convention holds after `steps` steps from the same `moved_value`,
    given this convention's `value`. Each step adds (1 - m) times the batch's variance, unbiased
    n/(n-1) times the biased one, and weighs what was there by m: so unbiased = (n * biased - m^steps *
    moved) / (n - 1), the moved value's share m^steps being the same in both."""
    decay = momentum ** steps
    if convention == "biased":
        return (n * value - decay * moved_value) / (n - 1)
    return ((n - 1) * value + decay * moved_value) / n


@pytest.mark.parametrize("source", NAMES)
def test_training_on_after_a_move_equals_training_on_without_it(trajectories_float64, moved_float64, fashion_mnist,
                                                                 source):
    """STEPS_AFTER steps of the model moved into each implementation against the same steps of the
    trained model itself, in float64: the parameters and moving means within 1e-9; the moving
    variances within 1e-9 where both keep the same variance, and where they do not, within 1e-9 of
    what the two conventions predict from the stored value, the momentum and n/(n-1) (the loader
    keeps the stored value: what a step adds is then in the new implementation's convention)."""
    without = train_on(training_copy(trajectories_float64, source), fashion_mnist)
    ported = moved_float64[source]
    stored, momentum = ported.metadata["running_var"], float(ported.metadata["momentum"])
    for target in NAMES:
        after = train_on(holding(training_copy(trajectories_float64, target), ported.weights), fashion_mnist)
        for key in PARAMETER_NAMES + MOVING_MEANS:
            assert_close(f"{key} after {STEPS_AFTER} steps, trained in {source}", "without a move", without[key],
                         f"moved into {target}", after[key], FLOAT64_TRAJECTORY * magnitude(without[key]))
        for layer in BATCH_NORM_LAYERS:
            key = f"{layer}.moving_var"
            expected = without[key]
            if checkpoints.running_variance_of(target) != stored:
                expected = in_other_convention(without[key], stored, ported.weights[key], momentum, STEPS_AFTER,
                                               values_per_channel(layer))
                # The conventions differ by far more than the bound: the prediction is tested, not the bound.
                assert np.max(np.abs(expected - without[key])) > 1e3 * FLOAT64_TRAJECTORY * magnitude(expected)
            assert_close(f"{key} after {STEPS_AFTER} steps, trained in {source} ({stored})", "predicted", expected,
                         f"moved into {target}", after[key], FLOAT64_TRAJECTORY * magnitude(expected))


def converted_pairs():
    return [(source, target) for source in NAMES for target in NAMES
            if checkpoints.running_variance_of(source) != checkpoints.running_variance_of(target)]


def test_running_var_convert_keeps_the_two_conventions_in_proportion_through_training(
        trajectories_float64, moved_float64, fashion_mnist):
    """--running-var convert: the moved variances rescaled to the target's convention by n/(n-1) (or
    its inverse), and then, after STEPS_AFTER steps in each, the unbiased moving variance is n/(n-1)
    times the biased one, exactly as far as float64 goes: each step adds the two conventions' variances
    of the same batch, in that proportion, to values already in it."""
    withouts = {}
    pairs = converted_pairs()
    assert len(pairs) == 10  # torch-builtin against the five others, both ways
    for source, target in pairs:
        ported = moved_float64[source]
        wanted = checkpoints.running_variance_of(target)
        converted = checkpoint.convert_running_variance(ported.weights, ported.metadata["running_var"], wanted,
                                                        FLOAT64_TRAJECTORY_BATCH)
        if source not in withouts:
            withouts[source] = train_on(training_copy(trajectories_float64, source), fashion_mnist)
        after = train_on(holding(training_copy(trajectories_float64, target), converted), fashion_mnist)
        for layer in BATCH_NORM_LAYERS:
            key, n = f"{layer}.moving_var", values_per_channel(layer)
            unbiased, biased = (after[key], withouts[source][key]) if wanted == "unbiased" else (withouts[source][key],
                                                                                                after[key])
            assert_close(f"{key}, {source} moved into {target} with convert", "unbiased", unbiased,
                         "n/(n-1) x biased", n / (n - 1) * biased, FLOAT64_TRAJECTORY * magnitude(unbiased))


def test_running_var_convert_predicts_as_the_target_trained_alike(trajectories_float64, moved_float64, test_images):
    """What each choice does to inference, for the pairs whose conventions differ. keep: the model
    predicts what it predicted where it was trained (above), which is not what the target predicts
    after training on the same batches. convert: its moving variances become the target's own but for
    the share m^K of the initial variance that the conversion scaled too, (factor - 1) m^K after K
    steps from 1, and its predictions come a hundred times closer to the target's, at least (measured:
    7.1e-2 kept against 1.4e-5 converted, torch-builtin's model in torch-scratch)."""
    initial = canonical_weights(0, np.float64)
    for source, target in converted_pairs():
        ported = moved_float64[source]
        momentum = float(ported.metadata["momentum"])
        wanted = checkpoints.running_variance_of(target)
        converted = checkpoint.convert_running_variance(ported.weights, ported.metadata["running_var"], wanted,
                                                        FLOAT64_TRAJECTORY_BATCH)
        own = trajectories_float64[target][1][-1]
        for layer in BATCH_NORM_LAYERS:
            key, n = f"{layer}.moving_var", FLOAT64_TRAJECTORY_BATCH * VALUES_PER_EXAMPLE[layer]
            factor = n / (n - 1) if wanted == "unbiased" else (n - 1) / n
            expected = own[key] + (factor - 1) * momentum ** TRAJECTORY_STEPS * initial[key]
            assert_close(f"{key}, {source} moved into {target} with convert", "predicted", expected, "converted",
                         converted[key], FLOAT64_TRAJECTORY * magnitude(expected))
        target_logits = own_logits(trajectories_float64, target, test_images)
        kept = np.max(np.abs(predict(target, ported.weights, test_images) - target_logits))
        after_conversion = np.max(np.abs(predict(target, converted, test_images) - target_logits))
        assert after_conversion < kept / 100, (source, target, kept, after_conversion)


# ---------------------------------------------------------------------------
# compare.py --init
# ---------------------------------------------------------------------------


def test_init_trains_on_from_the_checkpoint_cast_and_converted(moved_float64, tmp_path, capsys):
    """compare.py --init, in this process: a float64 checkpoint of flax-scratch (biased) into a float32
    run of the two PyTorch models with --running-var convert, at an lr that leaves the parameters as
    they were (1e-30). The run says it cast; the checkpoints it writes hold the file's parameters, its
    steps plus one, and torch-builtin's moving variances n/(n-1) times torch-scratch's after the step."""
    import compare
    source = moved_float64["flax-scratch"]
    out = tmp_path / "out"
    assert compare.main(["--init", source.path, "--running-var", "convert", "--impls", "torch-scratch,torch-builtin",
                         "--epochs", "1", "--max-batches", "1", "--batch-size", "64", "--lr", "1e-30",
                         "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    assert f"--init {source.path}: float64 weights, cast to float32 for this run" in capsys.readouterr().out
    written = {name: checkpoints.read(out / "checkpoints" / f"{name}.safetensors") for name in ("torch-scratch",
                                                                                               "torch-builtin")}
    for name, ported in written.items():
        assert ported.metadata["steps"] == str(TRAJECTORY_STEPS + 1)
        assert ported.metadata["init"] == f"{source.path} (--running-var convert)"
        for key in PARAMETER_NAMES:
            np.testing.assert_array_equal(ported.weights[key], source.weights[key].astype(np.float32), err_msg=key)
    for layer in BATCH_NORM_LAYERS:
        n, key = 64 * VALUES_PER_EXAMPLE[layer], f"{layer}.moving_var"
        np.testing.assert_allclose(written["torch-builtin"].weights[key],
                                   n / (n - 1) * written["torch-scratch"].weights[key], rtol=1e-5, err_msg=key)


# ---------------------------------------------------------------------------
# Bad input: one line naming the tensor and what was expected
# ---------------------------------------------------------------------------


def canonical_file(folder, change=None, metadata=None):
    """A file in the canonical format as a user might write it (safetensors' own save_file)."""
    weights = canonical_weights(0, np.float32)
    if change:
        change(weights)
    path = folder / "lenet.safetensors"
    safetensors.numpy.save_file(weights, str(path), metadata=metadata)
    return path


def truncated(path):
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def text_file(folder):
    (folder / "notes.txt").write_text("trained for 10 epochs\n")
    return folder / "notes.txt"


def torch_file(folder, value, name="model.pt"):
    torch.save(value, folder / name)
    return folder / name


def d2l_lenet():
    """The chapter's concise LeNet (d2l): the same layers, in an nn.Sequential, named by index."""
    return nn.Sequential(nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, 2),
                         nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
                         nn.Flatten(), nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
                         nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(), nn.Linear(84, 10))


def lenet_state_dict(change=None):
    _, model, _ = build("torch-builtin", canonical_weights(0, np.float32))
    state = model.state_dict()
    if change:
        change(state)
    return state


def orbax_folder(folder, tree, name="model.orbax"):
    from impls.flax.checkpoint import save_orbax
    return save_orbax(tree, folder / name, {})


def interrupted_orbax(folder):
    """What an interrupted Orbax save leaves: Orbax writes into '<name>.orbax-checkpoint-tmp-<time>' and
    renames it to <name> when complete; here a complete one, renamed back."""
    import orbax.checkpoint as ocp
    _, model, _ = build("flax-builtin", canonical_weights(0, np.float32))
    complete = registry.checkpoint("flax").save_native(model, folder / "model.orbax", {})
    left = folder / f"model.orbax{ocp.path.step.TMP_DIR_SUFFIX}-1234"
    shutil.move(complete, left)
    return left


def empty_folder(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


def a_run_not_there(folder):
    """runs/X, as the README writes it, beside two runs with checkpoints, the second written later."""
    for age, run in enumerate(("newer", "older")):
        (folder / "runs" / run / "checkpoints").mkdir(parents=True)
        os.utime(folder / "runs" / run, (1e9 - age, 1e9 - age))
    return folder / "runs" / "X"


BAD_INPUT = {
    "missing tensor": (lambda folder: canonical_file(folder, lambda weights: weights.pop("bn2.moving_var")),
                       r"tensor 'bn2\.moving_var' is missing: expected shape \(16,\)"),
    "extra tensor": (lambda folder: canonical_file(folder, lambda weights: weights.update(
        {"bn1.num_batches_tracked": np.array(3)})), r"unexpected tensor 'bn1\.num_batches_tracked' \(shape \(\)\)"),
    "wrong shape": (lambda folder: canonical_file(folder, lambda weights: weights.update(
        {"fc1.weight": np.zeros((120, 400), np.float32)})), r"tensor 'fc1\.weight' has shape \(120, 400\), "
                                                           r"expected \(120, 256\)"),
    "wrong dtype": (lambda folder: canonical_file(folder, lambda weights: weights.update(
        {"conv1.weight": weights["conv1.weight"].astype(np.float16)})),
        r"tensor 'conv1\.weight' is float16, expected float32 or float64"),
    "two dtypes": (lambda folder: canonical_file(folder, lambda weights: weights.update(
        {"bn4.beta": weights["bn4.beta"].astype(np.float64)})),
        r"tensor 'bn4\.beta' is float64, expected float32 as 'conv1\.weight'"),
    "another model's tensors": (lambda folder: canonical_file(folder, lambda weights: (weights.clear(), weights.update(
        {"encoder.weight": np.zeros((8, 4), np.float32), "decoder.weight": np.zeros((4, 8), np.float32)}))),
        r"not a checkpoint of this LeNet: none of its 2 tensors \('decoder\.weight', 'encoder\.weight'\)"),
    "another model's metadata": (lambda folder: canonical_file(folder, metadata={"model": "resnet18"}),
                                 r"a checkpoint of another model: its metadata says model 'resnet18'"),
    "truncated canonical file": (lambda folder: truncated(checkpoint.save(
        canonical_weights(0, np.float32), folder / "lenet.safetensors", {})), r"not a whole safetensors file \("),
    "truncated state_dict": (lambda folder: truncated(torch_file(folder, lenet_state_dict())),
                             r"torch\.load\(weights_only=True\) cannot read it \("),
    "not a checkpoint": (text_file, r"not a checkpoint: expected a \.safetensors file, a PyTorch state_dict"),
    "a pickled model, not a state_dict": (
        lambda folder: torch_file(folder, d2l_lenet()),
        r"torch\.load\(weights_only=True\) cannot read it \(Weights only load failed"),
    "a state_dict with other layer names": (
        lambda folder: torch_file(folder, d2l_lenet().state_dict()),
        r"\(state_dict\): LeNet's tensors under other names \('0\.weight' where LeNet has 'conv1\.weight'\): "
        r"rename them"),
    "a state_dict of another shape": (
        lambda folder: torch_file(folder, lenet_state_dict(lambda state: state.update(
            {"fc2.weight": torch.zeros(80, 120)}))), r"\(state_dict\): tensor 'fc2\.weight' has shape \(80, 120\), "
                                                     r"expected \(84, 120\)"),
    "an Orbax folder of another model": (lambda folder: orbax_folder(folder, {"encoder": {"kernel": np.zeros((3, 4))}}),
                                         r"\(NNX state\): not a checkpoint of this LeNet: none of its 1 tensors"),
    "an interrupted Orbax save": (interrupted_orbax, r"an Orbax save that did not finish \(its temporary folder\)"),
    "steps that are not a count": (lambda folder: canonical_file(folder, metadata={"steps": "ten"}),
                                   r"metadata 'steps' is 'ten', expected a whole number"),
    "an unknown running variance": (lambda folder: canonical_file(folder, metadata={"running_var": "sample"}),
                                    r"metadata 'running_var' is 'sample', expected one of biased, unbiased"),
    "no such file": (lambda folder: folder / "missing.safetensors", r"no such file or folder$"),
    "a run that is not there": (a_run_not_there, r"X: no such file or folder \(the newest run there with "
                                                 r"checkpoints: .*/runs/newer\)$"),
    "a folder without checkpoints": (empty_folder, r"a folder without \.safetensors checkpoints"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_naming_what_was_expected(tmp_path, case):
    make, message = BAD_INPUT[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as refused:
        checkpoints.read_all([path])
    text = str(refused.value)
    assert "\n" not in text and text.startswith(str(path).rstrip("/")), text
    assert re.search(message, text), text


def test_a_run_folder_gives_its_canonical_files_in_implementation_order(tmp_path):
    """--evaluate on a run's folder (or its checkpoints/): one canonical file per implementation, in
    the order of the implementations; the native files beside them, and what an interrupted Orbax save
    leaves, are not read."""
    folder = tmp_path / "run" / "checkpoints"
    weights = canonical_weights(0, np.float32)
    for name in reversed(NAMES):
        checkpoints.write(folder, name, weights, checkpoints.metadata_for(name, weights, 0, 64, 1.0, 0, 0.1))
    interrupted_orbax(folder)
    expected = [str(folder / f"{name}.safetensors") for name in NAMES]
    assert checkpoints.checkpoint_paths(tmp_path / "run") == expected
    assert checkpoints.checkpoint_paths(folder) == expected
    assert [ported.label for ported in checkpoints.read_all([folder])] == list(NAMES)
