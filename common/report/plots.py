"""The run's plots, each as PNG and SVG (report.html inlines the SVG): the chapter's training curves
and how far the implementations drift apart; for evaluate, the matrix of checkpoints evaluated
across the implementations; for export, the matrix of checkpoints deployed every way."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from common.files import atomic_path  # noqa: E402
from common.report import console  # noqa: E402
from common.report.bounds import float32_bounds  # noqa: E402

CURVES = "curves"          # .png and .svg
DIVERGENCE = "divergence"  # .png and .svg
EVALUATION = "evaluation"  # .png and .svg: evaluate's matrix
DEPLOYMENT = "deployment"  # .png and .svg: export's matrix
STEMS = (CURVES, DIVERGENCE, EVALUATION, DEPLOYMENT)
SUFFIXES = (".png", ".svg")
# Where a difference is exactly 0, a log-scale plot shows it at this floor instead.
LOG_FLOOR = 1e-17
# A matrix's colour scale starts here: a thousandth of a cell's float32 bound, or less, is all alike.
FRACTION_FLOOR = 1e-3


def save(figure, out, stem):
    paths = []
    for suffix in SUFFIXES:
        path = os.path.join(out, stem + suffix)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=suffix[1:], dpi=120, bbox_inches="tight")
        paths.append(path)
    plt.close(figure)
    return paths


def plot_curves(results, out):
    """The chapter's figure: train loss, train accuracy and test accuracy per epoch, for each."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    metrics = (("train_loss", "train loss"), ("train_acc", "train accuracy"), ("test_acc", "test accuracy"))
    for axis, (key, title) in zip(axes, metrics):
        for index, (name, run) in enumerate(results["runs"].items()):
            if "not_run" in run:
                continue
            epochs = [entry["epoch"] for entry in run["epochs"]]
            # Equal numbers would hide one line under another: alternate solid and dashed.
            axis.plot(epochs, [entry[key] for entry in run["epochs"]], marker="o", label=name,
                      linestyle="-" if index % 2 == 0 else "--")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    config = results["config"]
    parallel = config.get("data_parallel")
    workers = f", {parallel['workers']} workers ({parallel['bn_stats']} batch-norm statistics)" if parallel else ""
    figure.suptitle(f"LeNet + batch norm on Fashion-MNIST: lr {config['lr']}, batch {config['batch_size']}, "
                    f"{config['dtype']}{workers} (where the implementations agree, their lines lie on top of each other)")
    return save(figure, out, CURVES)


def plot_divergence(results, out):
    """Per pair, the max abs difference of parameters and of test logits per epoch, log scale."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    # The parameters but the biases that batch norm cancels (common/init.py): under bf16-mixed,
    # rounding noise walks those furthest, and they change no output.
    for axis, key, title in ((axes[0], "max_abs_shaping_param_diff", "parameters, but the biases batch norm cancels"),
                             (axes[1], "max_abs_test_logit_diff", "test-set logits (inference mode)")):
        # Six implementations make 15 pairs: 20 colours, so that no two pairs share a line's look.
        colours = plt.get_cmap("tab20").colors
        for index, entry in enumerate(results["divergence"]):
            values = [max(value, LOG_FLOOR) for value in entry[key]]
            axis.plot(range(1, len(values) + 1), values, marker="o", color=colours[index % len(colours)],
                      label=" vs ".join(entry["pair"]))
        # Under mixed precision, each implementation against its own float32 run: dashed.
        reference = results.get("float32_reference", {}).get("drift", [])
        for index, entry in enumerate(reference):
            values = [max(value, LOG_FLOOR) for value in entry[key]]
            axis.plot(range(1, len(values) + 1), values, marker="x", linestyle="--", color=f"C{index % 10}",
                      label=f"{entry['impl']} vs its float32 run")
        if any(value == 0 for entry in results["divergence"] for value in entry[key]):
            axis.annotate(f"exactly equal (0), drawn at {LOG_FLOOR:.0e}", (0.01, LOG_FLOOR),
                          xycoords=("axes fraction", "data"), xytext=(0, 6), textcoords="offset points", fontsize=8)
        axis.set_yscale("log")
        axis.set_title(f"max abs difference: {title}")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3, which="both")
    if results["divergence"] or results.get("float32_reference"):
        # Beside the plots, not on them: up to 21 lines.
        axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle(f"How far the implementations drift apart ({results['config']['dtype']})")
    return save(figure, out, DIVERGENCE)


def plot_evaluation(results, out):
    """evaluate's matrix as a heat map: rows where each model was trained, columns where it was
    evaluated (plot_matrix)."""
    evaluation = results["evaluation"]
    return plot_matrix(out, EVALUATION, evaluation["rows"], evaluation["columns"], evaluation["test_acc"],
                       evaluation["max_abs_logit_diff"], console.evaluation_fractions(results, float32_bounds()),
                       "evaluated in", "trained in",
                       "Test accuracy, and largest logit difference from where it was trained")


def plot_deployment(results, out):
    """export's matrix as a heat map: a row per artefact, a column per checkpoint (plot_matrix)."""
    deployment = results["deployment"]
    transposed = [list(row) for row in zip(*deployment["test_acc"])], [list(row) for row in
                                                                       zip(*deployment["max_abs_logit_diff"])]
    return plot_matrix(out, DEPLOYMENT, deployment["columns"], deployment["rows"], *transposed,
                       console.deployment_fractions(results, float32_bounds()), "checkpoint (trained in)",
                       "deployed as", "Test accuracy, and largest logit difference from the trained model's own")


def plot_matrix(out, stem, rows, columns, accuracies, differences, fractions, xlabel, ylabel, title):
    """A matrix of test accuracies and largest logit differences as a heat map, each cell coloured
    by its difference as a fraction of its float32 bound (tests/tolerances.py), on a log scale:
    greens up to the bound (float32's rounding), reds beyond it, grey where there is no cell or no
    bound; its text, the accuracy above the difference."""
    logs = np.ma.masked_invalid([[np.nan if fraction is None else np.log10(max(fraction, FRACTION_FLOOR))
                                  for fraction in row] for row in fractions])
    colours = plt.get_cmap("RdYlGn_r").copy()
    colours.set_bad("#d0d7de")
    figure, axis = plt.subplots(figsize=(1.6 * len(columns) + 3.5, 0.6 * len(rows) + 2), constrained_layout=True)
    # Cells drawn as vector shapes (imshow would embed a raster image, which the page's policy refuses).
    image = axis.pcolormesh([index - 0.5 for index in range(len(columns) + 1)],
                            [index - 0.5 for index in range(len(rows) + 1)], logs, cmap=colours,
                            norm=TwoSlopeNorm(vmin=np.log10(FRACTION_FLOOR), vcenter=0, vmax=1))
    axis.invert_yaxis()
    for row_index, (row_accuracies, row_differences) in enumerate(zip(accuracies, differences)):
        for column_index, (accuracy, difference) in enumerate(zip(row_accuracies, row_differences)):
            axis.text(column_index, row_index, console.matrix_cell(accuracy, difference, separator="\n"),
                      ha="center", va="center", fontsize=8, color="black")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    colorbar = figure.colorbar(image, ax=axis, label="largest |logit difference| / its float32 bound")
    colorbar.set_ticks([-3, -2, -1, 0, 1], labels=["≤ 0.001", "0.01", "0.1", "1 (the bound)", "10"])
    colorbar.solids.set_rasterized(False)  # its gradient, too, as shapes
    axis.set_title(title)
    return save(figure, out, stem)
