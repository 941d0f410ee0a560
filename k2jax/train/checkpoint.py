"""Orbax checkpoints of the train state and the data iterator, with a corrupt-checkpoint fallback.

Each step directory under `<workdir>/checkpoints/` holds two items: `state` (a pytree of arrays:
params, optimizer state, router bias, step, rng) and `data` (the iterator state, JSON). Saves are
asynchronous; a state with a non-finite parameter is never written, and neither is a step that
already exists. Restoring walks the steps newest first; one that fails to load is moved aside to
`checkpoints.corrupt/` with a warning and the previous one is tried.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """True when every floating-point leaf of `tree` is finite (one compiled reduction)."""
  return bool(_all_finite(tree))


class Checkpointer:
  """CheckpointManager over items `state` (pytree) and `data` (JSON iterator state)."""

  def __init__(self, directory: str | pathlib.Path, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any) -> bool:
    """Starts an async save; False (and no write) for an existing step or a non-finite state."""
    if step in self.manager.all_steps():
      return False
    if not all_finite(state):
      logging.warning("checkpoint: not saving step %d, the state has NaN/Inf values", step)
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, target_state: Any) -> tuple[int, Any, Any] | None:
    """(step, state, data_state) of the newest loadable checkpoint, or None when there is none.

    `target_state` gives the tree structure, shapes, dtypes and shardings to restore into.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return step, restored.state, restored.data
      except Exception as e:  # A damaged checkpoint fails in many ways.
        logging.warning("checkpoint: step %d is unreadable (%s: %s); trying the previous one",
                        step, type(e).__name__, str(e).splitlines()[0][:200])
        self._move_aside(step)
    return None

  def _move_aside(self, step: int) -> None:
    aside = self.directory.parent / f"{self.directory.name}.corrupt"
    aside.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(aside / f"{step}-{int(time.time())}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
