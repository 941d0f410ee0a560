r"""Analyse a sweep directory: power-law fits, compute multipliers at equal loss, plots, markdown.

  python experiments/analyze.py sweeps/mva [sweeps/sparsity ...]

Writes DIR/analysis.md, DIR/analysis.json and DIR/*.png, and prints the markdown.
"""

import sys

from absl import app

from k2jax.scaling.analysis import analyze


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: analyze.py DIR [DIR ...]")
  for directory in argv[1:]:
    try:
      md, _ = analyze(directory)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(md)


if __name__ == "__main__":
  app.run(main)
