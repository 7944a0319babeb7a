"""compare.py --bench's report: the console's table, with each row's ratios, and bench.json
(report.html shows the same rows)."""

import os

from common.files import write_json

BENCH = "bench.json"


def print_table(results):
    mixed = any("ratio_to_float32" in row for row in results["rows"])
    header = ("implementation", "mode", "examples/sec", "x chapter loop", "x 1 worker", *(("x float32",) if mixed else ()),
              "warm-up s", "device")
    lines = [header]
    for row in results["rows"]:
        mode = row["mode"] + (f", {row['dtype']}" if mixed else "")
        lines.append((row["implementation"], mode, f"{row['examples_per_sec']:.1f}",
                      f"{row['ratio_to_baseline']:.2f}",
                      f"{row['ratio_to_one_worker']:.2f}" if "ratio_to_one_worker" in row else "-",
                      *((f"{row['ratio_to_float32']:.2f}" if "ratio_to_float32" in row else "-",) if mixed else ()),
                      "-" if row["compile_seconds"] is None else f"{row['compile_seconds']:.2f}", row["device"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines))
    config = results["config"]
    arithmetic = f"{config['dtype']}{' (TF32 allowed)' if config['tf32'] else ''}"
    print(f"(median of {config['repeats']} repeats of {config['bench_batches']} batches of {config['batch_size']}, "
          f"{arithmetic}, taken in rounds over all rows; warm-up timed apart; 'x chapter loop' is against the "
          "loop with the same batch norm, 'x 1 worker' against the same implementation's eager step"
          + (", 'x float32' against the same implementation and mode in float32)" if mixed else ")"))
    if config["data_parallel"] > 1:
        print(f"({config['data_parallel']} workers, {config['bn_stats']} batch-norm statistics; PyTorch's "
              "data-parallel rows were timed in their worker processes, after the other rows)")
    for name, reason in config["not_run"].items():
        print(f"{name}: not run data-parallel: {reason}")


def write(results, out):
    """bench.json into `out`, whole or not at all; returns its path."""
    os.makedirs(out, exist_ok=True)
    return write_json(os.path.join(out, BENCH), results)
