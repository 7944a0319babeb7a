import os

# JAX preallocates 75% of a GPU's memory when it starts; PyTorch, in the same process for
# compare.py, would then starve. Allocate on demand instead (before jax is first imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def ynnpack_for_reductions_only(xla_flags, jaxlib_version):
    """XLA_FLAGS with XLA:CPU's YNNPACK library kept for reductions only, unless the user chose.

    Since jaxlib 0.10, XLA:CPU hands reductions, matrix products and convolutions' kernel
    gradients to YNNPACK. For LeNet on this project's 2-core machine (float32, batch 256) the
    kernel gradients were the problem: the first convolution's took 6.5 ms there against 0.9 ms
    in XLA's own code, and the whole Flax step ran about 35% slower (18.8 ms against 13.8 ms).
    YNNPACK's reductions, though, are accurate: a float32 mean over a batch of LeNet-sized
    activations came out within 1.6e-7 of float64 with them, 1.3e-6 without, and 100 float32
    training steps of the Flax models drifted 6x farther from their float64 runs. So YNNPACK
    keeps the reductions, and XLA's own code does the rest. The flag is read when JAX starts its
    CPU backend, so it is set here, before impls.flax uses JAX; older jaxlib may not know it,
    and would abort.
    """
    if "ynn_fusion_type" in xla_flags or jaxlib_version < (0, 10):
        return xla_flags
    return f"{xla_flags} --xla_cpu_experimental_ynn_fusion_type=reduce".strip()


def _jaxlib_version():
    from jaxlib.version import __version__
    return tuple(int(part) for part in __version__.split(".")[:2])


os.environ["XLA_FLAGS"] = ynnpack_for_reductions_only(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
