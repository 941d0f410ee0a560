"""RL after SFT in the tool worlds (K2's recipe in miniature; k2jax.rl):

  python experiments/rl.py --config=experiments/configs/k2_nano_rl.py \
      --config.init_from=workdirs/sft_demo/sft --workdir=workdirs/rl [--config.rl.objective=grpo]

Rerun on the same workdir to resume (exactly: the same rollouts, rewards and losses)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from k2jax.rl import train_rl
from k2jax.train import ConfigError
from k2jax.train.config import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/k2_nano_rl.py",
                                          "RL experiment config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  try:
    summary = train_rl(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  print({k: summary[k] for k in summary if k not in ("first_eval", "last_eval")}, flush=True)
  for key in ("first_eval", "last_eval"):
    if key in summary:
      print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[key].items()
                                   if k.startswith(("heldout", "ptx_eval"))), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
