import os

# JAX preallocates 75% of a GPU's memory when it starts; PyTorch, in the same process for
# compare.py, would then starve. Allocate on demand instead (before jax is first imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def without_ynnpack_convolutions(xla_flags, jaxlib_version):
    """XLA_FLAGS with XLA:CPU's YNNPACK library kept for reductions only, unless the user chose.

    Since jaxlib 0.10, XLA:CPU hands reductions, matrix products and convolutions' kernel
    gradients to YNNPACK. For LeNet on this project's 2-core machine (float32, batch 256) the
    kernel gradients were the problem: the first convolution's took 6.5 ms there against 0.9 ms
    in XLA's own code, and the whole Flax step ran about 35% slower. YNNPACK's reductions are
    both fast and accurate: without them, batch norm's float32 statistics came out 10x less
    accurate (1.3e-6 against 1.6e-7 relative) and 100 float32 training steps drifted 6x farther
    from float64. So: reductions only. The flag is read when JAX starts its CPU backend, so it is
    set here, before impls.flax uses JAX; older jaxlib may not know it, and would abort.
    """
    if "ynn_fusion_type" in xla_flags or jaxlib_version < (0, 10):
        return xla_flags
    return f"{xla_flags} --xla_cpu_experimental_ynn_fusion_type=reduce".strip()


def _jaxlib_version():
    from jaxlib.version import __version__
    return tuple(int(part) for part in __version__.split(".")[:2])


os.environ["XLA_FLAGS"] = without_ynnpack_convolutions(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
