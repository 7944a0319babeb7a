#!/usr/bin/env python3
"""Where a compiled training step's time goes on a GPU, measured in one run: what docs/performance.md
("Where the time goes on the GPU") reports, measured again on the GPU that runs it.

    python3 .ci/gpu_profile.py [--impls torch-builtin,flax-builtin] [--batch-sizes 256,2048]

For each implementation, in float32 and bf16-mixed, the fast path (--mode compiled: PyTorch's
whole-step CUDA graph, JAX's scanned epoch) is timed at each batch size: steps/sec and
examples/sec, each the median of --repeats timings of --steps steps after a compiling warm-up,
the clock read after the device has synchronised. A step that costs as much at 2048 examples as
at 256 is bound by its fixed costs (kernel launches and their latency), not by arithmetic.

Then one profile per implementation and precision at the first batch size: the GPU kernels of
--steps steps (torch.profiler over the graph's replays; jax.profiler's trace of the scanned
epoch), their count per step, their summed time per step against the step's wall time, and the
largest of them.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data import load_fashion_mnist, train_batch_indices  # noqa: E402
from common.drivers.harness import select_devices, start_run  # noqa: E402
from common.drivers.settings import PRECISIONS  # noqa: E402
from impls.registry import IMPLEMENTATIONS, parse_implementations  # noqa: E402
from common.init import canonical_weights  # noqa: E402

LR = 1.0


def timed_steps(run, batches, repeats):
    """Median seconds per step over `repeats` timings of the trainer on `batches` (steps, batch)."""
    seconds = []
    for _ in range(repeats):
        run.trainer.synchronize()
        start = time.perf_counter()
        run.trainer.train(batches)
        run.trainer.synchronize()
        seconds.append((time.perf_counter() - start) / len(batches))
    return statistics.median(seconds)


def torch_kernels(run, batches):
    """{kernel name: (count, total microseconds)} over one training call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        run.trainer.train(batches)
        run.trainer.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in profiler.events():
        if event.device_type.name == "CUDA":
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time
    return kernels


def jax_kernels(run, batches):
    """{kernel name: (count, total microseconds)} over one training call, from jax.profiler's
    Perfetto trace (the events of the GPU's streams)."""
    import jax
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            run.trainer.train(batches)
            run.trainer.synchronize()
        path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_processes = {event["pid"] for event in events
                     if event.get("ph") == "M" and event.get("name") == "process_name"
                     and "GPU" in str(event.get("args", {}).get("name", ""))}
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("ph") == "X" and event.get("pid") in gpu_processes and "dur" in event:
            kernels[event["name"]][0] += 1
            kernels[event["name"]][1] += float(event["dur"])
    return kernels


def print_kernels(kernels, steps, step_seconds, top=8):
    count = sum(value[0] for value in kernels.values())
    busy = sum(value[1] for value in kernels.values())
    print(f"    {count / steps:.0f} kernels a step, {busy / steps:.1f} us of kernel time a step "
          f"against {step_seconds * 1e6:.1f} us of wall time ({busy / steps / (step_seconds * 1e6):.0%} busy)")
    for name, (number, total) in sorted(kernels.items(), key=lambda item: -item[1][1])[:top]:
        print(f"      {total / steps:7.1f} us  x{number / steps:.0f}  {name[:110]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--impls", type=parse_implementations, default="torch-scratch,torch-builtin,flax-scratch,flax-builtin")
    parser.add_argument("--batch-sizes", default="256,2048", help="comma-separated; the first is profiled")
    parser.add_argument("--dtypes", default="float32,bf16-mixed", help="comma-separated --dtype values")
    parser.add_argument("--steps", type=int, default=100, help="steps per timing (fewer if an epoch has fewer)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: to try the script itself")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    train_images, train_labels, _, _ = load_fashion_mnist()
    devices = select_devices(args.impls, args.device, np.float32)
    weights = canonical_weights(0, np.float32)
    print(f"devices: { {framework: str(device) for framework, device in devices.items()} }")
    for name in args.impls:
        framework = IMPLEMENTATIONS[name][0]
        for dtype in args.dtypes.split(","):
            run = start_run(name, weights, LR, devices[framework], "compiled", train_images, train_labels,
                            compute_dtype=PRECISIONS[dtype][1])
            per_size = {}
            for batch_size in batch_sizes:
                indices = train_batch_indices(len(train_labels), batch_size, seed=0, epoch=1)
                batches = np.stack([batch for batch in indices if len(batch) == batch_size][:args.steps])
                start = time.perf_counter()
                run.trainer.train(batches)  # compiles (and, on CUDA in PyTorch, captures the graph)
                run.trainer.synchronize()
                warmup = time.perf_counter() - start
                per_size[batch_size] = (timed_steps(run, batches, args.repeats), warmup, batches)
            print(f"{name}, {dtype}:")
            for batch_size, (step_seconds, warmup, _) in per_size.items():
                print(f"  batch {batch_size:5d}: {step_seconds * 1e6:8.1f} us a step, "
                      f"{batch_size / step_seconds:12,.0f} examples/sec (warm-up {warmup:.1f} s)")
            step_seconds, _, batches = per_size[batch_sizes[0]]
            try:
                kernels = (torch_kernels if framework == "pytorch" else jax_kernels)(run, batches)
                print_kernels(kernels, len(batches), step_seconds)
            except Exception as error:  # a profiler that cannot run here must not cost the timings
                print(f"    no kernel profile: {type(error).__name__}: {error}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
