"""Learning-rate schedules: linear warm-up, then constant, cosine, or K2's WSD.

WSD (warm-up, stable, decay) as in K2: linear warm-up to the peak, constant, then a cosine decay to
final_fraction * peak over the last decay_fraction of the steps [K2: 2e-4 -> 2e-5]; the last
step (steps - 1) runs at the final rate. Step s of warm-up runs at peak * (s + 1) / warmup_steps.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("wsd", "cosine", "constant")


def make_schedule(name: str, peak: float, steps: int, warmup_steps: int,
                  decay_fraction: float = 0.2, final_fraction: float = 0.1) -> optax.Schedule:
  """Schedule `name` in SCHEDULES over `steps` steps."""
  if name not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {name!r}")
  if name == "wsd":
    decay_steps = max(1, round(decay_fraction * steps))
    decay_start = max(warmup_steps, steps - decay_steps)
  elif name == "cosine":
    decay_start = warmup_steps
  else:
    decay_start = steps
  decay_len = max(1, steps - 1 - decay_start)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(1, warmup_steps))
    t = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)
    cos = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    return jnp.where(step < decay_start, warm, peak * cos)

  return schedule
