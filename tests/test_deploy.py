"""Deployment, proved: batch norm folded into the layer before it (impls/*/deploy.py), the inference
exported from every framework (torch.export, jax.export, ONNX from PyTorch) and run by its runtime
(ONNX Runtime for ONNX), with the predictions of the trained model (common/drivers/deployment.py).

The models are the suite's trained ones (tests/conftest.py's trajectories, 100 SGD steps): their
moving statistics far from batch norm's initial 0 and 1, so that every term of the fold counts. In
float64 every runtime that computes in float64 agrees within a float64 rounding; ONNX Runtime does
not compute convolutions in float64, and float32 holds every artefact to its measured bound.
"""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from flax import nnx
from torch import nn
from tqdm import tqdm

from common.data import to_layout
from common.drivers import deployment
from common.drivers.checkpoints import Checkpoint
from common.report import console, page
from common.report.bounds import float32_bounds
from common.init import BATCH_NORM_LAYERS
from impls import registry
from impls.flax import batch_norm as flax_bn
from impls.pytorch import batch_norm as torch_bn
from impls.registry import IMPLEMENTATIONS
from tests.support import NAMES, build
from tests.tolerances import FLOAT32_DEPLOYED_LOGITS, FLOAT64_PASS, magnitude

pytestmark = pytest.mark.deploy  # the deploy extra throughout (pyproject.toml)

# float64 inference on the first test images only, as tests/test_checkpoints.py: XLA:CPU's float64
# convolutions make the whole test set costly, and 500 images reach every logit's rounding.
TEST_IMAGES = 500
# Images sent one at a time through every float32 artefact: a batch of one.
BATCH_OF_ONE_IMAGES = 8
# The float32 models deployed every way, as compare.py export deploys them: one of each batch norm,
# from two frameworks (tests/test_compare.py's export run deploys torch-builtin's and linen-scratch's;
# the float64 tests above fold and export each of the six). The bounds in tests/tolerances.py were
# measured by deploying all six, once, the same way.
DEPLOYED = ("torch-scratch", "flax-builtin")


@pytest.fixture(scope="module")
def images(fashion_mnist):
    return fashion_mnist[2][:TEST_IMAGES]


def as_input(train, images, dtype):
    """NCHW images as the framework's models take them: its layout, the model's dtype, a copy (the
    loader's arrays are read-only)."""
    return np.array(to_layout(images, train.LAYOUT), dtype)


def eager_logits(train, model, images, dtype):
    """The model's inference in its framework, eager (the reference every artefact is held to), as
    compare.py export computes it."""
    return deployment.eager_predictor(train.FRAMEWORK, model, dtype)(as_input(train, images, dtype))


def trained(name, trajectories, **options):
    """(train module, the model `name` trained in its trajectory, in inference mode, deploy module)."""
    weights = trajectories[name][1][-1]
    train, _, device = build(name, weights)
    model = train.build_lenet(weights, IMPLEMENTATIONS[name].norm, device, **options)
    model.eval()
    return train, model, registry.deploy(IMPLEMENTATIONS[name].framework), weights["conv1.weight"].dtype


def batch_norm_layers(framework, model):
    """The names of the model's batch-norm layers, scratch or built in, read off the model itself."""
    if framework == "pytorch":
        return [name for name, layer in model.named_modules()
                if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, torch_bn.BatchNorm))]
    if framework == "flax":
        return [".".join(map(str, path)) for path, layer in nnx.iter_modules(model)
                if isinstance(layer, (nnx.BatchNorm, flax_bn.BatchNorm))]
    # Linen: the layers' variables, beside the module (a folded module makes none for them).
    return [layer for layer in BATCH_NORM_LAYERS
            if layer in model.variables["params"] or layer in model.variables["batch_stats"]]


def assert_within(got, reference, bound, what):
    difference = float(np.max(np.abs(np.asarray(got, np.float64) - reference)))
    assert difference <= bound * magnitude(reference), f"{what}: {difference:.3e} (bound {bound:.1e} x scale)"
    return difference


# ---------------------------------------------------------------------------
# float64: folding and exporting change nothing but roundings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_folded_model_predicts_what_it_did_and_holds_no_batch_norm(name, trajectories_float64, images):
    train, model, deploy, dtype = trained(name, trajectories_float64)
    folded = deploy.fold_batch_norm(model)
    framework = IMPLEMENTATIONS[name].framework
    assert len(batch_norm_layers(framework, model)) == len(BATCH_NORM_LAYERS)
    assert batch_norm_layers(framework, folded) == []
    reference = eager_logits(train, model, images, dtype)
    assert_within(eager_logits(train, folded, images, dtype), reference, FLOAT64_PASS, f"{name} folded")


@pytest.mark.parametrize("name", NAMES)
def test_an_exported_program_predicts_the_same_in_float64_at_any_batch_size(name, trajectories_float64, images,
                                                                            tmp_path):
    """torch.export and jax.export, folded and not: saved, loaded back, and run at batch 1 and at a
    batch of TEST_IMAGES (the program was exported with a batch of 2: its batch dimension is free);
    its graph holds batch norm's inference unfolded, nothing of it folded, no batch statistics."""
    train, model, deploy, dtype = trained(name, trajectories_float64)
    reference = eager_logits(train, model, images, dtype)
    X = as_input(train, images, dtype)
    for folded in (False, True):
        path = deploy.export_program(deploy.fold_batch_norm(model) if folded else model,
                                     tmp_path / f"{'folded' if folded else 'lenet'}{deploy.PROGRAM_SUFFIX}", X[:2])
        predict = deploy.load_program(path, train.select_device("cpu", dtype))
        assert_within(predict(X), reference, FLOAT64_PASS, f"{name} {deploy.PROGRAM}, folded {folded}")
        assert_within(predict(X[:1]), reference[:1], FLOAT64_PASS, f"{name} {deploy.PROGRAM} at batch 1")
        operations = set(deploy.program_operations(path))
        assert not operations & deploy.BATCH_STATISTICS_OPERATIONS, operations
        assert bool(operations & deploy.BATCH_NORM_OPERATIONS) is not folded, operations


def test_torch_export_runs_after_the_project_sets_ieee_float32(trajectories_float64, images, tmp_path):
    """compare.py sets PyTorch's float32 arithmetic on GPUs to IEEE (allow_tf32(False)) before anything
    runs; torch.export, which reads cuDNN's older TF32 switch, must still work after it (PyTorch's
    newer per-operation setting alone made that switch raise: pytorch/pytorch#179445)."""
    train, model, deploy, dtype = trained("torch-scratch", trajectories_float64)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision
    try:
        for enabled in (False, True):
            train.allow_tf32(enabled)
            assert torch.backends.cudnn.allow_tf32 is enabled
            deploy.export_program(model, tmp_path / f"{enabled}{deploy.PROGRAM_SUFFIX}",
                                  as_input(train, images[:2], dtype))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision = saved


def test_onnx_runtime_computes_no_float64_convolution(trajectories_float64, images, tmp_path):
    """A float64 model exports to a valid ONNX file, which ONNX Runtime's CPU provider cannot run:
    its Conv has no float64 kernel. ONNX is float32 here (docs/deploying.md)."""
    train, model, deploy, dtype = trained("torch-scratch", trajectories_float64)
    path = deploy.export_onnx(model, tmp_path / "lenet.onnx", as_input(train, images[:2], dtype))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED : Could not find an implementation for Conv"):
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", NAMES)
def test_eps_travels_into_the_fold_and_the_exported_program(name, trajectories_float64, images, tmp_path):
    """A LeNet whose batch norm has eps 1e-3, folded and exported, predicts with 1e-3 (not the default
    1e-5, which a fold or an exporter that reset it would use: pytorch/ao#4107)."""
    train, model, deploy, dtype = trained(name, trajectories_float64, eps=1e-3)
    _, default, _, _ = trained(name, trajectories_float64)
    reference = eager_logits(train, model, images, dtype)
    # eps matters here, by far more than float64 rounds: the test can tell 1e-3 from 1e-5.
    assert np.max(np.abs(eager_logits(train, default, images, dtype) - reference)) > 1e-5 * magnitude(reference)
    folded = deploy.fold_batch_norm(model)
    assert_within(eager_logits(train, folded, images, dtype), reference, FLOAT64_PASS, f"{name} folded")
    path = deploy.export_program(folded, tmp_path / f"folded{deploy.PROGRAM_SUFFIX}",
                                 as_input(train, images[:2], dtype))
    predict = deploy.load_program(path, train.select_device("cpu", dtype))
    assert_within(predict(as_input(train, images, dtype)), reference, FLOAT64_PASS, deploy.PROGRAM)


# ---------------------------------------------------------------------------
# float32: every artefact, as compare.py export makes it, within its measured bound
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed_float32(trajectories_float32, fashion_mnist, tmp_path_factory):
    """{name: (its artefacts, its row of the matrix on the whole test set in one batch of 10,000)}
    for the float32 model each of DEPLOYED trained, deployed as compare.py export deploys it."""
    _, _, test_images, test_labels = fashion_mnist
    folder = tmp_path_factory.mktemp("deployed")
    deployed = {}
    with tqdm(disable=True) as progress:
        for name in DEPLOYED:
            checkpoint = Checkpoint(str(folder / name), trajectories_float32[name][1][-1], {"implementation": name},
                                    "safetensors")
            artefacts, _ = deployment.deploy_checkpoint(checkpoint, folder / name, test_images[:2])
            row = deployment.evaluate_row(artefacts, test_images, test_labels, len(test_images), np.float32, progress)
            deployed[name] = artefacts, row
    return deployed


@pytest.mark.parametrize("name", DEPLOYED)
def test_every_artefact_predicts_within_its_float32_bound(name, deployed_float32, fashion_mnist):
    """All artefacts of a model trained in `name`: on the whole test set in one batch of 10,000, and
    image by image, its logits within FLOAT32_DEPLOYED_LOGITS of the model's own eager ones, its
    accuracy within 2 images of 10,000 of theirs (float32's rounding may tip an image whose two best
    logits all but tie); each ONNX file passes onnx.checker's full check (deployment.onnx_operations)."""
    artefacts, row = deployed_float32[name]
    _, _, test_images, test_labels = fashion_mnist
    assert [artefact.name for artefact in artefacts] == ["eager"] + [entry[0] for entry in deployment.artefact_names()]
    assert row["max_abs_logit_diff"][0] == 0 and not row["not_run"]
    scale = magnitude(row["source_max_abs_logit"])
    for artefact, accuracy, difference in zip(artefacts[1:], row["test_acc"][1:], row["max_abs_logit_diff"][1:]):
        assert difference <= FLOAT32_DEPLOYED_LOGITS[artefact.kind] * scale, (artefact.name, difference)
        assert abs(accuracy - row["test_acc"][0]) <= 2 / len(test_labels), artefact.name
    own_train = registry.training(artefacts[0].framework)
    reference = artefacts[0].predict(as_input(own_train, test_images[:BATCH_OF_ONE_IMAGES], np.float32))
    for artefact in artefacts[1:]:
        train = registry.training(artefact.framework)
        one_by_one = np.concatenate([artefact.predict(as_input(train, test_images[index:index + 1], np.float32))
                                     for index in range(BATCH_OF_ONE_IMAGES)])
        assert_within(one_by_one, reference, FLOAT32_DEPLOYED_LOGITS[artefact.kind], f"{artefact.name} at batch 1")
        if artefact.kind == "onnx":
            assert deployment.onnx_operations(artefact.path)  # onnx.checker's full check passes


def test_a_float64_checkpoint_that_says_its_eps_is_deployed_with_it_beside_a_float32_one(
        trajectories_float64, deployed_float32, images, fashion_mnist, tmp_path, capsys):
    """export's own path for a float64 model whose checkpoint says eps 1e-3: every artefact built
    with 1e-3 (within 1e-12 of such a model's eager logits), its ONNX Runtime cells not run, and
    said why; beside a float32 checkpoint (and one of the same name), the matrix printed and drawn."""
    name = "linen-builtin"
    checkpoint = Checkpoint(str(tmp_path / "lenet.orbax"), trajectories_float64[name][1][-1],
                            {"implementation": name, "eps": "0.001"}, "linen")
    artefacts, _ = deployment.deploy_checkpoint(checkpoint, tmp_path / "deployed", images[:2])
    with tqdm(disable=True) as progress:
        row = deployment.evaluate_row(artefacts, images, fashion_mnist[3][:TEST_IMAGES], TEST_IMAGES, np.float64,
                                      progress)
    train, model, _, dtype = trained(name, trajectories_float64, eps=1e-3)
    reference = eager_logits(train, model, images, dtype)
    assert_within(artefacts[0].predict(as_input(train, images, dtype)), reference, FLOAT64_PASS, "eager, eps 1e-3")
    for artefact, difference in zip(artefacts, row["max_abs_logit_diff"]):
        if artefact.kind == "onnx":
            assert difference is None and row["not_run"][artefact.name] == deployment.FLOAT64_IN_ONNX_RUNTIME
        else:
            assert difference <= FLOAT64_PASS * magnitude(reference), (artefact.name, difference)
    float32_artefacts, float32_row = deployed_float32["torch-scratch"]
    float32_checkpoint = Checkpoint(str(tmp_path / "lenet.safetensors"), {"conv1.weight": np.zeros(1, np.float32)},
                                    {"implementation": "torch-scratch"}, "safetensors")
    labels = deployment.unique_labels(["torch-scratch", "linen-builtin", "torch-scratch"])
    assert labels == ["torch-scratch", "linen-builtin", "torch-scratch-2"]
    matrix = deployment.deployment_results(
        [float32_checkpoint, checkpoint], labels[:2], [{**float32_row, "artefacts": float32_artefacts},
                                                      {**row, "artefacts": artefacts}],
        {"batch_sizes": list(deployment.THROUGHPUT_BATCHES), "repeats": 1, "rows": []}, 0)
    results = {"config": {}, "environment": {}, "deployment": matrix}
    console.print_deployment(results)
    printed = capsys.readouterr().out
    assert f"ONNX Runtime: not run: {deployment.FLOAT64_IN_ONNX_RUNTIME}" in printed
    assert "  ONNX Runtime: none | not run" in printed  # the graphs: torch-scratch's, linen-builtin's
    # The float64 row is held to no float32 bound: its cells uncoloured, but for exact ones.
    fractions = console.deployment_fractions(results, float32_bounds())
    assert all(row[1] in (None, 0.0) for row in fractions) and all(row[0] is not None for row in fractions)
    assert 'id="deployment"' in page.render(results=results, out=tmp_path)


# ---------------------------------------------------------------------------
# Training mode: what a capture of it does, and that the project refuses it
# ---------------------------------------------------------------------------


def test_a_training_mode_capture_computes_batch_statistics_and_is_refused(trajectories_float32, images, tmp_path):
    """torch.export records the mode at capture (pytorch/pytorch#151726): a LeNet in train() exports
    batch statistics and moving-statistic updates, and its program, which no longer checks the batch,
    normalises a batch of one by its own statistics. The project refuses such a model, everywhere."""
    train, model, deploy, dtype = trained("torch-builtin", trajectories_float32)
    example = as_input(train, images[:2], dtype)
    reference = eager_logits(train, model, images[:1], dtype)
    model.train()
    program = torch.export.export(model, (torch.from_numpy(example),),
                                  dynamic_shapes={"X": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "train.pt2")
    operations = set(deploy.program_operations(tmp_path / "train.pt2"))
    assert "_native_batch_norm_legit_functional" in operations and operations & deploy.BATCH_STATISTICS_OPERATIONS
    with torch.no_grad():
        batch_of_one = program.module()(torch.from_numpy(as_input(train, images[:1], dtype))).numpy()
    # Each feature of the Linear layers' batch norm, over a batch of one, is its own mean: normalised to
    # 0 (then beta): the logits lose the image. Measured 2026-12-04: 5.1 apart, logits of magnitude 7.
    assert np.max(np.abs(batch_of_one - reference)) > 1.0
    with pytest.raises(deployment.ExportError, match="batch statistics"):
        deployment.checked_operations(deployment.Artefact("train", "pytorch", "program", False,
                                                          path=str(tmp_path / "train.pt2")),
                                      deploy.program_operations(tmp_path / "train.pt2"),
                                      deploy.BATCH_NORM_OPERATIONS, deploy.BATCH_STATISTICS_OPERATIONS)
    for name in NAMES:
        train, model, deploy, dtype = trained(name, trajectories_float32)
        model.train()
        for refusing in (lambda: deploy.fold_batch_norm(model),
                         lambda: deploy.export_program(model, tmp_path / f"{name}{deploy.PROGRAM_SUFFIX}", example)):
            with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
                refusing()
        assert not list(tmp_path.glob(f"{name}*")), "a refused export wrote nothing"


def test_torch_onnx_exports_a_training_mode_nn_batch_norm_as_inference(trajectories_float32, images, tmp_path):
    """torch.onnx.export of a model left in train() (its own warning aside) gives, for nn.BatchNorm,
    the inference graph: the moving statistics, not the batch's. Exporters have done the reverse, a
    training-mode batch norm for an inference model (microsoft/onnxscript#1791): what the file does is
    read here, and the project exports a model in inference mode only."""
    train, model, _, dtype = trained("torch-builtin", trajectories_float32)
    reference = eager_logits(train, model, images, dtype)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        torch.onnx.export(model, (torch.from_numpy(as_input(train, images[:2], dtype)),), tmp_path / "train.onnx",
                          dynamo=True, dynamic_shapes={"X": {0: torch.export.Dim("batch", min=1)}},
                          input_names=["images"], output_names=["logits"], verbose=False, external_data=False)
    operations = deployment.onnx_operations(str(tmp_path / "train.onnx"))
    assert not set(operations) & deployment.ONNX_BATCH_STATISTICS_OPERATIONS, operations
    session = onnxruntime.InferenceSession(tmp_path / "train.onnx", providers=["CPUExecutionProvider"])
    assert_within(session.run(None, {"images": as_input(train, images, dtype)})[0], reference,
                  FLOAT32_DEPLOYED_LOGITS["onnx"], "a training-mode export's ONNX file")


def test_jax_cannot_export_a_training_mode_lenet_with_a_free_batch(trajectories_float32, images):
    """jax.export of a LeNet in training mode, its batch dimension symbolic, stops at the model's own
    check that a batch normalised by its statistics holds 2 examples or more: JAX cannot decide it
    for every batch. (A constraint, 'batch >= 2', would let it through: the project refuses the mode.)"""
    import jax
    from jax.errors import InconclusiveDimensionOperation

    train, model, _, dtype = trained("flax-builtin", trajectories_float32)
    model.train()
    graphdef, state = nnx.split(model)
    batch, = jax.export.symbolic_shape("batch")
    with pytest.raises(InconclusiveDimensionOperation, match="inconclusive"):
        jax.export.export(jax.jit(lambda X: nnx.merge(graphdef, state)(X)))(
            jax.ShapeDtypeStruct((batch, 28, 28, 1), dtype))


def test_a_folded_graph_with_batch_norm_left_is_refused(trajectories_float32, images, tmp_path):
    """The check every export's graph goes through: an unfolded program passed off as folded fails it."""
    train, model, deploy, dtype = trained("flax-scratch", trajectories_float32)
    path = deploy.export_program(model, tmp_path / f"lenet{deploy.PROGRAM_SUFFIX}", as_input(train, images[:2], dtype))
    with pytest.raises(deployment.ExportError, match=r"folded, yet its graph holds batch norm \(sqrt\)"):
        deployment.checked_operations(deployment.Artefact("folded", "flax", "program", True, path=path),
                                      deploy.program_operations(path), deploy.BATCH_NORM_OPERATIONS,
                                      deploy.BATCH_STATISTICS_OPERATIONS)
