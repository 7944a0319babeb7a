"""compare.py evaluate: trained models moved between the six implementations. Each checkpoint, in any
format a run writes (or a user's own state_dict or Orbax folder of this LeNet), is loaded into each
implementation and evaluated on the test set: its accuracy there, and how far its logits are from
those of the implementation it was trained in. Nothing is trained.
"""

import sys

import numpy as np
from tqdm.auto import tqdm

from common.checkpoint import CheckpointError
from common.drivers import checkpoints, outputs
from common.drivers.harness import data_or_exit, devices_or_exit, evaluate, start_run
from common.report import console
from common.report import results as saved_results
from impls.registry import IMPLEMENTATIONS


def run(settings):
    """Every checkpoint of settings.paths in every implementation of settings.impls; the matrix
    printed and written. Returns the exit status."""
    try:
        read = checkpoints.read_all(settings.paths)
    except CheckpointError as error:
        sys.exit(f"error: evaluate: {error}")
    # A checkpoint that does not say where it was trained is measured against the first column.
    sources = [(ported.label, ported.source or settings.impls[0], ported.weights) for ported in read]
    dtypes = {ported.weights["conv1.weight"].dtype for ported in read}
    names = list(dict.fromkeys([*settings.impls, *(source for _, source, _ in sources)]))
    devices = devices_or_exit(names, settings, max(dtypes, key=lambda dtype: dtype.itemsize))
    _, _, test_images, test_labels = data_or_exit(settings)
    outputs.clear(settings.out, "evaluate")
    evaluation = cross_evaluate(sources, list(settings.impls), test_images, test_labels, devices, settings.batch_size,
                                progress=settings.progress)
    evaluation["files"] = [ported.path for ported in read]
    results = {"config": {"evaluate": list(settings.paths), "impls": list(settings.impls), "device": settings.device,
                          "tf32": settings.tf32, "batch_size": settings.batch_size},
               "environment": saved_results.environment(devices),
               "evaluation": evaluation}
    console.print_evaluation(results)
    paths = saved_results.write_all(results, settings.out)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def evaluate_weights(name, weights, images, labels, device, batch_size):
    """Inference-mode logits for the whole test set and the accuracy of implementation `name`
    holding `weights` (canonical, as checkpoints.read gives them), untrained."""
    return evaluate(start_run(name, weights, 1.0, device), images, labels, batch_size)


def cross_evaluate(sources, names, images, labels, devices, batch_size, progress=True):
    """Each source -- (its label, the implementation it was trained in, its canonical weights) --
    evaluated in each implementation of `names` on the test set: the accuracy, and the largest
    difference of its logits from the source implementation's own (the diagonal: 0). The source
    implementation is evaluated for that reference whether it is among `names` or not.
    Returns the matrix as results.json keeps it (rows: sources; columns: names)."""
    bar = tqdm(total=len(sources) * len(names), desc="evaluating", unit="model", leave=False, disable=not progress)
    accuracies, differences, own_accuracies, own_magnitudes = [], [], [], []

    def device_of(name):
        return devices[IMPLEMENTATIONS[name][0]]
    for _, source, weights in sources:
        own_logits, own_accuracy = evaluate_weights(source, weights, images, labels, device_of(source), batch_size)
        own_accuracies.append(own_accuracy)
        own_magnitudes.append(float(np.max(np.abs(own_logits))))
        row_accuracies, row_differences = [], []
        for name in names:
            logits, accuracy = ((own_logits, own_accuracy) if name == source else
                                evaluate_weights(name, weights, images, labels, device_of(name), batch_size))
            row_accuracies.append(accuracy)
            row_differences.append(float(np.max(np.abs(logits.astype(np.float64) - own_logits))))
            bar.update()
        accuracies.append(row_accuracies)
        differences.append(row_differences)
    bar.close()
    return {"rows": [label for label, _, _ in sources], "sources": [source for _, source, _ in sources],
            "columns": list(names), "dtypes": [weights[next(iter(weights))].dtype.name for _, _, weights in sources],
            "source_test_acc": own_accuracies, "source_max_abs_logit": own_magnitudes, "test_acc": accuracies,
            "max_abs_logit_diff": differences}


