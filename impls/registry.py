"""The registry: which implementations exist, which framework each belongs to, and where a
framework's parts are.

The one place that imports a framework's package by name (tests/test_layout.py holds every other
module to static imports, one way down). Each part it hands out provides what impls/interface.py
declares; the driving code, the report and the tests know the frameworks through this module alone.
"""

import importlib
from typing import NamedTuple

from impls import interface


class Implementation(NamedTuple):
    framework: str  # its package under impls/
    norm: str       # 'scratch': the chapter's layer; 'builtin': the framework's own


class Framework(NamedTuple):
    title: str      # the name readers know it by
    runtime: str    # 'torch' or 'jax': Flax's two APIs run on one JAX (one backend, one mesh)


IMPLEMENTATIONS = {
    "torch-scratch": Implementation("pytorch", "scratch"),
    "torch-builtin": Implementation("pytorch", "builtin"),
    "flax-scratch": Implementation("flax", "scratch"),
    "flax-builtin": Implementation("flax", "builtin"),
    "linen-scratch": Implementation("linen", "scratch"),
    "linen-builtin": Implementation("linen", "builtin"),
}
FRAMEWORKS = {
    "pytorch": Framework("PyTorch", "torch"),
    "flax": Framework("Flax NNX", "jax"),
    "linen": Framework("Flax Linen", "jax"),
}
# Each framework's parts: a module of its package, and the protocol it provides.
PARTS = {
    "batch_norm": interface.BatchNormPart,
    "lenet": interface.ModelPart,
    "train": interface.TrainingPart,
    "data_parallel": interface.DataParallelPart,
    "checkpoint": interface.CheckpointPart,
    "deploy": interface.DeployPart,
}
# What a runtime's parts provide beyond PARTS' protocols.
RUNTIME_PARTS = {("jax", "data_parallel"): interface.MeshDataParallelPart,
                 ("torch", "deploy"): interface.OnnxDeployPart}


def protocol(framework, part):
    """The protocol that impls/<framework>/<part>.py provides."""
    return RUNTIME_PARTS.get((FRAMEWORKS[framework].runtime, part), PARTS[part])


def part(framework, name):
    """impls/<framework>/<name>.py, imported on first use (importing PyTorch or JAX only for a
    framework that runs)."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; impls/ holds {', '.join(FRAMEWORKS)}")
    if name not in PARTS:
        raise ValueError(f"unknown part {name!r} of a framework; each has {', '.join(PARTS)}")
    return importlib.import_module(f"impls.{framework}.{name}")


def batch_norm(framework) -> interface.BatchNormPart:
    return part(framework, "batch_norm")


def training(framework) -> interface.TrainingPart:
    return part(framework, "train")


def data_parallel(framework) -> interface.DataParallelPart:
    return part(framework, "data_parallel")


def checkpoint(framework) -> interface.CheckpointPart:
    return part(framework, "checkpoint")


def deploy(framework) -> interface.DeployPart:
    return part(framework, "deploy")


def training_of(name) -> interface.TrainingPart:
    """The train.py of the framework that implementation `name` belongs to."""
    return training(IMPLEMENTATIONS[name].framework)


def runs_on(framework, runtime):
    return FRAMEWORKS[framework].runtime == runtime


def parse_implementations(text):
    """'torch-scratch,flax-builtin' -> a list of names; an unknown name lists the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown or not names:
        raise ValueError(f"unknown implementation {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(IMPLEMENTATIONS)} (comma-separated)")
    return list(dict.fromkeys(names))
