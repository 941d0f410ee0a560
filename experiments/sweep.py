r"""Run a sweep: every point trains through k2jax.train.train in DIR/points/<name>.

  python experiments/sweep.py --sweep=experiments/sweeps/muon_vs_adamw.py --workdir=sweeps/mva \
      [--parallel=2] [--set=train.steps=100 --set=train.batch_size=8]

Rerun the same command to resume: finished points (rows of DIR/results.jsonl) are skipped and an
interrupted point resumes from its last checkpoint. `--set` changes the sweep's base config (its
budget) before the points' overrides apply; it changes the point names, so results of different
budgets never mix. Then: python experiments/analyze.py DIR.
"""

import ast
import sys

from absl import app, flags

from k2jax.scaling import sweep

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (get_config, get_hyper, ANALYSIS).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: points/, results.jsonl.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at once (worker processes).")
_SET = flags.DEFINE_multi_string("set", [], "Base-config override KEY=VALUE (Python literal).")
flags.mark_flags_as_required(["sweep", "workdir"])


def parse_set(items: list[str]) -> dict:
  """['train.steps=100', "data.source='x'"] -> {'train.steps': 100, 'data.source': 'x'}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # a bare string such as adamw.
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from k2jax.train import ConfigError
  try:
    sweep.run_sweep_file(_SWEEP.value, _WORKDIR.value, _PARALLEL.value, parse_set(_SET.value))
  except (ConfigError, FloatingPointError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
