import os

# JAX preallocates 75% of a GPU's memory when it starts; PyTorch, in the same process for
# compare.py, would then starve. Allocate on demand instead (before jax is first imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
