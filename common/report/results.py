"""What a run keeps: results.json, beside its plots and report.html.

results.json is written last: its presence means the run completed. The imports run one way:
results -> page, plots, console -> the substrate (common.*, impls), never back.
"""

import os
import platform
from importlib.metadata import PackageNotFoundError, version

from common.files import write_json
from impls import registry
from common.report import page, plots

RESULTS = "results.json"


def environment(devices):
    def package_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    packages = {name: package_version(name) for name in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "onnx",
                                                          "onnxscript", "onnxruntime")}
    return {"python": platform.python_version(), **packages,
            "devices": {framework: registry.training(framework).device_description(device)
                        for framework, device in devices.items()}}


def write_all(results, out):
    """Plots first, then report.html, results.json last: its presence means the run completed. A
    training run's plots are its curves and drift; evaluate's and export's, their matrices."""
    paths = []
    if "runs" in results:
        paths += plots.plot_curves(results, out) + plots.plot_divergence(results, out)
    if "evaluation" in results:
        paths += plots.plot_evaluation(results, out)
    if "deployment" in results:
        paths += plots.plot_deployment(results, out)
    paths.append(page.write(out, results=results))
    return [write_json(os.path.join(out, RESULTS), results), *paths]
