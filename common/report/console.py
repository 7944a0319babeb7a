"""The console's report of a run: the chapter's lines for each implementation, the drift between
them (and, under mixed precision, from float32), and one summary table (report.html shows it too);
evaluate's and export's matrices."""

from common.report.bounds import DEPLOYED, PORTED, float32_bounds, fraction_of_bound
from impls.registry import IMPLEMENTATIONS

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
        rows.append((label, *map(matrix_cell, accuracies, differences)))
    return header, rows


def evaluation_fractions(results, bounds):
    """Each cell's difference as a fraction of the float32 bound of a moved model, in
    evaluation_rows' layout; None where the bound is unknown."""
    evaluation = results["evaluation"]
    return [[fraction_of_bound(difference, float32_only(bounds.get(PORTED), dtype), magnitude) for difference in row]
            for row, magnitude, dtype in zip(evaluation["max_abs_logit_diff"], evaluation["source_max_abs_logit"],
                                             evaluation["dtypes"])]


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


def matrix_cell(accuracy, difference, separator=" / "):
    """One cell of a matrix: 'test accuracy / largest logit difference' (a heat map's: one above the
    other); 'not run' for a cell that did not run."""
    if accuracy is None:
        return "not run"
    return f"{accuracy:.4f}{separator}{difference:.1e}" if difference else f"{accuracy:.4f}{separator}0"


def deployment_bound(kind, bounds):
    """The float32 bound of an artefact of this kind (tests/tolerances.py), or None where unknown."""
    return bounds.get(DEPLOYED, {}).get(kind)


def deployment_rows(results):
    """compare.py export's matrix as text cells, (header, rows): a row per artefact, a column per
    checkpoint (the console's table and report.html's)."""
    deployment = results["deployment"]
    header = ("artefact \\ checkpoint", *deployment["rows"])
    rows = [(name, *(matrix_cell(deployment["test_acc"][row][column], deployment["max_abs_logit_diff"][row][column])
                     for row in range(len(deployment["rows"]))))
            for column, name in enumerate(deployment["columns"])]
    return header, rows


def deployment_fractions(results, bounds):
    """Each cell's difference as a fraction of its float32 bound, in deployment_rows' layout (a row
    per artefact); None where the cell did not run or its bound is unknown (a float64 model's cells
    are held to no float32 bound)."""
    deployment = results["deployment"]
    return [[None if deployment["test_acc"][row][column] is None else
             fraction_of_bound(deployment["max_abs_logit_diff"][row][column],
                               float32_only(deployment_bound(kind, bounds), deployment["dtypes"][row]),
                               deployment["source_max_abs_logit"][row])
             for row in range(len(deployment["rows"]))]
            for column, kind in enumerate(deployment["column_kinds"])]


def float32_only(bound, dtype):
    """A float32 bound for a float32 model; none for another."""
    return bound if dtype == "float32" else None


def operation_rows(results):
    """What batch norm left in each exported graph, for the first checkpoint of each batch norm
    (scratch, built in; the others' graphs are alike): (header, rows)."""
    deployment = results["deployment"]
    firsts = {}
    for index, source in enumerate(deployment["sources"]):
        firsts.setdefault(IMPLEMENTATIONS[source].norm, index)
    header = ("exported graph", *(deployment["rows"][index] for index in firsts.values()))
    # Every exported column, in the matrix's order; one a checkpoint did not run (ONNX, in float64) says so.
    names = [name for name in deployment["columns"] if any(name in operations for operations in
                                                           deployment["operations"])]
    rows = [(name, *(operation_cell(deployment["operations"][index].get(name)) for index in firsts.values()))
            for name in names]
    return header, rows


def operation_cell(operations):
    if operations is None:
        return "not run"
    return ", ".join(f"{operation} x{count}" for operation, count in operations.items()) or "none"


def throughput_rows(results):
    """Each artefact's inference throughput at each batch size, with its ratio to its framework's
    eager inference: (header, rows)."""
    throughput = results["deployment"]["throughput"]
    header = ("artefact", *(f"batch {batch:,}" for batch in throughput["batch_sizes"]))
    rows = [(row["artefact"], *(f"{row['examples_per_sec'][str(batch)]:,.0f} ({row['ratio_to_eager'][str(batch)]:.2f}x)"
                                for batch in throughput["batch_sizes"]))
            for row in throughput["rows"]]
    return header, rows


def print_deployment(results):
    """compare.py export's matrix, whether every cell is float32's rounding, what batch norm left in
    each graph, and the throughput."""
    deployment = results["deployment"]
    print("\nEach checkpoint (column) deployed every way (row) and evaluated on the test set: test accuracy /")
    print("largest |logits - the eager logits of the implementation it was trained in|\n")
    print(table(*deployment_rows(results)))
    print()
    for label, source, assumed, dtype, path, not_run in zip(
            deployment["rows"], deployment["sources"], deployment["sources_assumed"], deployment["dtypes"],
            deployment["files"], deployment["not_run"]):
        print(f"  {label}: {path}, {dtype}, its own logits from {source}"
              f"{' (assumed: the file does not say where it was trained)' if assumed else ''}")
        for name, reason in not_run.items():
            print(f"    {name}: not run: {reason}")
    print(f"\n{bound_verdict(results, float32_bounds())}")
    header, rows = operation_rows(results)
    print(f"\nWhat batch norm left in each exported graph, as its runtime reads it ({', '.join(header[1:])}):")
    for name, *cells in rows:
        print(f"  {name}: {' | '.join(cells)}")
    throughput = deployment["throughput"]
    print(f"\nInference throughput of {throughput['checkpoint']}'s artefacts, examples/sec (x its framework's eager "
          f"inference at that batch size; median of {throughput['repeats']} repeats, warm-up apart):\n")
    print(table(*throughput_rows(results)))


def bound_verdict(results, bounds):
    """One line: whether every cell of the export's matrix is within its float32 bound."""
    if DEPLOYED not in bounds:
        return "No float32 bound to hold the cells to (tests/tolerances.py not found)."
    fractions = [(fraction, name, label) for name, row in zip(results["deployment"]["columns"],
                                                              deployment_fractions(results, bounds))
                 for fraction, label in zip(row, results["deployment"]["rows"]) if fraction is not None]
    largest, name, label = max(fractions)
    beyond = sum(fraction > 1 for fraction, _, _ in fractions)
    where = f"{name}, {label}"
    if beyond:
        return (f"{beyond} cell(s) beyond their float32 bound (tests/tolerances.py): the largest {largest:.1f}x it "
                f"({where}).")
    return (f"Every difference within its float32 bound (tests/tolerances.py): float32's rounding; the largest "
            f"{largest:.2f} of it ({where}).")
