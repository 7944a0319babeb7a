"""The summary .ci/gpu prints and writes into its log folder (summary.md): Markdown for the README.

    python3 .ci/gpu_summary.py LOGDIR

Reads what .ci/gpu left in LOGDIR: steps.tsv (each step's command, exit status and clock),
suite.log (pytest's output), compiled/results.json and bench/bench.json (compare.py's). A step
that failed or left no file is said to have done so; the summary is written whatever happened.
"""

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "torchvision", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax", "numpy")
FRAMEWORKS = {"torch": "PyTorch", "flax": "Flax NNX", "linen": "Flax Linen"}  # by the implementation's prefix
GOAL = 1_000_000  # training examples/sec per framework on an H100/H200 (issue #24)
DRIFTS = ("max_abs_param_diff", "max_abs_test_logit_diff")  # results.json's "divergence", per epoch
NOT_RUN = "not run: no time left"  # what .ci/gpu writes into a step's log when it leaves the step out
# How a step ended, by its exit status (timeout's 124 and 137; "-": .ci/gpu left it out).
ENDINGS = {"0": "passed", "124": "stopped at its limit ({limit} s)", "137": "killed after its limit ({limit} s)",
           "-": NOT_RUN}
PYTEST_COUNTS = ("passed", "failed", "errors", "error", "skipped", "deselected", "xfailed", "xpassed")
# pytest -v's line per test, as it ends: under xdist "[gw3] [ 41%] FAILED tests/a.py::name", in one
# process "tests/a.py::name FAILED [ 41%]". A suite stopped at its limit prints no short summary.
VERBOSE_OUTCOME = re.compile(
    r"^(?:\[gw\d+\] \[ *\d+%\] (?P<xdist_outcome>[A-Z]+) (?P<xdist_test>tests/.+?)"
    r"|(?P<test>tests/.+?) (?P<outcome>[A-Z]+) +\[ *\d+%\]) *$", re.M)


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine():
    """One line: the GPU, its driver and CUDA version (nvidia-smi), else the CPU; and the packages."""
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        cuda = re.search(r"CUDA Version: *([\d.]+)", header)
        name, driver, memory = (field.strip() for field in gpus[0].split(","))
        device = f"{len(gpus)} x {name} ({memory}), driver {driver} (CUDA {cuda.group(1) if cuda else '?'})"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        device = f"no nvidia-smi ({platform.machine()})"
    packages = ", ".join(f"{name} {installed(name)}" for name in PACKAGES if installed(name))
    return f"{device}; {os.cpu_count()} CPU cores; Python {platform.python_version()}, {packages}"


def commit():
    """The checkout's commit ('-dirty' if files differ from it), where git and the history exist."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def steps(logs):
    """[(name, how it ended, wall seconds, command)] from steps.tsv."""
    rows = []
    path = logs / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, start, end, limit, command = line.split("\t")
        ended = ENDINGS.get(status, "exit {status}").format(status=status, limit=limit)
        wall = float(end) - float(start) if start != "-" else 0.0
        rows.append((name, ended, wall, command))
    return rows


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def suite_lines(logs):
    """pytest's counts, its short summary's failures and skips, and the deselection named."""
    path = logs / "suite.log"
    if not path.exists():
        return ["Tests: not run."]
    text = path.read_text(errors="replace")
    if NOT_RUN in text:
        return [f"Tests: {NOT_RUN}."]
    finals = re.findall(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected)\b.*) in ([\d.]+)s", text, re.M)
    if not finals:
        return stopped_suite_lines(text)
    counts_text, seconds = finals[-1]
    counts = dict((word, int(number)) for number, word in re.findall(r"(\d+) (\w+)", counts_text))
    said = ", ".join(f"{counts[word]} {word}" for word in PYTEST_COUNTS if word in counts)
    lines = [f"Tests: {said} in {float(seconds):.0f} s" + (" (interrupted)" if "Interrupted" in text
                                                            or "KeyboardInterrupt" in text else "") + "."]
    if counts.get("deselected"):
        lines.append(f"Deselected by marker (`-m \"not browser\"`): the {counts['deselected']} tests that read "
                     "report.html in chromium through selenium, which the GPU machine lacks; CI runs them.")
    outcomes = [line for line in text.splitlines() if re.match(r"(FAILED|ERROR|SKIPPED|XPASS|XFAIL) ", line)]
    lines += [f"- `{line}`" for line in outcomes[:20]]
    if len(outcomes) > 20:
        lines.append(f"- ... and {len(outcomes) - 20} more (suite.log)")
    return lines


def stopped_suite_lines(text):
    """What a suite stopped before its result line had done, from pytest -v's line per test."""
    outcomes = [(match["xdist_outcome"] or match["outcome"], match["xdist_test"] or match["test"])
                for match in VERBOSE_OUTCOME.finditer(text)]
    if not outcomes:
        return ["Tests: pytest wrote no result line (stopped before its end): see suite.log."]
    counts = Counter(outcome for outcome, _ in outcomes)
    said = ", ".join(f"{count} {outcome.lower()}" for outcome, count in counts.most_common())
    lines = [f"Tests: stopped before pytest's result line, after {said} (its line per test): see suite.log."]
    named = [f"{outcome} {test}" for outcome, test in outcomes if outcome in ("FAILED", "ERROR", "XPASS")]
    lines += [f"- `{line}`" for line in named[:20]]
    if len(named) > 20:
        lines.append(f"- ... and {len(named) - 20} more (suite.log)")
    return lines


def number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def compiled_lines(logs):
    path = logs / "compiled" / "results.json"
    if not path.exists():
        return ["compare.py train --mode compiled: no results.json (see compiled.log)."]
    results = json.loads(path.read_text())
    config, environment = results["config"], results["environment"]
    batches = f"{config['max_batches']} batches" if config["max_batches"] else "all batches"
    lines = [f"compare.py train --mode compiled: epochs {config['epochs']} of {batches} of {config['batch_size']}, "
             f"lr {config['lr']}, {config['dtype']}"
             f"{', TF32 allowed' if config['tf32'] else ''}; on "
             + ", ".join(f"{framework} {device}" for framework, device in environment["devices"].items()) + ".", ""]
    # Each pair's drift after the last epoch: {pair: (parameters, test logits)}.
    last = {tuple(entry["pair"]): tuple(entry[key][-1] if entry[key] else None for key in DRIFTS)
            for entry in results["divergence"]}

    def furthest(pairs, index, name=None):
        """The largest drift among `pairs` (0: parameters, 1: test logits), with its pair (but `name`)."""
        found = [(drift[index], " vs ".join(other for other in pair if other != name))
                 for pair, drift in pairs if drift[index] is not None]
        return "{:.1e} ({})".format(*max(found)) if found else "-"

    rows = []
    for name, run in results["runs"].items():
        if "not_run" in run:
            rows.append((name, "not run", "", "", "", "", ""))
            continue
        epoch = run["epochs"][-1] if run["epochs"] else {}
        diverged = f" DIVERGED at step {run['diverged_at_step']}" if run["diverged_at_step"] else ""
        its_pairs = [(pair, drift) for pair, drift in last.items() if name in pair]
        rows.append((name, number(epoch.get("train_loss")), number(epoch.get("train_acc")),
                     number(epoch.get("test_acc")), f"{run['examples_per_sec']:,.0f}{diverged}",
                     furthest(its_pairs, 0, name), furthest(its_pairs, 1, name)))
    lines += table(("implementation", "loss", "train acc", "test acc", "examples/sec",
                    "parameters: largest drift (from)", "test logits: largest drift (from)"), rows)
    lines += ["", f"Largest pair drift after the last epoch: parameters {furthest(last.items(), 0)}, "
                  f"test logits {furthest(last.items(), 1)}."]
    if any("torch-builtin" in pair for pair in last):
        lines.append("(torch-builtin's test logits also differ by its unbiased running variance, n/(n-1) times "
                     "the others'.)")
    return lines


def bench_lines(logs):
    path = logs / "bench" / "bench.json"
    if not path.exists():
        return ["compare.py bench: no bench.json (see bench.log)."]
    results = json.loads(path.read_text())
    config = results["config"]
    lines = [f"compare.py bench: median of {config['repeats']} repeats of {config['bench_batches']} batches of "
             f"{config['batch_size']}, {config['dtype']}{', TF32 allowed' if config['tf32'] else ''}, in rounds; "
             f"on {', '.join(sorted({row['device'] for row in results['rows']}))}. 'x chapter loop': against d2l's "
             "loop with the same batch norm; 'x float32': against the same implementation and mode in float32.", ""]
    rows = [(row["implementation"], row["mode"], row["dtype"], f"{row['examples_per_sec']:,.0f}",
             f"{row['ratio_to_baseline']:.2f}", number(row.get("ratio_to_float32"), 2),
             number(row["compile_seconds"], 1)) for row in results["rows"]]
    lines += table(("implementation", "mode", "dtype", "examples/sec", "x chapter loop", "x float32", "warm-up s"),
                   rows)
    by_framework = {}
    for row in results["rows"]:  # the chapter's loop is none of them
        by_framework.setdefault(FRAMEWORKS.get(row["implementation"].split("-")[0]), []).append(row)
    fastest = {framework: max(rows, key=lambda row: row["examples_per_sec"])
               for framework, rows in by_framework.items() if framework}
    lines += ["", f"Fastest per framework (the goal: {GOAL:,} examples/sec each): " + "; ".join(
        f"{framework} {row['examples_per_sec']:,.0f} ({row['implementation']}, {row['mode']}, {row['dtype']})"
        f"{'' if row['examples_per_sec'] >= GOAL else ', below'}" for framework, row in fastest.items()) + "."]
    return lines


def summary(logs):
    ran = steps(logs)
    checkout = commit()
    lines = [f"### .ci/gpu, {time.strftime('%Y-%m-%d')}" + (f", commit {checkout}" if checkout else ""), "",
             f"Machine: {machine()}.", ""]
    lines += table(("step", "command", "ended", "wall s"),
                   [(name, f"`{command}`", ended, f"{wall:.0f}") for name, ended, wall, command in ran]
                   + [("total", "", "", f"{sum(wall for _, _, wall, _ in ran):.0f}")])
    for part in (suite_lines, compiled_lines, bench_lines):
        lines += [""] + part(logs)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logs = Path(sys.argv[1])
    text = summary(logs)
    (logs / "summary.md").write_text(text)
    print(text, end="")
