"""End-to-end tests of compare.py, run as a subprocess the way a user runs it.

A handful of tiny runs (a few batches each, on the real Fashion-MNIST) are shared by several tests
through module-scoped fixtures: one run of all six implementations for results.json, the plots and
the printed report; a float64 run; a second run with the same seed and one with another seed; a run
whose learning rate makes the loss overflow; the main run's settings over two workers, and a float64
run under torchrun; the compiled mode, the benchmark and the page alone; evaluate on the main run's
checkpoints, and --init with a checkpoint it refuses. The shared runs the selected tests need all
start with the module, two at a time (SharedRuns). Every error path must stop before training with
a clear message and leave no results.json behind: argparse's in this process, the others each in a
cheap run of its own. (Runs stopped by a signal, or losing a worker: tests/test_stopping.py.)

All training runs pass --device cpu (except the diverging one, which exercises the default 'auto'),
so that the numbers and the "on cpu" lines hold on a machine with a GPU too.
"""

import ast
import itertools
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from common.report import page
from impls import registry
from impls.registry import IMPLEMENTATIONS
from tests.browser import open_page, start_chromium
from tests.conftest import CORES_PER_WORKER
from tests.tolerances import FLOAT32_DEPLOYED_LOGITS, FLOAT32_PORTED_LOGITS

REPO = Path(__file__).resolve().parent.parent
IMPLS = list(IMPLEMENTATIONS)  # the registry's six, in its order: compare.py's default
PAIRS = [list(pair) for pair in itertools.combinations(IMPLS, 2)]
# Each command's own flags, and no other's.
COMMON_FLAGS = ["--impls", "--batch-size", "--device", "--tf32", "--data-dir", "--out", "--no-progress"]
PARALLEL_FLAGS = ["--data-parallel", "--bn-stats", "--worker-timeout"]
FLAGS = {
    "train": [*COMMON_FLAGS, "--epochs", "--lr", "--seed", "--dtype", "--mode", "--max-batches", *PARALLEL_FLAGS,
              "--init", "--running-var"],
    "evaluate": COMMON_FLAGS,
    "bench": [*COMMON_FLAGS, "--lr", "--seed", "--dtype", "--batches", "--repeats", *PARALLEL_FLAGS],
    "page": ["--out"],
    "export": ["--batch-size", "--repeats", "--data-dir", "--out", "--no-progress"],
}
TIMING_FIELDS = {"examples_per_sec", "compile_seconds", "wall_seconds", "train_seconds"}
RUN_TIMEOUT_S = 300  # generous: a tiny run takes about 15 s on a 2-core CPU
# PyTorch's OpenMP threads spin-wait: with a second busy process on a 2-core machine (another test
# run, a build) a tiny run measured 40 times slower, 50 s instead of 1.3 s for torch-scratch. One
# thread keeps these runs quick whatever else runs; the numbers tested do not depend on it.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

# The shared tiny run: 2 epochs of 3 batches of 64.
EPOCHS, MAX_BATCHES, BATCH_SIZE = 2, 3, 64
TINY = ["train", "--epochs", EPOCHS, "--max-batches", MAX_BATCHES, "--batch-size", BATCH_SIZE, "--no-progress",
        "--device", "cpu"]
TRAIN_EXAMPLES = MAX_BATCHES * BATCH_SIZE  # examples seen per epoch
TEST_EXAMPLES = 10000

# Bounds for the float32 run after 3 SGD steps at lr 1.0 (measured: parameters about 2e-6, logits
# about 1e-5 among the three with a biased running variance; about 8e-4 against torch-builtin).
FLOAT32_PARAMS = 1e-3
FLOAT32_LOGITS = 1e-2
FLOAT32_LOSS = 1e-4
# float64 (measured: about 2e-15 on parameters, 1e-14 on logits).
FLOAT64_DIVERGENCE = 1e-10


def run_compare(*args, out=None, timeout=RUN_TIMEOUT_S):
    """python compare.py ARGS [--out OUT] from the repository root; the CompletedProcess."""
    command = [sys.executable, "compare.py", *(str(arg) for arg in args)]
    if out is not None:
        command += ["--out", str(out)]
    return subprocess.run(command, cwd=REPO, env=ENVIRONMENT, capture_output=True, text=True, timeout=timeout)


def completed(process):
    """Fail with compare.py's own output when it did not exit 0."""
    assert process.returncode == 0, (
        f"compare.py exited {process.returncode}\n--- stdout\n{process.stdout}\n--- stderr\n{process.stderr}")
    return process


def load_results(out):
    # json.loads accepts the NaN that a diverged run's numbers may hold.
    return json.loads((Path(out) / "results.json").read_text())


def without_timing(value):
    """results.json with every timing field removed, for comparing two runs."""
    if isinstance(value, dict):
        return {key: without_timing(item) for key, item in value.items() if key not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timing(item) for item in value]
    return value


def report_section(stdout, name):
    """The lines the report prints under '== name ==', up to the next blank line."""
    match = re.search(rf"^== {re.escape(name)} ==\n(.*?)\n\n", stdout, re.MULTILINE | re.DOTALL)
    assert match, f"no section for {name} in the report:\n{stdout}"
    return match.group(1)


def is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One JAX compilation cache, new for this module, shared by its runs of compare.py.

    Every run traces anew, but a run whose shapes an earlier one compiled loads the executables
    (measured: 1.2 s instead of 4.8 s for flax-scratch). The same-seed test thereby also checks
    that a loaded executable computes what a freshly compiled one did.
    """
    ENVIRONMENT.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def compare_command(*args):
    return ["compare.py", *(str(arg) for arg in args)]


def no_data_command(folder, runs):
    (folder / "empty").mkdir()
    return compare_command("--data-dir", folder / "empty", "--device", "cpu")


def evaluate_command(folder, runs):
    """evaluate on the main run's folder (its six canonical files) and, as a user's own, its
    torch-builtin state_dict, in two implementations, on the main run's batch size."""
    checkpoints = runs.out("main_run")
    return compare_command("evaluate", checkpoints, checkpoints / "checkpoints" / "torch-builtin.pt",
                           "--impls", "torch-builtin,flax-scratch", "--batch-size", BATCH_SIZE, "--no-progress",
                           "--device", "cpu")


def bad_init_command(folder, runs):
    """--init with a checkpoint that lacks a moving variance."""
    import safetensors.numpy
    from common.init import canonical_weights
    weights = canonical_weights(0, np.float32)
    del weights["bn2.moving_var"]
    safetensors.numpy.save_file(weights, str(folder / "lenet.safetensors"))
    return compare_command(*TINY, "--init", folder / "lenet.safetensors")


def orbax_init_command(folder, runs):
    """--init with NNX's Orbax folder, two workers on a mesh of host devices: reading the folder
    starts JAX, which the mesh's host devices must precede."""
    from common.drivers import checkpoints
    from common.init import canonical_weights
    weights = canonical_weights(0, np.float32)
    checkpoints.write(folder / "checkpoints", "flax-scratch", weights,
                      checkpoints.metadata_for("flax-scratch", weights, 0, BATCH_SIZE, 1.0, 0, 0.1))
    return compare_command("train", "--init", folder / "checkpoints" / "flax-scratch.orbax", "--data-parallel", 2,
                           "--impls", "flax-scratch", "--epochs", 1, "--max-batches", 2, "--batch-size", BATCH_SIZE,
                           "--no-progress", "--device", "cpu")


# The module's shared runs, in the order they start (the tests' order, but the longest chain,
# compiled then benchmark, early): {fixture: (command after `python`, or a function of the run's
# folder that gives it; the run it must follow)}. Each writes into its folder's "out".
SHARED_RUNS = {
    # All six implementations, float32, seed 0.
    "main_run": (compare_command(*TINY), None),
    # --mode compiled on the main run's settings.
    "compiled_run": (compare_command(*TINY, "--mode", "compiled", "--impls", "torch-scratch,flax-scratch"), None),
    "mixed_precision_run": (compare_command("train", "--impls", "torch-builtin,flax-scratch", "--dtype", "bf16-mixed",
                                            "--epochs", 1, "--max-batches", 3, "--batch-size", BATCH_SIZE,
                                            "--no-progress", "--device", "cpu"), None),
    # The benchmark on batches of 64, as the compiled run, whose compiled PyTorch graph it then
    # finds in TorchInductor's cache.
    "bench_run": (compare_command("bench", "--impls", "torch-scratch,flax-scratch", "--batch-size", BATCH_SIZE,
                                  "--batches", 2, "--repeats", 1, "--data-parallel", 2, "--no-progress",
                                  "--dtype", "bf16-mixed", "--device", "cpu"), "compiled_run"),
    "float64_run": (compare_command("train", "--impls", "torch-scratch,flax-scratch", "--dtype", "float64",
                                    "--epochs", 1, "--max-batches", 3, "--batch-size", BATCH_SIZE, "--no-progress",
                                    "--device", "cpu"), None),
    # Two of the main run's six again, after it: they load the executables it compiled.
    "same_seed_run": (compare_command(*TINY, "--impls", "torch-builtin,linen-builtin"), "main_run"),
    # torch-scratch alone with --seed 1, otherwise the main run's settings.
    "single_seed1_run": (compare_command(*TINY, "--impls", "torch-scratch", "--seed", 1), None),
    # lr 1e38 overflows float32 in the second step (measured; lr 1e30 still gives finite losses).
    "diverged_run": (compare_command("train", "--lr", "1e38", "--max-batches", 5, "--epochs", 1,
                                     "--batch-size", BATCH_SIZE, "--impls", "torch-builtin,flax-scratch",
                                     "--no-progress"), None),
    # Two error paths that need a process: argparse's exit (with no command: compare.py trains),
    # and a data folder without the data.
    "argument_error_run": (compare_command("--data-parallel", 200), None),
    "no_data_run": (no_data_command, None),
    # The main run's settings over 2 workers: PyTorch's two processes, JAX's mesh of two CPU devices.
    "data_parallel_run": (compare_command(*TINY, "--data-parallel", 2,
                                          "--impls", "torch-scratch,torch-builtin,flax-scratch"), None),
    # The float64 run's settings, in two processes started by torchrun (with no command: compare.py trains).
    "torchrun_run": (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      *compare_command("--impls", "torch-scratch,flax-scratch", "--dtype", "float64", "--epochs", 1,
                                       "--max-batches", 3, "--batch-size", BATCH_SIZE, "--no-progress",
                                       "--device", "cpu")], None),
    "page_run": (compare_command("page"), None),
    # The main run's checkpoints, each evaluated in two implementations.
    "evaluate_run": (evaluate_command, "main_run"),
    # Two of the main run's checkpoints, in their frameworks' own formats, deployed every way.
    "export_run": (lambda folder, runs: compare_command(
        "export", runs.out("main_run") / "checkpoints" / "torch-builtin.pt",
        runs.out("main_run") / "checkpoints" / "linen-scratch.orbax", "--repeats", 1, "--no-progress"), "main_run"),
    "bad_init_run": (bad_init_command, None),
    "orbax_init_run": (orbax_init_command, None),
}
# Runs at once: one per core this module's worker has (all of them, without pytest-xdist's workers).
# Each run keeps to about one (OMP_NUM_THREADS=1 above): measured on the 2-core machine on
# 2026-11-27, this module alone took 186 s with two at a time, 351 s with one run after another;
# on 2026-12-04, the whole suite on two workers 7:24 with two at a time here, 6:52 with one.
RUNS_AT_ONCE = CORES_PER_WORKER


class SharedRuns:
    """Starts the shared runs the selected tests of this module need, all as the module starts,
    RUNS_AT_ONCE at a time in SHARED_RUNS' order; result() waits for one."""

    def __init__(self, folders):
        self.folders = folders
        self.pool = ThreadPoolExecutor(RUNS_AT_ONCE)
        self.started = {}  # name -> (future, out folder)
        self.processes = []

    def start(self, name):
        if name not in self.started:
            command, after = SHARED_RUNS[name]
            before = self.start(after) if after else None  # submitted first: it runs first
            folder = self.folders.mktemp(name)
            command = command(folder, self) if callable(command) else command
            self.started[name] = self.pool.submit(self.run, command, folder / "out", before), folder / "out"
        return self.started[name][0]

    def run(self, command, out, before):
        if before is not None:
            before.exception()  # waits; a failure of that run is its own tests'
        with subprocess.Popen([sys.executable, *command, "--out", str(out)], cwd=REPO, env=ENVIRONMENT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            self.processes.append(process)
            try:
                stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def out(self, name):
        """The out folder of a shared run that has started."""
        return self.started[name][1]

    def result(self, name):
        """(CompletedProcess, out folder) of a shared run, once it has ended."""
        future = self.start(name)
        return future.result(), self.started[name][1]

    def stop(self):
        """Runs not yet started are dropped; running ones (a test failed early) are stopped."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # as Ctrl-C: compare.py stops its workers (tests/test_stopping.py)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module", autouse=True)
def shared_runs(request, jax_compilation_cache, tmp_path_factory):
    runs = SharedRuns(tmp_path_factory)
    selected = [item for item in request.session.items if item.module is request.module]
    needed = {name for item in selected for name in item.fixturenames}
    for name in SHARED_RUNS:
        if name in needed:
            runs.start(name)
    yield runs
    runs.stop()


def shared_run(name):
    """A module fixture: the shared run's (CompletedProcess, out folder), whatever its exit status."""
    return pytest.fixture(scope="module", name=name)(lambda shared_runs: shared_runs.result(name))


def shared_results(name):
    """A module fixture: the shared run's (CompletedProcess, out folder, results.json); it fails with
    compare.py's own output where the run did not exit 0."""
    def fixture(shared_runs):
        process, out = shared_runs.result(name)
        return completed(process), out, load_results(out)
    return pytest.fixture(scope="module", name=name)(fixture)


argument_error_run = shared_run("argument_error_run")
no_data_run = shared_run("no_data_run")
main_run = shared_results("main_run")
float64_run = shared_results("float64_run")
diverged_run = shared_results("diverged_run")
single_seed1_run = shared_results("single_seed1_run")


# ---------------------------------------------------------------------------
# The main run: exit code, results.json, plots, report
# ---------------------------------------------------------------------------


def test_main_run_config_and_environment(main_run):
    _, _, results = main_run
    assert results["config"] == {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": 1.0, "seed": 0,
                                 "dtype": "float32", "tf32": False, "impls": IMPLS, "device": "cpu", "mode": "eager",
                                 "max_batches": MAX_BATCHES, "data_parallel": None,
                                 "precision": {"parameters": "float32", "computation": "float32",
                                               "batch_norm_statistics": "float32"}}
    assert "float32_reference" not in results  # only mixed precision trains a second time
    environment = results["environment"]
    # The subprocess runs this interpreter in this environment: the versions are ours.
    assert environment["python"] == platform.python_version()
    for package in ("numpy", "torch", "jax", "flax", "optax"):
        assert isinstance(environment[package], str)
        assert environment[package] == version(package)
    assert environment["devices"] == {"pytorch": "cpu", "flax": "cpu", "linen": "cpu"}


def test_main_run_per_implementation_entries(main_run):
    _, _, results = main_run
    assert list(results["runs"]) == IMPLS
    for name, run in results["runs"].items():
        assert run["device"] == "cpu", name
        assert run["diverged_at_step"] is None, name
        assert [entry["epoch"] for entry in run["epochs"]] == list(range(1, EPOCHS + 1)), name
        for entry in run["epochs"]:
            assert set(entry) == {"epoch", "train_loss", "train_acc", "test_acc", "train_seconds"}
            assert all(is_finite_number(entry[key]) for key in entry), (name, entry)
            # Ten classes, three steps: the loss is of the order of ln 10, not 0 and not huge.
            assert 0.5 < entry["train_loss"] < 10, (name, entry)
            assert 0 <= entry["train_acc"] <= 1 and 0 <= entry["test_acc"] <= 1, (name, entry)
            # Accuracies are counts over the examples seen: 3 batches of 64, and the 10000 test images.
            assert entry["train_acc"] * TRAIN_EXAMPLES == pytest.approx(round(entry["train_acc"] * TRAIN_EXAMPLES))
            assert entry["test_acc"] * TEST_EXAMPLES == pytest.approx(round(entry["test_acc"] * TEST_EXAMPLES))
        seconds = [entry["train_seconds"] for entry in run["epochs"]]
        assert seconds[0] > 0 and seconds == sorted(seconds), (name, seconds)  # cumulative
        assert is_finite_number(run["examples_per_sec"]) and run["examples_per_sec"] > 0, name
        assert is_finite_number(run["compile_seconds"]) and run["compile_seconds"] >= 0, name
        assert is_finite_number(run["wall_seconds"]) and run["wall_seconds"] > 0, name
        assert run["wall_seconds"] >= seconds[-1] + run["compile_seconds"], name
        for key in ("gamma", "beta"):
            values = run["first_bn"][key]
            assert len(values) == 6 and all(is_finite_number(value) for value in values), (name, key, values)
        # Initialised to gamma 1 and beta 0; six SGD steps moved them.
        assert max(abs(value - 1) for value in run["first_bn"]["gamma"]) > 1e-3, name
        assert max(abs(value) for value in run["first_bn"]["beta"]) > 1e-3, name


def test_main_run_implementations_agree(main_run):
    """Same initial weights, same batches: the same losses, accuracies and learned BN parameters."""
    _, _, results = main_run
    reference = results["runs"]["torch-scratch"]
    for name in IMPLS[1:]:
        run = results["runs"][name]
        for mine, theirs in zip(run["epochs"], reference["epochs"]):
            assert abs(mine["train_loss"] - theirs["train_loss"]) < FLOAT32_LOSS, (name, mine, theirs)
            # Allow one example's prediction to tip over in float32.
            assert abs(mine["train_acc"] - theirs["train_acc"]) <= 1 / TRAIN_EXAMPLES, (name, mine, theirs)
        for key in ("gamma", "beta"):
            difference = np.max(np.abs(np.subtract(run["first_bn"][key], reference["first_bn"][key])))
            assert difference < FLOAT32_PARAMS, (name, key, difference)


def test_main_run_divergence(main_run):
    _, _, results = main_run
    divergence = results["divergence"]
    assert [entry["pair"] for entry in divergence] == PAIRS
    for entry in divergence:
        assert set(entry) == {"pair", "max_abs_param_diff", "max_abs_shaping_param_diff", "max_abs_test_logit_diff"}
        # The shaping parameters are some of the parameters.
        assert all(shaping <= every for shaping, every in zip(entry["max_abs_shaping_param_diff"],
                                                              entry["max_abs_param_diff"])), entry
        for key in ("max_abs_param_diff", "max_abs_shaping_param_diff", "max_abs_test_logit_diff"):
            values = entry[key]
            assert len(values) == EPOCHS, (entry["pair"], key)
            assert all(is_finite_number(value) and value >= 0 for value in values), (entry["pair"], key, values)
        assert max(entry["max_abs_param_diff"]) < FLOAT32_PARAMS, entry
        # The first BN layer's gamma and beta are among the parameters compared.
        a, b = (results["runs"][name]["first_bn"] for name in entry["pair"])
        bn_difference = max(np.max(np.abs(np.subtract(a[key], b[key]))) for key in ("gamma", "beta"))
        assert bn_difference <= entry["max_abs_param_diff"][-1], entry

    with_builtin = [entry for entry in divergence if "torch-builtin" in entry["pair"]]
    others = [entry for entry in divergence if "torch-builtin" not in entry["pair"]]
    assert len(with_builtin) == 5 and len(others) == 10
    for entry in others:
        assert max(entry["max_abs_test_logit_diff"]) < FLOAT32_LOGITS, entry
    # torch-builtin keeps an unbiased running variance: its inference-mode logits stand apart from
    # all five others, by more than those differ among themselves, yet stay finite.
    for epoch in range(EPOCHS):
        largest_other = max(entry["max_abs_test_logit_diff"][epoch] for entry in others)
        for entry in with_builtin:
            assert entry["max_abs_test_logit_diff"][epoch] > largest_other, (epoch, entry, largest_other)
            assert entry["max_abs_test_logit_diff"][epoch] < 1.0, (epoch, entry)


@pytest.mark.parametrize("stem", ["curves", "divergence"])
def test_main_run_plots(main_run, stem):
    _, out, _ = main_run
    png, svg = out / f"{stem}.png", out / f"{stem}.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    height, width, channels = image.shape
    assert channels in (3, 4)
    # Side-by-side panels (three for the curves, two for the divergence), at 120 dpi.
    assert height > 300 and width > 2 * height, image.shape
    colours = np.unique(image.reshape(-1, channels), axis=0)
    assert len(colours) > 50, f"{png} has only {len(colours)} colours: an empty figure?"
    assert image[..., :3].std() > 0.05

    text = svg.read_text()
    assert text.lstrip().startswith(("<?xml", "<svg")), text[:100]
    root = ElementTree.fromstring(text.encode())  # well-formed, complete XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(text) > 10_000  # axes, ticks, lines: not an empty drawing
    assert not list(out.glob("*.partial")), "a temporary file was left behind"


def test_main_run_report(main_run):
    process, out, results = main_run
    stdout = process.stdout
    for name in IMPLS:
        section = report_section(stdout, name)
        run = results["runs"][name]
        last = run["epochs"][-1]
        # The chapter's two lines, with this run's numbers.
        loss_line = re.search(r"^loss (\d\.\d{3}), train acc (\d\.\d{3}), test acc (\d\.\d{3})$", section, re.MULTILINE)
        assert loss_line, section
        assert loss_line.groups() == tuple(f"{last[key]:.3f}" for key in ("train_loss", "train_acc", "test_acc"))
        speed_line = re.search(r"^([\d.]+) examples/sec on cpu$", section, re.MULTILINE)
        assert speed_line, section
        assert float(speed_line.group(1)) == pytest.approx(run["examples_per_sec"], abs=0.051)
        assert f"first BN layer gamma [{', '.join(f'{v:.4f}' for v in run['first_bn']['gamma'])}]" in section
        assert "DIVERGED" not in section

    assert "How far the implementations drift apart" in stdout
    for a, b in PAIRS:
        assert f"  {a} vs {b}\n" in stdout
    assert "unbiased" in stdout  # the note on torch-builtin's running variance

    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    assert re.fullmatch(r"implementation\s+loss\s+train acc\s+test acc\s+examples/sec\s+compile s\s+wall s\s+device",
                        lines[header])
    assert re.fullmatch(r"[- ]+", lines[header + 1])
    for name, row in zip(IMPLS, lines[header + 2:header + 2 + len(IMPLS)], strict=True):
        cells = row.split()
        assert cells[0] == name and cells[-1] == "cpu", row
        assert cells[1] == f"{results['runs'][name]['epochs'][-1]['train_loss']:.3f}", row
    assert f"wrote {out / 'results.json'}" in stdout


# ---------------------------------------------------------------------------
# Checkpoints: written by every run, evaluated across the implementations
# ---------------------------------------------------------------------------


def test_main_run_writes_each_implementation_in_every_format(main_run):
    """checkpoints/ beside results.json: each implementation's canonical file, with the metadata a
    reader needs, and its framework's own format holding the same arrays."""
    from common.drivers import checkpoints
    _, out, results = main_run
    native = {name: registry.checkpoint(framework).NATIVE_SUFFIX for name, (framework, _) in IMPLEMENTATIONS.items()}
    assert results["checkpoints"] == {name: [f"checkpoints/{name}.safetensors", f"checkpoints/{name}{native[name]}"]
                                      for name in IMPLS}
    for name, (canonical_path, native_path) in results["checkpoints"].items():
        canonical, own = checkpoints.read(out / canonical_path), checkpoints.read(out / native_path)
        run = results["runs"][name]
        assert {key: canonical.metadata[key] for key in ("implementation", "dtype", "steps", "seed", "test_acc",
                                                          "running_var", "momentum", "init")} == {
            "implementation": name, "dtype": "float32", "steps": str(EPOCHS * MAX_BATCHES), "seed": "0",
            "test_acc": str(run["epochs"][-1]["test_acc"]),
            "running_var": "unbiased" if name == "torch-builtin" else "biased", "momentum": "0.9",
            "init": "canonical, seed 0"}
        assert canonical.weights["bn1.gamma"].tolist() == run["first_bn"]["gamma"]
        for key, value in canonical.weights.items():
            assert own.weights[key].tobytes() == value.tobytes(), (native_path, key)
    assert not list(out.rglob("*.partial*")) and not list(out.rglob("*orbax-checkpoint-tmp*"))
    assert 'id="checkpoints"' in (out / "report.html").read_text()


evaluate_run = shared_results("evaluate_run")


def test_evaluate_measures_each_checkpoint_in_each_implementation(evaluate_run, main_run):
    """evaluate on the main run: each checkpoint, in the implementation it was trained in, scores the
    run's own test accuracy; in the others, its logits within float32 rounding of those."""
    process, out, results = evaluate_run
    _, main_out, main_results = main_run
    evaluation = results["evaluation"]
    columns = ["torch-builtin", "flax-scratch"]
    assert evaluation["rows"] == IMPLS + ["torch-builtin.pt"]
    assert evaluation["sources"] == IMPLS + ["torch-builtin"]
    assert evaluation["columns"] == columns and evaluation["dtypes"] == ["float32"] * 7
    assert evaluation["files"] == [str(main_out / "checkpoints" / f"{name}.safetensors") for name in IMPLS] + [
        str(main_out / "checkpoints" / "torch-builtin.pt")]
    for row, source in enumerate(evaluation["sources"]):
        own_accuracy = evaluation["source_test_acc"][row]
        assert own_accuracy == main_results["runs"][source]["epochs"][-1]["test_acc"], source
        for column, name in enumerate(columns):
            accuracy, difference = evaluation["test_acc"][row][column], evaluation["max_abs_logit_diff"][row][column]
            if name == source:
                assert (accuracy, difference) == (own_accuracy, 0.0)
            else:
                bound = FLOAT32_PORTED_LOGITS * max(1.0, evaluation["source_max_abs_logit"][row])
                assert 0 <= difference <= bound, (source, name, difference)
                # float32 rounding may tip an image whose two best logits all but tie.
                assert abs(accuracy - own_accuracy) <= 2 / TEST_EXAMPLES, (source, name)
    # The state_dict holds what the canonical file of torch-builtin holds.
    for key in ("test_acc", "max_abs_logit_diff"):
        assert evaluation[key][-1] == evaluation[key][IMPLS.index("torch-builtin")]
    lines = process.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("trained in"))
    assert lines[header].split()[-2:] == columns
    for label, accuracies, line in zip(evaluation["rows"], evaluation["test_acc"], lines[header + 2:header + 9],
                                       strict=True):
        assert line.split()[:2] == [label, f"{accuracies[0]:.4f}"], line
    page_text = (out / "report.html").read_text()
    assert 'id="evaluation"' in page_text and 'id="plot-evaluation"' in page_text
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists() and "examples/sec" not in process.stdout  # nothing trained


export_run = shared_results("export_run")


@pytest.mark.deploy
def test_export_deploys_each_checkpoint_every_way_within_float32s_bound(export_run, main_run):
    """export on the main run's torch-builtin state_dict and linen-scratch Orbax folder: every
    artefact written, loaded back in its runtime and evaluated on the test set, each cell within its
    float32 bound (tests/tolerances.py); every exported graph read; each artefact's throughput."""
    from common.drivers import deployment
    process, out, results = export_run
    _, main_out, main_results = main_run
    matrix = results["deployment"]
    assert matrix["rows"] == ["torch-builtin.pt", "linen-scratch.orbax"]
    assert matrix["sources"] == ["torch-builtin", "linen-scratch"] and matrix["dtypes"] == ["float32"] * 2
    names = deployment.artefact_names()
    assert matrix["columns"] == ["eager", *(name for name, *_ in names)]
    assert matrix["column_kinds"] == ["eager", *(kind for _, _, kind, _ in names)]
    for row, source in enumerate(matrix["sources"]):
        own = main_results["runs"][source]["epochs"][-1]["test_acc"]
        assert matrix["test_acc"][row][0] == own and matrix["max_abs_logit_diff"][row][0] == 0
        scale = max(1.0, matrix["source_max_abs_logit"][row])
        for kind, name, accuracy, difference in zip(matrix["column_kinds"][1:], matrix["columns"][1:],
                                                    matrix["test_acc"][row][1:], matrix["max_abs_logit_diff"][row][1:]):
            assert difference <= FLOAT32_DEPLOYED_LOGITS[kind] * scale, (source, name, difference)
            assert abs(accuracy - own) <= 2 / TEST_EXAMPLES, (source, name)
        files = matrix["artefacts"][row]
        assert sorted(Path(path).name for path in files.values()) == sorted(
            [f"{framework}{suffix}{extension}" for framework, extension in
             (("pytorch", ".pt2"), ("flax", ".jaxexport"), ("linen", ".jaxexport"), ("pytorch", ".onnx"))
             for suffix in ("", "-folded")])
        assert all((out / path).stat().st_size > 10_000 for path in files.values())
        operations = matrix["operations"][row]
        assert all(not left for name, left in operations.items() if name.endswith("folded"))
    # The built-in layer's inference in PyTorch's program; the scratch layer's square root in JAX's.
    assert matrix["operations"][0]["torch.export (PyTorch)"] == {"_native_batch_norm_legit_no_training": 4}
    assert matrix["operations"][1]["jax.export (Flax Linen)"] == {"sqrt": 4}
    throughput = matrix["throughput"]
    assert throughput["batch_sizes"] == [1, 256, 10000] and throughput["repeats"] == 1
    assert [row["artefact"] for row in throughput["rows"]] == [
        name for framework, (title, _) in registry.FRAMEWORKS.items()
        for name in (f"{title}, eager", *(name for name, of, _, _ in names if of == framework))]
    for row in throughput["rows"]:
        assert all(row["examples_per_sec"][batch] > 0 for batch in ("1", "256", "10000")), row
        if row["artefact"].endswith(", eager"):
            assert row["ratio_to_eager"] == {"1": 1.0, "256": 1.0, "10000": 1.0}
    assert "Every difference within its float32 bound (tests/tolerances.py)" in process.stdout
    assert not list(out.rglob("*.partial"))
    page_text = (out / "report.html").read_text()
    assert 'id="deployment"' in page_text and 'id="plot-deployment"' in page_text
    # Every cell green: within its bound, or no difference at all (eager's, torch.export's of torch-builtin).
    assert page_text.count('class="number rounding"') + page_text.count('class="number exact"') == 2 * (len(names) + 1)
    assert (out / "deployment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.deploy
def test_export_refuses_in_one_line_what_it_cannot_use(tmp_path, monkeypatch, capsys):
    """A checkpoint that does not load, and an output folder that cannot be written: one line, before
    anything is exported or written."""
    import compare
    from common.checkpoint import save
    from common.init import canonical_weights
    monkeypatch.chdir(REPO)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    lenet = save(canonical_weights(0, np.float32), tmp_path / "lenet.safetensors", {})
    for arguments, message in (
            ([tmp_path / "notes.txt", "--out", tmp_path / "out"],
             r"error: export: .*notes\.txt: not a checkpoint: expected a \.safetensors file, a PyTorch state_dict .*"),
            ([tmp_path / "none.pt", "--out", tmp_path / "out"], r"error: export: .*none\.pt: no such file or folder"),
            ([lenet, "--out", tmp_path / "notes.txt" / "out"],
             r"error: --out .*notes\.txt/out: cannot write there: Not a directory")):
        with pytest.raises(SystemExit) as exited:
            compare.main(["export", *map(str, arguments), "--no-progress"])
        assert re.fullmatch(message, str(exited.value)), str(exited.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lenet.safetensors", "notes.txt"]


@pytest.mark.deploy
def test_export_without_its_packages_names_the_extra_to_install(tmp_path):
    """Where the deploy extra is not installed (onnxscript, here, cannot be imported): one line naming
    it and how to install it, before anything is read or written."""
    code = ("import sys, runpy; sys.modules['onnxscript'] = None; "
            f"sys.argv = ['compare.py', 'export', 'runs/none', '--out', {str(tmp_path / 'out')!r}]; "
            "runpy.run_path('compare.py', run_name='__main__')")
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENVIRONMENT, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        "error: export needs onnxscript, not installed here: pip install -e '.[deploy]' installs every exporter and "
        "runtime it uses"], process.stderr
    assert not (tmp_path / "out").exists()


bad_init_run = shared_run("bad_init_run")


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_runs(bad_init_run):
    """As a user meets it: exit status 1, one line naming the tensor, nothing trained or written."""
    process, out = bad_init_run
    assert process.returncode == 1
    assert_refused(process, out, r"^error: --init: .*lenet\.safetensors: tensor 'bn2\.moving_var' is missing: "
                                 r"expected shape \(16,\)")
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert process.stdout == ""
    assert not out.exists()


orbax_init_run = shared_results("orbax_init_run")


def test_an_orbax_checkpoint_starts_a_data_parallel_run(orbax_init_run):
    """--init with an Orbax folder and --data-parallel 2: the workers' mesh starts before the folder
    is read, and the run starts from the folder's weights."""
    _, out, results = orbax_init_run
    assert results["config"]["init"].endswith("flax-scratch.orbax")
    assert results["runs"]["flax-scratch"]["data_parallel"]["workers"] == 2
    assert (out / "checkpoints" / "flax-scratch.orbax").is_dir()


def test_a_conversion_the_checkpoint_cannot_say_leaves_the_last_run_as_it_was(tmp_path, monkeypatch, capsys):
    """--running-var convert with a file that does not say which variance it keeps: one line, and
    the folder's earlier results.json still there (refused before anything is removed or written)."""
    import safetensors.numpy
    import compare
    from common.init import canonical_weights
    safetensors.numpy.save_file(canonical_weights(0, np.float32), str(tmp_path / "lenet.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exited:
        compare.main([*map(str, TINY), "--init", str(tmp_path / "lenet.safetensors"), "--running-var", "convert",
                      "--out", str(out)])
    assert re.fullmatch(r"error: --running-var convert: .*lenet\.safetensors: the checkpoint does not say which "
                        r"running variance it keeps \(metadata 'running_var': None, .*\)", str(exited.value))
    assert (out / "results.json").read_text() == "{}\n" and sorted(path.name for path in out.iterdir()) == ["results.json"]


# ---------------------------------------------------------------------------
# float64, determinism, seeds
# ---------------------------------------------------------------------------


mixed_precision_run = shared_results("mixed_precision_run")


def test_mixed_precision_run_records_its_precision_and_drift_from_float32(mixed_precision_run, main_run):
    """--dtype bf16-mixed trains each implementation in bfloat16 and again in float32, and records
    the drift of each from its own float32 run; that float32 run is the main run's, number for number."""
    process, _, results = mixed_precision_run
    assert results["config"]["dtype"] == "bf16-mixed"
    assert results["config"]["precision"] == {"parameters": "float32", "computation": "bfloat16",
                                              "batch_norm_statistics": "float32"}
    reference = results["float32_reference"]
    _, _, main_results = main_run
    for name in ("torch-builtin", "flax-scratch"):
        assert reference["runs"][name]["epochs"][0]["train_loss"] == main_results["runs"][name]["epochs"][0]["train_loss"]
        assert results["runs"][name]["epochs"][0]["train_loss"] != main_results["runs"][name]["epochs"][0]["train_loss"]
    drift = {entry["impl"]: entry for entry in reference["drift"]}
    assert set(drift) == {"torch-builtin", "flax-scratch"}
    for entry in drift.values():
        # bfloat16's rounding, not float32's (1e-6 after 3 steps), and not a different model (> 1).
        assert 1e-4 < entry["max_abs_param_diff"][0] < 1.0
    assert "drifts from each implementation's own float32 run" in process.stdout


def test_float64_frameworks_agree(float64_run):
    _, _, results = float64_run
    assert results["config"]["dtype"] == "float64"
    assert list(results["runs"]) == ["torch-scratch", "flax-scratch"]
    [entry] = results["divergence"]
    assert entry["pair"] == ["torch-scratch", "flax-scratch"]
    for key in ("max_abs_param_diff", "max_abs_test_logit_diff"):
        assert len(entry[key]) == 1
        assert 0 <= entry[key][0] <= FLOAT64_DIVERGENCE, entry
    torch_run, flax_run = results["runs"]["torch-scratch"], results["runs"]["flax-scratch"]
    assert abs(torch_run["epochs"][0]["train_loss"] - flax_run["epochs"][0]["train_loss"]) <= FLOAT64_DIVERGENCE
    assert torch_run["epochs"][0]["train_acc"] == flax_run["epochs"][0]["train_acc"]
    assert torch_run["epochs"][0]["test_acc"] == flax_run["epochs"][0]["test_acc"]


same_seed_run = shared_results("same_seed_run")


def test_same_seed_gives_identical_results(main_run, same_seed_run):
    """A second run with the same seed (two of the six implementations) repeats every number."""
    _, _, first = main_run
    names = ["torch-builtin", "linen-builtin"]
    _, _, second = same_seed_run
    assert second["config"] == {**first["config"], "impls": names}
    devices = second["environment"].pop("devices")
    assert devices == {framework: first["environment"]["devices"][framework] for framework in ("pytorch", "linen")}
    assert second["environment"] == {key: value for key, value in first["environment"].items() if key != "devices"}
    for name in names:
        assert without_timing(second["runs"][name]) == without_timing(first["runs"][name]), name
    [pair] = second["divergence"]
    assert pair == next(entry for entry in first["divergence"] if entry["pair"] == names)


def test_other_seed_gives_other_results(main_run, single_seed1_run):
    _, _, seed0 = main_run
    _, _, seed1 = single_seed1_run
    assert seed1["config"]["seed"] == 1
    a, b = seed0["runs"]["torch-scratch"], seed1["runs"]["torch-scratch"]
    # Other initial weights and another batch order: every loss and every BN parameter moves.
    for mine, theirs in zip(a["epochs"], b["epochs"]):
        assert abs(mine["train_loss"] - theirs["train_loss"]) > 1e-3, (mine, theirs)
    for key in ("gamma", "beta"):
        assert np.all(np.abs(np.subtract(a["first_bn"][key], b["first_bn"][key])) > 1e-6), key
    assert seed1["divergence"] == []  # one implementation: no pairs


def test_single_implementation_run_prints_no_warning(single_seed1_run):
    process, _, _ = single_seed1_run
    assert "Warning" not in process.stderr, process.stderr


# ---------------------------------------------------------------------------
# A run that diverges
# ---------------------------------------------------------------------------


def test_diverged_run_is_reported_and_recorded(diverged_run):
    process, out, results = diverged_run
    names = ["torch-builtin", "flax-scratch"]
    assert results["config"]["lr"] == 1e38
    assert list(results["runs"]) == names
    for name in names:
        run = results["runs"][name]
        step = run["diverged_at_step"]
        assert type(step) is int and 1 <= step <= 5, (name, step)
        assert run["epochs"] == []  # the epoch never finished
        assert len(run["first_bn"]["gamma"]) == 6 and len(run["first_bn"]["beta"]) == 6
        section = report_section(process.stdout, name)
        assert f"DIVERGED: loss not finite at step {step}" in section
        assert f"{name}: diverged (loss not finite) at step {step}, epoch 1" in process.stderr
        assert re.search(rf"^{re.escape(name)}\s.*DIVERGED at step {step}$", process.stdout, re.MULTILINE)
    # Both were on the same batches from the same weights: the same step.
    assert results["runs"]["torch-builtin"]["diverged_at_step"] == results["runs"]["flax-scratch"]["diverged_at_step"]
    assert results["divergence"] == [{"pair": names, "max_abs_param_diff": [], "max_abs_shaping_param_diff": [],
                                      "max_abs_test_logit_diff": []}]
    for name in ("curves.png", "curves.svg", "divergence.png", "divergence.svg"):
        assert (out / name).stat().st_size > 0


# ---------------------------------------------------------------------------
# Error paths: a non-zero exit, a clear message, no training and no results.json
# ---------------------------------------------------------------------------


# (arguments, what stderr's last line says after "compare.py[ COMMAND]: error: "). Without a command,
# compare.py trains.
ARGUMENT_ERRORS = [
    (["--impls", "torch-scratch,nope"], "argument --impls: unknown implementation nope; "
                                        "choose from torch-scratch, torch-builtin, flax-scratch, flax-builtin"),
    (["train", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--batch-size", "-3"], "argument --batch-size: expected a positive integer, got '-3'"),
    (["--batch-size", "abc"], "argument --batch-size: expected a positive integer, got 'abc'"),
    (["--lr", "-1"], "argument --lr: expected a positive, finite number, got '-1'"),
    (["--lr", "nan"], "argument --lr: expected a positive, finite number, got 'nan'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    # 60000 = 59999 + 1 (the only such size): the last training batch would hold one example,
    # whether or not --max-batches is given, as long as it reaches that batch (2 batches here).
    (["--batch-size", "59999"], "--batch-size 59999 leaves a last training batch of one example"),
    (["--batch-size", "59999", "--max-batches", "3"], "--batch-size 59999 leaves a last training batch of one example"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["bench", "--batches", "500"], "--batches 500: an epoch has only 234 full batches of 256"),
    (["bench", "--batch-size", "1"], "--batch-size 1: batch norm in training needs at least 2 examples per batch"),
    (["bench", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--data-parallel", "0"], "argument --data-parallel: expected a positive integer, got '0'"),
    # 256 over 200 workers: shards of 2 and 1; the last batch, 96 examples, leaves some workers none.
    (["--data-parallel", "200"], "--data-parallel 200 with --batch-size 256: a worker's shard would hold 0 "
                                 "example(s), and batch norm in training needs at least 2 per worker"),
    (["--data-parallel", "2", "--mode", "compiled"], "--data-parallel trains the eager step (one step per batch)"),
    (["--batch-size", "1"], "--batch-size 1: batch norm in training needs at least 2 examples per batch"),
    (["--lr", "1e300"], "--lr 1e+300 is beyond the largest float32 (3.4e+38)"),
    (["--running-var", "convert"], "--running-var convert converts the moving variances of --init FILE: give one"),
    (["evaluate"], "the following arguments are required: PATH"),
    # The commands own their flags: one that another command has is refused by name.
    (["evaluate", "runs/a", "--init", "runs/a/checkpoints/torch-scratch.pt"],
     "unrecognized arguments: --init runs/a/checkpoints/torch-scratch.pt"),
    (["evaluate", "runs/a", "--data-parallel", "2"], "unrecognized arguments: --data-parallel 2"),
    (["evaluate", "runs/a", "--dtype", "float64"], "unrecognized arguments: --dtype float64"),
    (["bench", "--init", "runs/a/checkpoints/torch-scratch.pt"],
     "unrecognized arguments: --init runs/a/checkpoints/torch-scratch.pt"),
    (["page", "--epochs", "1"], "unrecognized arguments: --epochs 1"),
    (["evalute", "runs/a"], "unknown command 'evalute': choose from train, evaluate, bench, page, export"),
    # The flags that chose a mode before there were commands: the new spelling, in one line.
    (["--evaluate", "runs/a"], "--evaluate is now the evaluate command: python compare.py evaluate PATH..."),
    (["--init", "runs/a/checkpoints/torch-scratch.pt", "--bench"],
     "--bench is now the bench command: python compare.py bench"),
    (["--side-by-side"], "--side-by-side is now the page command: python compare.py page"),
    (["bench", "--bench-batches=5"], "--bench-batches is now bench's --batches: python compare.py bench --batches N"),
]


def assert_refused(process, out, message):
    """Non-zero exit, the message on stderr's last line, no traceback, nothing trained or written."""
    assert process.returncode != 0, process.stdout
    last_line = process.stderr.strip().splitlines()[-1]
    assert re.search(message, last_line), process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    assert "examples/sec" not in process.stdout  # no report: nothing was trained
    assert not (Path(out) / "results.json").exists()


@pytest.mark.parametrize(("args", "message"), ARGUMENT_ERRORS, ids=[" ".join(args) for args, _ in ARGUMENT_ERRORS])
def test_argument_errors(tmp_path, monkeypatch, capsys, args, message):
    """compare.py's parser, here in the test's process (a process of its own costs a second each;
    the next test runs one): argparse's usage error, before anything is written."""
    import compare
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["compare.py", *args, "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        compare.parse_args()
    assert stopped.value.code == 2  # argparse's usage error
    stderr = capsys.readouterr().err
    assert stderr.startswith("usage: compare.py")
    assert re.search(r"^compare\.py( \w+)?: error: " + re.escape(message), stderr.strip().splitlines()[-1]), stderr
    assert not out.exists()


def test_an_argument_error_ends_the_process_before_training(argument_error_run):
    """As a user meets it: exit status 2, the usage and the error on stderr, nothing trained or written."""
    process, out = argument_error_run
    assert process.returncode == 2
    assert_refused(process, out, "^compare\\.py train: error: --data-parallel 200 with --batch-size 256: ")
    assert process.stderr.startswith("usage: compare.py train")
    assert not out.exists()


def test_device_cuda_without_a_gpu(tmp_path):
    import jax
    import torch
    if torch.cuda.is_available() and jax.default_backend() == "gpu":
        pytest.skip("PyTorch and JAX both see a CUDA GPU here, so --device cuda is valid")
    out = tmp_path / "out"
    # Tiny settings, so that a bug which trains anyway does not train for minutes.
    process = run_compare("--device", "cuda", "--epochs", 1, "--max-batches", 1, "--no-progress", out=out, timeout=120)
    assert process.returncode == 1
    assert_refused(process, out, r"^error: --device cuda: (PyTorch|JAX) sees no usable CUDA GPU")
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert process.stdout == ""
    assert not out.exists()  # stopped before the data, the output folder and training


def test_data_dir_without_the_data(no_data_run):
    process, out = no_data_run
    empty = out.parent / "empty"
    assert process.returncode == 1
    assert_refused(process, out, r"^error: data_dir \(--data-dir\) points to ")
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    message = process.stderr.strip()
    assert str(empty) in message and "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte" in message  # says what is missing
    assert not out.exists()


def help_text(monkeypatch, capsys, *args):
    import compare
    monkeypatch.setattr(sys, "argv", ["compare.py", *args, "--help"])
    with pytest.raises(SystemExit) as stopped:
        compare.parse_args()
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_commands(monkeypatch, capsys):
    text = help_text(monkeypatch, capsys)
    assert text.startswith("usage: compare.py [-h] COMMAND ...")
    listed = re.findall(r"^    (\w+) +\S", text, re.MULTILINE)
    assert listed == list(FLAGS), text
    assert "Without a command, compare.py trains" in " ".join(text.split())


@pytest.mark.parametrize("command", list(FLAGS))
def test_each_commands_help_lists_its_own_flags(monkeypatch, capsys, command):
    text = help_text(monkeypatch, capsys, command)
    assert text.startswith(f"usage: compare.py {command} [-h]")
    usage = text[:text.index("\n\n")]
    shown = set(re.findall(r"--[a-z0-9-]+", usage))
    assert shown == set(FLAGS[command]), (command, shown ^ set(FLAGS[command]))
    assert ("PATH [PATH ...]" in usage) == (command in ("evaluate", "export"))  # the checkpoints
    if "--impls" in shown:
        assert all(name in text for name in IMPLS)


# ---------------------------------------------------------------------------
# The fast paths and the benchmark, end to end
# ---------------------------------------------------------------------------


compiled_run = shared_results("compiled_run")


def test_compiled_mode_trains_the_same_batches(compiled_run, main_run):
    """--mode compiled on the main run's settings: the same numbers as eager, within float32 drift."""
    _, _, compiled = compiled_run
    _, _, eager = main_run
    assert compiled["config"]["mode"] == "compiled"
    for name in ("torch-scratch", "flax-scratch"):
        for mine, theirs in zip(compiled["runs"][name]["epochs"], eager["runs"][name]["epochs"]):
            assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-4, (name, mine, theirs)
        assert compiled["runs"][name]["examples_per_sec"] > 0
    [pair] = compiled["divergence"]
    assert max(pair["max_abs_param_diff"]) < 1e-3


@pytest.fixture(scope="module")
def bench_run(shared_runs):
    process, out = shared_runs.result("bench_run")
    return completed(process), out


def test_benchmark_writes_every_figure_and_its_ratio(bench_run):
    """With --data-parallel 2 and --dtype bf16-mixed: every row of one worker in float32 and in mixed
    precision, and each implementation's eager step over 2 workers (PyTorch's in processes of their
    own)."""
    process, out = bench_run
    bench = json.loads((out / "bench.json").read_text())
    rows = {(row["implementation"], row["mode"], row["dtype"]): row for row in bench["rows"]}
    assert len(rows) == len(bench["rows"])
    single = {(name, mode, dtype) for name in ("torch-scratch", "flax-scratch") for mode in ("eager", "compiled")
              for dtype in ("float32", "bf16-mixed")}
    assert set(rows) == {("chapter loop (scratch)", "d2l train_ch6", "float32"), *single,
                         ("torch-scratch", "eager, 2 workers", "float32"), ("flax-scratch", "eager, 2 workers", "float32")}
    baseline = rows[("chapter loop (scratch)", "d2l train_ch6", "float32")]["examples_per_sec"]
    for (name, mode, dtype), row in rows.items():
        assert row["examples_per_sec"] > 0 and len(row["repeats"]) == 1, (name, mode)
        assert row["ratio_to_baseline"] == pytest.approx(row["examples_per_sec"] / baseline), (name, mode)
        assert row["device"] == ("2 x cpu" if "workers" in mode else "cpu")
        if "workers" in mode:
            one_worker = rows[(name, "eager", "float32")]["examples_per_sec"]
            assert row["ratio_to_one_worker"] == pytest.approx(row["examples_per_sec"] / one_worker), name
        else:
            assert "ratio_to_one_worker" not in row
        if dtype == "bf16-mixed":
            float32 = rows[(name, mode, "float32")]["examples_per_sec"]
            assert row["ratio_to_float32"] == pytest.approx(row["examples_per_sec"] / float32), (name, mode)
        else:
            assert "ratio_to_float32" not in row
    assert bench["config"]["dtype"] == "float32/bf16-mixed"
    assert "x float32" in process.stdout and "eager, bf16-mixed" in process.stdout
    assert bench["config"]["data_parallel"] == 2 and bench["config"]["bn_stats"] == "global"
    assert "x chapter loop" in process.stdout and "chapter loop (scratch)" in process.stdout
    assert "x 1 worker" in process.stdout
    assert not (out / "results.json").exists()  # a benchmark is not an experiment run
    # report.html shows what the benchmark measured: every row, its figure and its ratio.
    assert process.stdout.rstrip().endswith(f"{out / 'report.html'}")
    html = re.sub(r">\s+<", "><", (out / "report.html").read_text())
    for row in bench["rows"]:
        assert (f"<td>{row['implementation']}</td><td>{row['mode']}</td><td class=\"number\">"
                f"{row['examples_per_sec']:.1f}</td><td class=\"number\">{row['ratio_to_baseline']:.2f}</td>") in html, row


# ---------------------------------------------------------------------------
# Data parallel, end to end: compare.py starting its workers, and compare.py under torchrun
# ---------------------------------------------------------------------------


data_parallel_run = shared_results("data_parallel_run")


def test_data_parallel_run_records_its_workers(data_parallel_run):
    process, _, results = data_parallel_run
    assert results["config"]["data_parallel"] == {"workers": 2, "bn_stats": "global", "started_by": "compare.py"}
    engines = {"torch-scratch": r"torch\.distributed \(gloo\), 2 processes, DistributedDataParallel",
               "flax-scratch": r"jax\.sharding mesh of 2 cpu devices in one process, shard_map"}
    for name, engine in engines.items():
        parallel = results["runs"][name]["data_parallel"]
        assert parallel["workers"] == 2 and parallel["bn_stats"] == "global"
        assert re.fullmatch(engine, parallel["engine"]), parallel
        assert len(parallel["devices"]) == 2 and len(set(parallel["devices"])) == 2, parallel
        assert f"2 workers, global batch-norm statistics: {parallel['engine']}" in report_section(process.stdout, name)


def test_data_parallel_page_shows_the_workers(data_parallel_run):
    """report.html says how each implementation trained: its workers, engine and devices, and why one did not."""
    process, _, results = data_parallel_run
    html = re.sub(r">\s+<", "><", Path(process.stdout.splitlines()[-1].split(", ")[-1]).read_text())
    for name in ("torch-scratch", "flax-scratch"):
        parallel = results["runs"][name]["data_parallel"]
        assert (f"<tr><td>{name}</td><td class=\"number\">2</td><td>global</td><td>{parallel['engine']}</td>"
                f"<td>{', '.join(parallel['devices'])}</td></tr>") in html, name
    assert "<code>torch-builtin</code>: not run: nn.SyncBatchNorm trains only on GPUs" in html


def test_sync_batch_norm_is_reported_as_not_run_on_the_cpu(data_parallel_run):
    """One line says why, the other implementations run, and the report and results.json say so."""
    process, _, results = data_parallel_run
    reason = results["runs"]["torch-builtin"]["not_run"]
    assert reason.startswith("nn.SyncBatchNorm trains only on GPUs") and "--bn-stats local" in reason
    assert [line for line in process.stderr.splitlines() if "not run" in line] == [f"torch-builtin: not run: {reason}"]
    assert f"not run: {reason}" in report_section(process.stdout, "torch-builtin")
    assert re.search(r"^torch-builtin +- +- +- +- +- +- +not run", process.stdout, re.MULTILINE)
    assert [entry["pair"] for entry in results["divergence"]] == [["torch-scratch", "flax-scratch"]]


def test_data_parallel_run_trains_as_one_device(data_parallel_run, main_run):
    """Global statistics over 2 workers: the main run's numbers, within float32 drift."""
    _, _, results = data_parallel_run
    _, _, single = main_run
    for name in ("torch-scratch", "flax-scratch"):
        mine, theirs = results["runs"][name], single["runs"][name]
        for epoch, (a, b) in enumerate(zip(mine["epochs"], theirs["epochs"], strict=True), start=1):
            assert abs(a["train_loss"] - b["train_loss"]) < FLOAT32_LOSS, (name, epoch, a, b)
            assert abs(a["train_acc"] - b["train_acc"]) <= 1 / TRAIN_EXAMPLES, (name, epoch, a, b)
            assert abs(a["test_acc"] - b["test_acc"]) <= 3 / TEST_EXAMPLES, (name, epoch, a, b)
        for key in ("gamma", "beta"):
            assert np.max(np.abs(np.subtract(mine["first_bn"][key], theirs["first_bn"][key]))) < FLOAT32_PARAMS


torchrun_run = shared_results("torchrun_run")


def test_compare_under_torchrun_runs_every_framework_across_processes(torchrun_run, float64_run):
    """torchrun starts compare.py twice: each process is one worker of torch.distributed and of
    jax.distributed (CPU collectives over gloo); worker 0 reports. In float64, the single-device
    float64 run's numbers within 1e-10, JAX's multi-process mesh included."""
    _, _, results = torchrun_run
    _, _, single_process = float64_run
    assert results["config"]["data_parallel"] == {"workers": 2, "bn_stats": "global", "started_by": "torchrun"}
    assert results["runs"]["flax-scratch"]["data_parallel"]["engine"] == (
        "jax.sharding mesh of 2 cpu devices in 2 processes joined by jax.distributed, shard_map")
    devices = results["runs"]["flax-scratch"]["data_parallel"]["devices"]
    assert [device.split("/")[0] for device in devices] == ["process 0", "process 1"], devices
    for name in ("torch-scratch", "flax-scratch"):
        mine, theirs = results["runs"][name], single_process["runs"][name]
        assert abs(mine["epochs"][0]["train_loss"] - theirs["epochs"][0]["train_loss"]) <= FLOAT64_DIVERGENCE, name
        assert mine["epochs"][0]["test_acc"] == theirs["epochs"][0]["test_acc"], name
        for key in ("gamma", "beta"):
            difference = np.max(np.abs(np.subtract(mine["first_bn"][key], theirs["first_bn"][key])))
            assert difference <= FLOAT64_DIVERGENCE, (name, key, difference)
    for entry in results["divergence"]:
        assert max(entry["max_abs_param_diff"]) <= FLOAT64_DIVERGENCE, entry
    # Worker 0 writes the checkpoints alone, Orbax's folders included (Orbax would meet every process).
    _, out, _ = torchrun_run
    from common.drivers import checkpoints
    for name, paths in results["checkpoints"].items():
        assert len(paths) == 2, (name, paths)
        canonical, own = (checkpoints.read(out / path) for path in paths)
        assert all(own.weights[key].tobytes() == value.tobytes() for key, value in canonical.weights.items()), name


def unused_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rendezvous_that_cannot_be_reached_is_one_line(tmp_path):
    """Worker 1 of 2, told of a rendezvous where nobody listens: a one-line error within the timeout,
    nothing written. JAX alone here: its own client would abort the process, so the workers meet at
    torch.distributed's rendezvous first, whatever they train."""
    out = tmp_path / "out"
    port = unused_port()
    environment = {**ENVIRONMENT, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    process = subprocess.run([sys.executable, "compare.py", "--impls", "flax-scratch", "--worker-timeout", "2", "--no-progress",
                              "--device", "cpu", "--out", str(out)],
                             cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert_refused(process, out, rf"^error: worker 1 of 2 could not join the rendezvous at 127\.0\.0\.1:{port} "
                                 r"within 2 s \(.+\); check MASTER_ADDR and MASTER_PORT, and that all 2 workers were started$")
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------
# report.html, as a reader sees it in a real browser (Debian's chromium, through selenium): the
# main run's page, the page command's and evaluate's, each loaded once
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_run(shared_runs):
    process, out = shared_runs.result("page_run")
    return completed(process), out


@pytest.fixture(scope="module")
def main_page(browser, main_run):
    _, out, _ = main_run
    return open_page(browser, out / "report.html")


@pytest.fixture(scope="module")
def source_page(browser, page_run):
    _, out = page_run
    return open_page(browser, out / "report.html")


@pytest.fixture(scope="module")
def evaluate_page(browser, evaluate_run):
    _, out, _ = evaluate_run
    return open_page(browser, out / "report.html")


@pytest.fixture(scope="module")
def export_page(browser, export_run):
    _, out, _ = export_run
    return open_page(browser, out / "report.html")


@pytest.fixture(params=["train", "page", "evaluate", pytest.param("export", marks=pytest.mark.deploy)])
def any_page(request, browser):
    """Any of the pages. `browser` is named here, though the page's own fixture asks for it, so that
    pytest sees these tests need it too and tests/conftest.py marks them `browser`."""
    return request.getfixturevalue({"train": "main_page", "page": "source_page",
                                    "evaluate": "evaluate_page", "export": "export_page"}[request.param])


def readme_topics(heading):
    """The first column of the README's table under `heading`, read here line by line."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(heading)
    table = list(itertools.takewhile(lambda line: line.startswith("|"),
                                     itertools.dropwhile(lambda line: not line.startswith("|"), lines[start:])))
    return [row.split("|")[1].strip().replace("`", "") for row in table[2:]]


def definitions(path):
    """{name: line} of a file's top-level definitions and its classes' methods, by ast."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node.lineno
            if isinstance(node, ast.ClassDef):
                found.update({f"{node.name}.{member.name}": member.lineno for member in node.body
                              if isinstance(member, ast.FunctionDef)})
        elif isinstance(node, ast.Assign) and all(isinstance(target, ast.Name) for target in node.targets):
            found.update({target.id: node.lineno for target in node.targets})
    return found


PAGE_FIXTURES = {"browser", "main_page", "source_page", "evaluate_page", "export_page", "any_page"}


def test_without_selenium_the_module_collects_and_the_browser_marker_names_the_page_tests():
    """.ci/gpu runs the suite where selenium and chromium are missing, with -m "not browser": this
    module must import there (tests/browser.py imports selenium only to start chromium), and the
    marker must take exactly the tests that open a page, read here from their arguments."""
    code = ("import sys; sys.modules['selenium'] = None; import pytest; "  # as if selenium were not installed
            "sys.exit(pytest.main(['-o', 'addopts=', '--collect-only', '-q', '-m', 'browser', "
            "'tests/test_compare.py']))")
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENVIRONMENT, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 0, process.stdout + process.stderr
    marked = {line.split("::")[1].split("[")[0] for line in process.stdout.splitlines() if line.startswith("tests/")}
    opening_a_page = {node.name for node in ast.parse(Path(__file__).read_text()).body
                      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
                      and PAGE_FIXTURES & {argument.arg for argument in node.args.args}}
    assert marked == opening_a_page and len(marked) == 8, (marked, opening_a_page)


def test_page_writes_the_source_view_alone(page_run, source_page):
    """compare.py page: report.html alone, without results; no data read (the command has no flag for it)."""
    process, out = page_run
    assert process.stdout == f"wrote {out / 'report.html'}\n"
    assert [path.name for path in out.iterdir()] == ["report.html"]  # nothing trained, nothing else written
    seen, _, _ = source_page
    assert not seen["hasResults"] and seen["plots"] == [] and seen["views"]


def test_the_page_makes_no_network_request(any_page):
    seen, requests, messages = any_page
    assert len(requests) == 1 and requests[0].startswith("file:///") and requests[0].endswith("/report.html"), requests
    assert messages == []  # a resource refused by the page's Content-Security-Policy would be logged here


def test_the_network_check_sees_a_request(browser, tmp_path):
    """The check above can fail: a page that loads an image from elsewhere shows the request."""
    path = tmp_path / "fetches.html"
    path.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/plot.png"></body></html>\n')
    _, requests, _ = open_page(browser, path)
    assert "http://127.0.0.1:9/plot.png" in requests


def test_every_definition_appears_once_in_order_beside_its_twin(any_page):
    """Each pair of mirrored files: every line of each file once, in file order, in its own column;
    every definition both files hold (read here with ast) on one row, beside its twin; nothing out of step."""
    seen, _, _ = any_page
    assert seen["problems"] is None, seen["problems"]
    renamed = {(filename, names[left], names[right]) for filename, names, _ in page.TWINS_BY_OTHER_NAME
               for left in names for right in names if names[left] != names[right]}
    pairs = [view for view in seen["views"] if not view["single"]]
    assert [view["heads"] for view in pairs] == [
        [f"{registry.FRAMEWORKS[left].title}: impls/{left}/{filename}",
         f"{registry.FRAMEWORKS[right].title}: impls/{right}/{filename}"]
        for filename in page.FILE_ORDER
        for left, right in itertools.pairwise(registry.FRAMEWORKS)]
    for view in seen["views"]:
        paths = [REPO / head.split(": ")[1] for head in view["heads"]]
        for side, path in enumerate(paths):
            lines = path.read_text().splitlines()
            shown = [line for row in view["rows"] for line in row["lines"][side] if line and line["own"]]
            numbers = [line["number"] for line in shown]
            assert numbers == sorted(set(numbers)), (path, "each line once, in order")
            assert {number for number, text in enumerate(lines, 1) if text.strip()} <= set(numbers), path
            assert all(line["text"] == lines[line["number"] - 1] for line in shown), path
        if view["single"]:
            continue
        left, right = (definitions(path) for path in paths)
        filename = paths[0].name
        twins = [(name, name) for name in left if name in right] + [
            (a, b) for name, a, b in renamed if name == filename and a in left and b in right]
        for left_name, right_name in twins:
            [row] = [row for row in view["rows"] if (row["left"], row["right"]) == (left_name, right_name)]
            assert row["status"] in ("twins", "renamed"), row["id"]
            numbers = [[line and line["number"] for line in column] for column in row["lines"]]
            assert left[left_name] in numbers[0] and right[right_name] in numbers[1], (row["id"], "the definitions' lines")
            beside = [(a, b) for a, b in zip(*row["lines"]) if a and b]
            assert beside and all(a["rect"]["y"] == b["rect"]["y"] and a["rect"]["x"] + a["rect"]["width"] <= b["rect"]["x"]
                                  for a, b in beside), row["id"]
            assert all(a["rect"]["width"] > 450 and b["rect"]["width"] > 450 for a, b in beside), row["id"]


def test_every_row_of_the_tables_of_differences_leads_to_its_place(any_page):
    seen, _, _ = any_page
    assert seen["missingPlaces"] is None, seen["missingPlaces"]
    tables = {table["section"]: table["rows"] for table in seen["tables"]}
    assert [row["topic"] for row in tables["where-the-frameworks-differ"]] == readme_topics("## Where the frameworks differ")
    assert [row["topic"] for row in tables["over-several-workers"]] == readme_topics("### Over several workers")
    assert [row["topic"] for row in tables["batch-norm-options-across-frameworks"]] == readme_topics(
        "### Batch-norm options across frameworks")
    for row in (row for rows in tables.values() for row in rows):
        assert row["places"], row["topic"]
        for place in row["places"]:
            assert place["links"], (row["topic"], place["name"])
            for link in place["links"]:
                target = link["target"]
                assert target is not None, (row["topic"], link["href"], "no such place on the page")
                assert target["isDefinition"] and target["rect"]["height"] > 0, (row["topic"], link["href"])
                assert place["name"] in target["names"], (row["topic"], place["name"], target["names"])


def test_the_plots_are_drawn(main_page):
    """Both plots, inline, at the page's width, with a drawn line for every implementation (the
    curves: 3 panels of 6, and the legend's 6) and every pair (the drift: 2 panels of 15, and 15)."""
    seen, _, _ = main_page
    assert [plot["id"] for plot in seen["plots"]] == ["plot-curves", "plot-divergence"]
    for plot, drawn in zip(seen["plots"], (3 * 6 + 6, 2 * len(PAIRS) + len(PAIRS))):
        box = plot["rect"]
        assert box["width"] > 1000 and box["height"] > 300, plot["id"]
        assert len(plot["lines"]) == drawn, plot["id"]
        for line in plot["lines"]:
            assert line["width"] > 0, plot["id"]  # every line spans the epochs
            inner = line["rect"]
            assert box["x"] <= inner["x"] and inner["x"] + inner["width"] <= box["x"] + box["width"], plot["id"]
            assert box["y"] <= inner["y"] and inner["y"] + inner["height"] <= box["y"] + box["height"], plot["id"]


def test_the_page_shows_the_runs_numbers(main_run, main_page):
    process, out, results = main_run
    seen, _, _ = main_page
    assert f"{out / 'report.html'}" in process.stdout.splitlines()[-1]
    assert seen["summary"][0] == ["implementation", "loss", "train acc", "test acc", "examples/sec", "compile s",
                                  "wall s", "device"]
    assert [row[0] for row in seen["summary"][1:]] == IMPLS
    for row in seen["summary"][1:]:
        run = results["runs"][row[0]]
        last = run["epochs"][-1]
        assert row[1:4] == [f"{last[key]:.3f}" for key in ("train_loss", "train_acc", "test_acc")], row
        assert row[4] == f"{run['examples_per_sec']:.1f}" and row[7] == "cpu", row
    assert seen["configuration"]["epochs"] == str(EPOCHS) and seen["configuration"]["batch_size"] == str(BATCH_SIZE)
    assert seen["configuration"]["impls"] == ", ".join(IMPLS)


def test_the_page_fits_a_laptops_width(any_page):
    """At 1366 pixels: no horizontal scrolling of the page, and no line of code overflowing its column
    (long lines wrap within it)."""
    seen, _, _ = any_page
    assert seen["viewport"] == 1366 and seen["width"] <= seen["viewport"], seen["width"]
    for view in seen["views"]:
        for row in view["rows"]:
            assert not row["overflows"], row["id"]
            assert not [line for column in row["lines"] for line in column if line and line["overflows"]], row["id"]
