"""The run's picture: loss (train and eval) and max attention logit against step, as a PNG."""

from __future__ import annotations

import functools
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from k2jax.train.metrics import read_metrics  # noqa: E402
from k2jax.train.workdir import METRICS_FILE, PLOT_FILE  # noqa: E402


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
  """(x values, `key` values) of the records that hold `key`."""
  pts = [(r[x], r[key]) for r in records if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def save(fig, path: str | pathlib.Path) -> pathlib.Path:
  """Lays out `fig`, writes it to `path` as a PNG and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return pathlib.Path(path)


def plot_run(workdir: str | pathlib.Path, tau: float | None = None) -> pathlib.Path:
  """Writes `<workdir>/training.png` from metrics.jsonl; `tau` draws the QK-Clip threshold."""
  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"{pathlib.Path(workdir) / METRICS_FILE}: no metrics to plot")
  fig, (ax_loss, ax_logit) = plt.subplots(1, 2, figsize=(11, 4))
  xy = functools.partial(series, records)

  ax_loss.plot(*xy("loss"), label="train")
  if any("eval_loss" in r for r in records):
    ax_loss.plot(*xy("eval_loss"), "o-", label="eval")
  ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
  ax_loss.legend()
  steps, per_layer = xy("max_logit_per_layer")
  for layer in range(len(per_layer[0]) if per_layer else 0):
    ax_logit.plot(steps, [v[layer] for v in per_layer], lw=0.8, label=f"layer {layer}")
  steps, top = xy("max_logit")
  ax_logit.plot(steps, top, "k", lw=1.5, label="max")
  title = "max attention logit"
  if tau is not None and max(top) > tau / 2:
    ax_logit.axhline(tau, color="r", ls="--", label=f"tau = {tau:g}")
  elif tau is not None:  # far below the threshold: keep the curves readable.
    title += f" (QK-Clip tau = {tau:g})"
  ax_logit.set(xlabel="step", ylabel="max pre-softmax logit", title=title)
  ax_logit.legend(fontsize=7)
  return save(fig, pathlib.Path(workdir) / PLOT_FILE)
