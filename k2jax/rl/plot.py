"""The RL run's picture: rollout reward and held-out success against updates, as a PNG."""

from __future__ import annotations

import functools
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from k2jax.train.metrics import read_metrics  # noqa: E402
from k2jax.train.plot import save, series  # noqa: E402

PLOT_FILE = "rl.png"


def plot_rl(workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes `<workdir>/rl.png`: reward and success of the rollouts, held-out success and
  valid-call rate per split, against the update."""
  records = read_metrics(workdir)
  fig, (ax_reward, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  xy = functools.partial(series, records, x="update")

  ax_reward.plot(*xy("reward_mean"), label="reward (mean)")
  ax_reward.plot(*xy("success"), label="success")
  ax_reward.set(xlabel="update", title="rollouts")
  ax_reward.legend()
  for split in ("heldout", "heldout_domain"):
    if any(f"{split}_success" in r for r in records):
      ax_eval.plot(*xy(f"{split}_success"), "o-", label=f"{split}: success")
      ax_eval.plot(*xy(f"{split}_valid_call_rate"), "x--", label=f"{split}: valid calls")
  ax_eval.set(xlabel="update", ylim=(0, 1.02), title="held-out (greedy)")
  if ax_eval.lines:
    ax_eval.legend(fontsize=8)
  return save(fig, pathlib.Path(workdir) / PLOT_FILE)
