r"""Analyse a sweep directory: power-law fits, compute multipliers at equal loss, plots, markdown.

  python experiments/analyze.py sweeps/mva [sweeps/sparsity ...] [--y=loss_tail]

Writes DIR/analysis.md, DIR/analysis.json and DIR/*.png, and prints the markdown. --y fits another
loss field of results.jsonl (loss_tail: train loss over the last 10% of steps, on batches not yet
trained on) and writes DIR/analysis_<y>.md etc. beside the default analysis.
"""

import sys

from absl import app, flags

from k2jax.scaling.analysis import analyze

_Y = flags.DEFINE_string("y", None, "Loss field to fit instead of the sweep's (e.g. loss_tail).")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: analyze.py DIR [DIR ...]")
  for directory in argv[1:]:
    try:
      md, _ = analyze(directory, _Y.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(md)


if __name__ == "__main__":
  app.run(main)
