"""The run's plots, each as PNG and SVG (report.html inlines the SVG): the chapter's training curves
and how far the implementations drift apart; for compare.py --evaluate, the matrix of checkpoints
evaluated across the implementations."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.colors import LogNorm  # noqa: E402

from common.files import atomic_path  # noqa: E402

CURVES = "curves"          # .png and .svg
DIVERGENCE = "divergence"  # .png and .svg
EVALUATION = "evaluation"  # .png and .svg: compare.py --evaluate's matrix
STEMS = (CURVES, DIVERGENCE, EVALUATION)
SUFFIXES = (".png", ".svg")
# Where a difference is exactly 0, a log-scale plot shows it at this floor instead.
LOG_FLOOR = 1e-17


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
    """compare.py --evaluate's matrix as a heat map: rows where each model was trained, columns where
    it was evaluated; the colour the largest logit difference from its own implementation's (log
    scale), each cell's text the test accuracy above that difference."""
    evaluation = results["evaluation"]
    rows, columns = evaluation["rows"], evaluation["columns"]
    figure, axis = plt.subplots(figsize=(1.6 * len(columns) + 3, 0.7 * len(rows) + 2), constrained_layout=True)
    # Exact zeros (the diagonal) drawn a decade below the smallest difference that is not zero.
    nonzero = [value for row in evaluation["max_abs_logit_diff"] for value in row if value > 0]
    floor = min(nonzero) / 10 if nonzero else LOG_FLOOR
    differences = [[max(value, floor) for value in row] for row in evaluation["max_abs_logit_diff"]]
    largest = max(max(row) for row in differences)
    # Cells drawn as vector shapes (imshow would embed a raster image, which the page's policy refuses).
    image = axis.pcolormesh([index - 0.5 for index in range(len(columns) + 1)],
                            [index - 0.5 for index in range(len(rows) + 1)], differences, cmap="viridis",
                            norm=LogNorm(vmin=floor, vmax=max(largest, 10 * floor)))
    axis.set_aspect("equal")
    axis.invert_yaxis()
    for row_index, (accuracies, row) in enumerate(zip(evaluation["test_acc"], evaluation["max_abs_logit_diff"])):
        for column_index, (accuracy, difference) in enumerate(zip(accuracies, row)):
            # Light text on the dark end of viridis, dark on the light end.
            dark = differences[row_index][column_index] < (floor * largest) ** 0.5
            text = f"{accuracy:.4f}\n{difference:.1e}" if difference else f"{accuracy:.4f}\n0"
            axis.text(column_index, row_index, text, ha="center", va="center",
                      fontsize=8, color="white" if dark else "black")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel("evaluated in")
    axis.set_ylabel("trained in")
    colorbar = figure.colorbar(image, ax=axis, label=f"largest |logit difference| (0 drawn at {floor:.0e})")
    colorbar.solids.set_rasterized(False)  # its gradient, too, as shapes
    axis.set_title("Test accuracy, and largest logit difference from where it was trained")
    return save(figure, out, EVALUATION)
