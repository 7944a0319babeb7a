"""What a launcher tells each worker it starts, and the error of a data-parallel run that cannot
start as asked: read by the framework packages (impls/*/data_parallel.py) as by the driving code.

torchrun, and compare.py --data-parallel N on one machine, start every worker with an env://
rendezvous: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and LOCAL_RANK, LOCAL_WORLD_SIZE) in
its environment. torch.distributed meets there; jax.distributed's coordinator listens beside it.
"""

import os
from dataclasses import dataclass

# Only where torchrun sets no JAX_COORDINATOR_ADDRESS: JAX's coordinator listens beside torch's store.
JAX_COORDINATOR_PORT_OFFSET = 1


class DataParallelError(RuntimeError):
    """A data-parallel run that cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class LaunchEnvironment:
    """What torchrun tells each worker it starts (env:// rendezvous)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def jax_coordinator(self):
        """host:port of jax.distributed's coordinator, which worker 0 runs."""
        return os.environ.get("JAX_COORDINATOR_ADDRESS") or (
            f"{self.master_addr}:{self.master_port + JAX_COORDINATOR_PORT_OFFSET}")


def launch_environment():
    """The launcher's variables for this process, or None where no launcher started it."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DataParallelError(f"{name} is not set, but RANK or WORLD_SIZE is: start the workers with torchrun, "
                                    "or set all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        values[name] = os.environ[name]
    try:
        rank, world_size, master_port = int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["MASTER_PORT"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        raise DataParallelError("RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_PORT must be integers, "
                                f"got {values}") from None
    if not 0 <= rank < world_size:
        raise DataParallelError(f"RANK {rank} is not in [0, WORLD_SIZE={world_size})")
    return LaunchEnvironment(rank, world_size, local_rank, local_world_size, values["MASTER_ADDR"], master_port)
