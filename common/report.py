"""What compare.py shows and keeps: console lines and table, results.json, plots."""

import json
import math
import os
import platform
from importlib.metadata import PackageNotFoundError, version

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from common import page  # noqa: E402
from common.harness import framework_module  # noqa: E402

RESULTS = "results.json"
CURVES = "curves"          # .png and .svg
DIVERGENCE = "divergence"  # .png and .svg
PAGE = page.PAGE           # report.html: the source side by side and these results
# Where a difference is exactly 0, a log-scale plot shows it at this floor instead.
LOG_FLOOR = 1e-17


def environment(devices):
    def package_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    packages = {name: package_version(name) for name in ("numpy", "torch", "jax", "jaxlib", "flax", "optax")}
    return {"python": platform.python_version(), **packages,
            "devices": {framework: framework_module(framework).device_description(device)
                        for framework, device in devices.items()}}


def print_report(results):
    runs = results["runs"]
    print()
    for name, run in runs.items():
        print(f"== {name} ==")
        if "not_run" in run:
            print(f"not run: {run['not_run']}\n")
            continue
        if run["epochs"]:
            last = run["epochs"][-1]
            # The chapter's two lines.
            print(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}")
        print(f"{run['examples_per_sec']:.1f} examples/sec on {run['device']}")
        print(f"compile/warm-up {run['compile_seconds']:.2f} s, wall {run['wall_seconds']:.1f} s")
        if "data_parallel" in run:
            parallel = run["data_parallel"]
            print(f"{parallel['workers']} workers, {parallel['bn_stats']} batch-norm statistics: {parallel['engine']}")
        if run["diverged_at_step"]:
            print(f"DIVERGED: loss not finite at step {run['diverged_at_step']}")
        print(f"first BN layer gamma {format_vector(run['first_bn']['gamma'])}")
        print(f"first BN layer beta  {format_vector(run['first_bn']['beta'])}")
        print()

    print("How far the implementations drift apart (max abs difference, after each epoch):")
    for entry in results["divergence"]:
        a, b = entry["pair"]
        if not entry["max_abs_param_diff"]:
            print(f"  {a} vs {b}: no epoch to compare (a run diverged in its first epoch)")
            continue
        print(f"  {a} vs {b}\n{drift_lines(entry)}")
    if compares_torch_builtin(results):
        print("  (torch-builtin's test logits also differ because nn.BatchNorm keeps an unbiased\n"
              "   running variance, n/(n-1) times the others'; the parameters are unaffected)")
    print("  (parameters*: without the biases of the layers before each batch norm, which cancels them:\n"
          "   their gradient is rounding noise, and they change no output)")
    reference = results.get("float32_reference")
    if reference:
        print(f"\nHow far {results['config']['dtype']} drifts from each implementation's own float32 run "
              "(max abs difference, after each epoch), and where the float32 run ended:")
        for entry in reference["drift"]:
            name, float32_run = entry["impl"], reference["runs"][entry["impl"]]
            last = float32_run["epochs"][-1] if float32_run.get("epochs") else None
            ended = (f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}"
                     if last else "no epoch")
            print(f"  {name}\n{drift_lines(entry)}\n    float32 run: {ended}")

    print()
    print(summary_table(results))


def compares_torch_builtin(results):
    """Whether a pair includes torch-builtin, whose test logits differ by its unbiased running variance."""
    return any("torch-builtin" in entry["pair"] for entry in results["divergence"])


def drift_lines(entry):
    """One pair's (or one implementation's against float32) drift after each epoch, three lines."""
    def values(key):
        return " ".join(f"{value:.1e}" for value in entry[key])
    return (f"    parameters:  {values('max_abs_param_diff')}\n"
            f"    parameters*: {values('max_abs_shaping_param_diff')}\n"
            f"    test logits: {values('max_abs_test_logit_diff')}")


def format_vector(values):
    return "[" + ", ".join(f"{value:.4f}" for value in values) + "]"


def summary_rows(results):
    """The summary table's header and rows, as text cells (the console's table and report.html's)."""
    header = ("implementation", "loss", "train acc", "test acc", "examples/sec", "compile s", "wall s", "device")
    rows = []
    for name, run in results["runs"].items():
        if "not_run" in run:
            rows.append((name, "-", "-", "-", "-", "-", "-", "not run (see above)"))
            continue
        last = run["epochs"][-1] if run["epochs"] else None
        rows.append((
            name,
            f"{last['train_loss']:.3f}" if last else "-",
            f"{last['train_acc']:.3f}" if last else "-",
            f"{last['test_acc']:.3f}" if last else "-",
            f"{run['examples_per_sec']:.1f}",
            f"{run['compile_seconds']:.2f}",
            f"{run['wall_seconds']:.1f}",
            run["device"] + (f"  DIVERGED at step {run['diverged_at_step']}" if run["diverged_at_step"] else ""),
        ))
    return header, rows


def summary_table(results):
    header, rows = summary_rows(results)
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def remove_stale_results(out):
    """An earlier run's results.json and plots in `out` must not pass for this run's if it is interrupted."""
    for name in (RESULTS, PAGE, *(stem + suffix for stem in (CURVES, DIVERGENCE) for suffix in (".png", ".svg"))):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def finite_or_none(value):
    """JSON has no NaN or infinity: a diverged run's numbers are written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_all(results, out):
    """Plots first, then report.html, results.json last and atomically: its presence means the run
    completed."""
    paths = plot_curves(results, out) + plot_divergence(results, out)
    paths.append(page.write(out, results=results))
    path = os.path.join(out, RESULTS)
    temporary = path + ".partial"
    with open(temporary, "w") as file:
        json.dump(finite_or_none(results), file, indent=2, allow_nan=False)
    os.replace(temporary, path)
    return [path, *paths]


def save(figure, out, stem):
    paths = []
    for suffix in (".png", ".svg"):
        path = os.path.join(out, stem + suffix)
        figure.savefig(path + ".partial", format=suffix[1:], dpi=120, bbox_inches="tight")
        os.replace(path + ".partial", path)
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
