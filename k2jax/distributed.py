"""Multi-process runs: JAX's own multi-controller runtime, started from flags or a config.

Every process runs the same program; `initialize` must come before anything touches a device.
After it, `jax.devices()` lists the devices of all processes and a mesh over them spans hosts;
each process feeds its own rows of the batch and writes only what it owns (orbax checkpoints
coordinate across processes; metrics and plots are written by process 0, `is_primary`).
On CPU, cross-process collectives go through gloo.
"""

from __future__ import annotations

import jax

CPU_COLLECTIVES = ("gloo", "mpi")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo",
               local_device_ids=None) -> bool:
  """jax.distributed.initialize for `num_processes` > 1; returns whether it ran.

  coordinator_address: "host:port" of process 0's coordinator, the same on every process.
  Without any of the three (or with num_processes 1) the run stays single-process.
  """
  if num_processes in (None, 1) and coordinator_address is None and process_id in (None, 0):
    return False
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"distributed: num_processes must be a positive integer, got "
                     f"{num_processes!r}")
  if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id must be in [0, {num_processes}), got "
                     f"{process_id!r}")
  host, _, port = (coordinator_address or "").rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"distributed: coordinator_address must be 'host:port', got "
                     f"{coordinator_address!r}")
  if cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"distributed: cpu_collectives must be one of {CPU_COLLECTIVES}, got "
                     f"{cpu_collectives!r}")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  return True


def is_primary() -> bool:
  """True on the process that writes metrics, plots and console output (process 0)."""
  return jax.process_index() == 0
