"""The console's report of a run: the chapter's lines for each implementation, the drift between
them (and, under mixed precision, from float32), and one summary table (report.html shows it too)."""

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
    return table(*summary_rows(results))


def evaluation_rows(results):
    """compare.py --evaluate's matrix as text cells: (header, rows), each cell 'accuracy / largest
    logit difference' (the console's table and report.html's)."""
    evaluation = results["evaluation"]
    header = ("trained in \\ evaluated in", *evaluation["columns"])
    rows = []
    for label, accuracies, differences in zip(evaluation["rows"], evaluation["test_acc"],
                                              evaluation["max_abs_logit_diff"]):
        rows.append((label, *(f"{accuracy:.4f} / {difference:.1e}" if difference else f"{accuracy:.4f} / 0"
                              for accuracy, difference in zip(accuracies, differences))))
    return header, rows


def print_evaluation(results):
    """The matrix of compare.py --evaluate, and what its cells are."""
    evaluation = results["evaluation"]
    print("\nEach checkpoint (row) evaluated in each implementation (column) on the test set: test accuracy /")
    print("largest |logits - the logits of the implementation it was trained in|\n")
    print(table(*evaluation_rows(results)))
    print()
    for label, source, dtype, path in zip(evaluation["rows"], evaluation["sources"], evaluation["dtypes"],
                                          evaluation["files"]):
        print(f"  {label}: {path}, {dtype}, its own logits from {source}")


def table(header, rows):
    """Left-aligned columns under a header and a rule."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
