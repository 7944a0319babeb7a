import os

# JAX preallocates 75% of a GPU's memory when it starts; PyTorch, in the same process for
# compare.py, would then starve. Allocate on demand instead (before jax is first imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def without_ynnpack_fusions(xla_flags, jaxlib_version):
    """XLA_FLAGS with XLA:CPU's YNNPACK fusions turned off, unless the user chose for them.

    Since jaxlib 0.10, XLA:CPU hands convolutions' kernel gradients, reductions and some matrix
    products to YNNPACK. For LeNet on this project's 2-core machine that made the whole Flax
    step about 30% slower (float32, batch 256: the kernel gradient of the first convolution
    took 6.5 ms instead of 0.9 ms). The flag is read when JAX starts its CPU backend, so it is
    set here, before impls.flax uses JAX; older jaxlib may not know the flag, and would abort.
    """
    if "ynn_fusion_type" in xla_flags or jaxlib_version < (0, 10):
        return xla_flags
    return f"{xla_flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


def _jaxlib_version():
    from jaxlib.version import __version__
    return tuple(int(part) for part in __version__.split(".")[:2])


os.environ["XLA_FLAGS"] = without_ynnpack_fusions(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
