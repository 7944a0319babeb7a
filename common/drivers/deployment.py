"""compare.py export: trained models deployed, and the same predictions proved.

Each checkpoint (any format evaluate reads) is loaded into each framework with its own batch norm
(scratch or built in), in inference mode; folded (impls/*/deploy.py: batch norm into the layer
before it); exported, folded and not (torch.export and jax.export programs with a dynamic batch,
ONNX files from PyTorch); and each artefact is loaded back in its own runtime (torch.export.load,
jax.export.deserialize, ONNX Runtime) and evaluated on the test set. A cell of the matrix: the test
accuracy, and the largest logit difference from the checkpoint's own implementation in eager
inference. Every exported graph is read before it is used: no batch statistics (a training-mode
batch norm), and, folded, no batch norm at all. The same run measures every artefact's inference
throughput at batch 1, 256 and 10,000, against its framework's eager inference.
"""

import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from common.checkpoint import CheckpointError
from common.data import to_layout
from common.drivers import checkpoints, outputs
from common.drivers.harness import data_or_exit
from common.drivers.outputs import EXPORT as FOLDER
from common.files import atomic_path
from common.report import console
from common.report import results as saved_results
from impls import registry
from impls.registry import FRAMEWORKS, IMPLEMENTATIONS

ONNX_SUFFIX = ".onnx"
# What batch norm leaves in an ONNX graph, and what batch statistics leave (a training-mode batch
# norm: BatchNormalization with training_mode=1, or reductions over the batch).
ONNX_BATCH_NORM_OPERATIONS = frozenset({"BatchNormalization", "Sqrt", "Reciprocal"})
ONNX_BATCH_STATISTICS_OPERATIONS = frozenset({"BatchNormalization (training)", "ReduceMean", "ReduceSum",
                                              "ReduceSumSquare"})
THROUGHPUT_BATCHES = (1, 256, 10000)
# Examples a timed repeat infers at each batch size: enough calls that one repeat is not a clock's tick.
EXAMPLES_PER_REPEAT = {1: 100, 256: 2560, 10000: 10000}
FLOAT64_IN_ONNX_RUNTIME = "ONNX Runtime's CPU kernels have no float64 convolution (Conv): float32 models only"


class ExportError(RuntimeError):
    """An artefact that is not what it must be; the message says which and why."""


@dataclass
class Artefact:
    """One column of the matrix: what is run, made from which framework's model."""
    name: str
    framework: str
    kind: str                # 'eager', 'folded', 'program', 'onnx'
    folded: bool
    predict: object = None   # numpy images in the framework's layout -> numpy logits
    layout: str = None
    path: str = None         # the file, for an exported one
    operations: dict = None  # what batch norm left in its graph: {operation: count}
    not_run: str = None      # why it cannot run here, where it cannot


def artefact_names():
    """The matrix's columns, after 'eager' (the checkpoint's own implementation): each framework's
    folded model, its program unfolded and folded, and, from PyTorch, ONNX in ONNX Runtime."""
    names = []
    for framework, (title, runtime) in FRAMEWORKS.items():
        program = f"{registry.deploy(framework).PROGRAM} ({title})"
        names += [(f"{title}, folded", framework, "folded", True), (program, framework, "program", False),
                  (f"{program}, folded", framework, "program", True)]
        if runtime == "torch":
            names += [("ONNX Runtime", framework, "onnx", False), ("ONNX Runtime, folded", framework, "onnx", True)]
    return names


def missing_packages():
    """What the deploy extra installs (pyproject.toml) and this python cannot import: ONNX and its
    exporter from PyTorch, ONNX Runtime, and what jax.export serializes with."""
    missing = []
    try:
        import onnx  # noqa: F401
    except ImportError:
        missing.append("onnx")
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        missing.append("onnxscript")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        missing.append("onnxruntime")
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        missing.append("flatbuffers")
    return missing


def run(settings):
    """Every checkpoint of settings.paths deployed every way; the matrix and the throughput printed
    and written. Returns the exit status."""
    missing = missing_packages()
    if missing:
        sys.exit(f"error: export needs {', '.join(missing)}, not installed here: pip install -e '.[deploy]' "
                 "installs every exporter and runtime it uses")
    try:
        read = checkpoints.read_all(settings.paths)
    except CheckpointError as error:
        sys.exit(f"error: export: {error}")
    _, _, test_images, test_labels = data_or_exit(settings)
    outputs.clear(settings.out, "export")
    # Throughput is measured on the first float32 checkpoint's artefacts (the weights change no time;
    # ONNX Runtime runs float32 alone), else on the first checkpoint's.
    timed = next((index for index, checkpoint in enumerate(read) if dtype_of(checkpoint) == np.float32), 0)
    columns = 1 + len(artefact_names())
    measured = len(FRAMEWORKS) + sum(1 for name in artefact_names() if runs_in(name[2], dtype_of(read[timed])))
    steps = len(read) * columns + measured * len(THROUGHPUT_BATCHES) * (1 + settings.repeats)
    rows, labels = [], unique_labels([checkpoint.label for checkpoint in read])
    try:
        # The folder whole or not at all: an interrupted run leaves no export/ that passes for a finished one.
        with atomic_path(os.path.join(settings.out, FOLDER)) as folder, \
                tqdm(total=steps, desc="exporting", unit="step", disable=not settings.progress) as progress:
            for index, (checkpoint, label) in enumerate(zip(read, labels)):
                artefacts, eager = deploy_checkpoint(checkpoint, os.path.join(folder, label), test_images[:2])
                rows.append({**evaluate_row(artefacts, test_images, test_labels, settings.batch_size,
                                            dtype_of(checkpoint), progress), "artefacts": artefacts})
                if index == timed:
                    throughput = measure_throughput(artefacts, eager, test_images, dtype_of(checkpoint),
                                                    settings.repeats, progress)
    except ExportError as error:
        sys.exit(f"error: export: {error}")
    except OSError as error:
        sys.exit(outputs.unwritable(settings.out, error))
    results = {"config": {"export": list(settings.paths), "batch_size": settings.batch_size,
                          "repeats": settings.repeats, "device": "cpu"},
               "environment": saved_results.environment(devices_used()),
               "deployment": deployment_results(read, labels, rows, throughput, timed)}
    console.print_deployment(results)
    paths = saved_results.write_all(results, settings.out)
    print(f"\nwrote {os.path.join(settings.out, FOLDER)}/, {', '.join(paths)}")
    return 0


def dtype_of(checkpoint):
    return checkpoint.weights["conv1.weight"].dtype


def runs_in(kind, dtype):
    """Whether an artefact of this kind runs for a model of this dtype (ONNX Runtime: float32 alone)."""
    return kind != "onnx" or dtype == np.float32


def unique_labels(labels):
    """The checkpoints' labels, each its own: a second 'torch-scratch' (another run's) is 'torch-scratch-2'.
    Each names its folder of artefacts and its column of the matrix."""
    seen, unique = Counter(), []
    for label in labels:
        seen[label] += 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique


def devices_used():
    return {framework: registry.training(framework).select_device("cpu") for framework in FRAMEWORKS}


def source_of(checkpoint):
    """(the implementation whose eager inference is the reference, whether it was assumed): the one
    the checkpoint was trained in, where it says; else the first, as evaluate assumes (its --impls')."""
    return (checkpoint.source, False) if checkpoint.source else (next(iter(IMPLEMENTATIONS)), True)


def deployment_results(read, labels, rows, throughput, timed):
    """The matrix as results.json keeps it: a row per checkpoint, a column per artefact."""
    columns = [artefact.name for artefact in rows[0]["artefacts"]]
    return {
        "rows": labels,
        "sources": [source_of(checkpoint)[0] for checkpoint in read],
        "sources_assumed": [source_of(checkpoint)[1] for checkpoint in read],
        "dtypes": [dtype_of(checkpoint).name for checkpoint in read],
        "files": [checkpoint.path for checkpoint in read],
        "columns": columns,
        "column_frameworks": [artefact.framework for artefact in rows[0]["artefacts"]],
        "column_kinds": [artefact.kind for artefact in rows[0]["artefacts"]],
        "test_acc": [row["test_acc"] for row in rows],
        "max_abs_logit_diff": [row["max_abs_logit_diff"] for row in rows],
        "source_max_abs_logit": [row["source_max_abs_logit"] for row in rows],
        "not_run": [row["not_run"] for row in rows],
        "artefacts": [{artefact.name: os.path.join(FOLDER, label, os.path.basename(artefact.path))
                       for artefact in row["artefacts"] if artefact.path}
                      for label, row in zip(labels, rows)],
        # What batch norm left in each exported graph.
        "operations": [{artefact.name: artefact.operations for artefact in row["artefacts"]
                        if artefact.operations is not None} for row in rows],
        "throughput": {**throughput, "checkpoint": labels[timed]},
    }


def deploy_checkpoint(checkpoint, folder, example_images):
    """(the checkpoint's artefacts: its own implementation's eager inference first, then every column
    of artefact_names(), each exported file written into `folder` and loaded back in its runtime;
    {framework: its eager inference}, for the throughput's ratios)."""
    os.makedirs(folder, exist_ok=True)
    source, _ = source_of(checkpoint)
    norm, dtype = IMPLEMENTATIONS[source].norm, dtype_of(checkpoint)
    # The model's own eps, where its checkpoint says it: folded and exported as it is (pytorch/ao#4107).
    options = {} if checkpoint.eps is None else {"eps": checkpoint.eps}
    models, eager = {}, {}
    for framework, (title, _) in FRAMEWORKS.items():
        train, deploy = registry.training(framework), registry.deploy(framework)
        model = train.build_lenet(checkpoint.weights, norm, train.select_device("cpu", dtype), **options)
        model.eval()
        models[framework] = {False: model, True: deploy.fold_batch_norm(model)}
        eager[framework] = Artefact(f"{title}, eager", framework, "eager", False,
                                    eager_predictor(framework, model, dtype), train.LAYOUT)
    own = eager[IMPLEMENTATIONS[source].framework]
    artefacts = [Artefact("eager", own.framework, "eager", False, own.predict, own.layout)]
    for name, framework, kind, folded in artefact_names():
        train, deploy = registry.training(framework), registry.deploy(framework)
        model, artefact = models[framework][folded], Artefact(name, framework, kind, folded, layout=train.LAYOUT)
        example = batches_of(example_images, len(example_images), train.LAYOUT, dtype)[0]
        stem = os.path.join(folder, f"{framework}{'-folded' if folded else ''}")
        if kind == "folded":
            artefact.predict = eager_predictor(framework, model, dtype)
        elif kind == "program":
            artefact.path = deploy.export_program(model, stem + deploy.PROGRAM_SUFFIX, example)
            artefact.operations = checked_operations(artefact, deploy.program_operations(artefact.path),
                                                     deploy.BATCH_NORM_OPERATIONS, deploy.BATCH_STATISTICS_OPERATIONS)
            artefact.predict = deploy.load_program(artefact.path, train.select_device("cpu", dtype))
        elif not runs_in(kind, dtype):
            artefact.not_run = FLOAT64_IN_ONNX_RUNTIME
        else:
            artefact.path = deploy.export_onnx(model, stem + ONNX_SUFFIX, example)
            artefact.operations = checked_operations(artefact, onnx_operations(artefact.path),
                                                     ONNX_BATCH_NORM_OPERATIONS, ONNX_BATCH_STATISTICS_OPERATIONS)
            artefact.predict = onnx_runtime_predictor(artefact.path)
        artefacts.append(artefact)
    return artefacts, eager


def eager_predictor(framework, model, dtype):
    """The model's eager inference in its framework, as a function of numpy images in the
    framework's layout to numpy logits."""
    train = registry.training(framework)
    device = train.select_device("cpu", dtype)
    no_labels = np.zeros(0, np.int64)

    def predict(images):
        return train.to_numpy(train.predict(model, train.to_device(images, no_labels, device, dtype)[0]))
    return predict


def checked_operations(artefact, operations, batch_norm, batch_statistics):
    """What batch norm left in the artefact's graph, {operation: count}; ExportError where it holds
    batch statistics, or, folded, any batch norm."""
    statistics_left = sorted(set(operations) & batch_statistics)
    if statistics_left:
        raise ExportError(f"{artefact.path}: the graph computes batch statistics ({', '.join(statistics_left)}): "
                          "a training-mode batch norm")
    left = {operation: count for operation, count in sorted(operations.items()) if operation in batch_norm}
    if artefact.folded and left:
        raise ExportError(f"{artefact.path}: folded, yet its graph holds batch norm ({', '.join(left)})")
    return left


def onnx_operations(path):
    """{operation type: count} of an ONNX file, after onnx.checker's full check; a training-mode
    BatchNormalization counted apart."""
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    operations = Counter()
    for node in model.graph.node:
        training = any(attribute.name == "training_mode" and attribute.i for attribute in node.attribute)
        operations[f"{node.op_type} (training)" if training else node.op_type] += 1
    return operations


def onnx_runtime_predictor(path):
    """An ONNX file in ONNX Runtime's CPU provider, as a function of numpy images to numpy logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def predict(images):
        return session.run(["logits"], {"images": images})[0]
    return predict


def batches_of(images, size, layout, dtype):
    """The images in batches of `size`, each in the layout and dtype an artefact takes: copies (the
    loader's arrays are read-only, which torch.from_numpy warns of)."""
    return [np.array(to_layout(images[start:start + size], layout), dtype) for start in range(0, len(images), size)]


def evaluate_row(artefacts, images, labels, batch_size, dtype, progress):
    """Every artefact of one checkpoint on the test set, in batches of batch_size: accuracy and
    largest logit difference from the first (eager, the checkpoint's own implementation)."""
    row = {"test_acc": [], "max_abs_logit_diff": [], "not_run": {}}
    reference = None
    for artefact in artefacts:
        if artefact.not_run:
            row["not_run"][artefact.name] = artefact.not_run
            row["test_acc"].append(None)
            row["max_abs_logit_diff"].append(None)
        else:
            logits = np.concatenate([artefact.predict(batch) for batch in batches_of(images, batch_size,
                                                                                     artefact.layout, dtype)])
            logits = logits.astype(np.float64)
            reference = logits if reference is None else reference
            row["test_acc"].append(float((logits.argmax(axis=1) == labels).mean()))
            row["max_abs_logit_diff"].append(float(np.max(np.abs(logits - reference))))
        progress.update()
    row["source_max_abs_logit"] = float(np.max(np.abs(reference)))
    return row


def measure_throughput(artefacts, eager, images, dtype, repeats, progress):
    """Examples per second of each framework's eager inference and of every artefact, at each of
    THROUGHPUT_BATCHES, and each artefact's ratio to its framework's eager inference at the same
    batch size. Every pair is warmed up first (a compilation is not counted); then the repeats go
    in rounds, each timing every pair once in a seeded order, so that a slow moment on a shared
    machine slows all alike; the median of each."""
    measured = [artefact for framework in FRAMEWORKS for artefact in
                (eager[framework], *(a for a in artefacts[1:] if a.framework == framework and not a.not_run))]
    pairs = [(artefact, batch) for artefact in measured for batch in THROUGHPUT_BATCHES]
    inputs = {(artefact.layout, batch): batches_of(images[:EXAMPLES_PER_REPEAT[batch]], batch, artefact.layout, dtype)
              for artefact, batch in pairs}
    timings = {index: [] for index in range(len(pairs))}

    def time_one(index):
        artefact, batch = pairs[index]
        start = time.perf_counter()
        for images_batch in inputs[artefact.layout, batch]:
            artefact.predict(images_batch)  # numpy out: the result is computed when it returns
        return EXAMPLES_PER_REPEAT[batch] / (time.perf_counter() - start)

    for index in range(len(pairs)):
        time_one(index)  # the warm-up: JAX compiles for each new batch shape, PyTorch warms its kernels
        progress.update()
    for repeat in range(1, repeats + 1):
        for index in np.random.default_rng(repeat).permutation(len(pairs)):
            timings[index].append(time_one(index))
            progress.update()
    rows = []
    for artefact in measured:
        speeds = {batch: statistics.median(timings[pairs.index((artefact, batch))]) for batch in THROUGHPUT_BATCHES}
        base = eager[artefact.framework]
        rows.append({"artefact": artefact.name, "framework": artefact.framework,
                     "examples_per_sec": {str(batch): speed for batch, speed in speeds.items()},
                     "ratio_to_eager": {str(batch): speed / statistics.median(timings[pairs.index((base, batch))])
                                        for batch, speed in speeds.items()}})
    return {"batch_sizes": list(THROUGHPUT_BATCHES), "examples_per_repeat": {str(batch): count for batch, count
                                                                            in EXAMPLES_PER_REPEAT.items()},
            "repeats": repeats, "rows": rows}
